"""Host time of one training step: the part of a step that a GPU cannot hide.

Why: on a GPU the host issues every kernel, and a step cannot finish sooner than the host
takes to issue it, however fast the device. ``bench_launches.py`` counts what a step
issues; this measures how long the host takes to issue it, on any machine.

How: the step of ``bench_resnet.py`` (forward, linear head, cross-entropy, backward, SGD
with momentum) on a network with resnet18's structure (the CIFAR layout, 2-2-2-2 basic
blocks: the same layers, and exactly the same launches, as ``bench_launches.py`` checks)
at 1/8 of its width, on a batch of 2 images of 3x16x16. The arrays are so small that what
is timed is nearly all host work: Python and the array library's dispatch. Sides, in one
run, in three alternating blocks:

- ``ours_plain``: our step on NumPy, the plain array code (1,628 array operations);
- ``ours_fused_issue_only``: the step of the fused path with every kernel launch replaced
  by a launcher that does nothing. All of our host work runs (the wrappers, their checks,
  the argument packing, the array code between the kernels) and none of the kernels' own
  work, which on a GPU runs on the device. The numbers it computes are meaningless (the
  kernels' outputs are never written), so its loss is not reported, and floating-point
  warnings are silenced for it. What it leaves out is CuPy's own cost per launch;
- ``torch``: PyTorch's step on the CPU (autograd, ``torch.optim.SGD``), in a subprocess
  (see ``bench_resnet.py`` for why), on copies of our weights.

All sides run with one thread: issuing a step is serial work. Reported: the median and
best step, their ratios to PyTorch, and the host time per kernel our step issues (with
``bench_launches.py``'s exact counts). Read it as host overhead, not as GPU speed: NumPy's
dispatch is cheaper than CuPy's, and PyTorch's CPU dispatch differs from its CUDA one.
``bench_gpu.py``'s ``host_floor`` case asks the same question on a GPU.

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_host.py [--quick]
Writes benchmarks/results/bench_host.json and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # bench_launches counts the fused path with fused_host

import bench_launches  # noqa: E402
import bench_resnet  # noqa: E402
from swav_ref import fused  # noqa: E402
from swav_ref.backend import to_numpy  # noqa: E402

CASE = "resnet18_narrow"  # defined in bench_resnet.CASES, so that its torch peer can build it
BATCH = 2
SETTING = (f"resnet18 structure at 1/8 width (CIFAR layout), batch {BATCH} of "
           f"{'x'.join(map(str, bench_resnet.CASES[CASE][2]))}, float32, 1 thread")


def _limit_threads() -> None:
    """One BLAS thread for NumPy (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:
        pass


@contextlib.contextmanager
def issue_only() -> Iterator[None]:
    """Fused-kernel launches on NumPy that do nothing (see the module notes)."""
    with fused.launcher_registered("numpy", lambda name, n_elements, args: None), np.errstate(all="ignore"):
        yield


def our_step(side: str) -> Callable[[], float]:
    """Our step (``bench_resnet.make_ours``) on a fresh network, for ``side``."""
    net, head, shape = bench_resnet.build_case(CASE, np)
    x, y = bench_resnet.case_inputs(shape, BATCH)
    step = bench_resnet.make_ours(net, head)

    def run() -> float:
        with issue_only() if side == "ours_fused_issue_only" else fused.disabled():
            return step(x, y)

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_host.json"))
    args = parser.parse_args(argv)
    _limit_threads()
    steps_per_block = 10 if args.quick else 40
    use_torch = importlib.util.find_spec("torch") is not None
    load_before = os.getloadavg()[0]

    ours = ("ours_plain", "ours_fused_issue_only")
    counts = {side: bench_launches.count_step(bench_launches.resnet_step(CASE, BATCH), use_fused=side != "ours_plain")
              for side in ours}
    times: dict[str, list[float]] = {side: [] for side in (*ours, "torch")}
    first_loss = {}
    steps = {side: our_step(side) for side in ours}
    first_loss["ours_plain"] = steps["ours_plain"]()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.npz"
        net, head, _ = bench_resnet.build_case(CASE, np)  # the same seeds: the same weights
        state = {f"net.{k}": to_numpy(v) for k, v in net.state_dict().items()}
        state.update({f"head.{k}": to_numpy(v) for k, v in head.state_dict().items()})
        np.savez(weights, **state)
        for _ in range(3):  # alternating blocks: a slow phase of the machine hits every side
            for side, step in steps.items():
                times[side] += bench_resnet.time_steps(step, (), steps_per_block)
            if use_torch:
                peer = bench_resnet.torch_in_subprocess(CASE, BATCH, steps_per_block, 1, "cpu", weights)
                times["torch"] += peer["times"]
                first_loss["torch"] = peer["first_loss"]

    sides = {}
    for side, samples in times.items():
        if not samples:
            continue
        sides[side] = {"step_ms": round(1e3 * statistics.median(samples), 3),
                       "best_step_ms": round(1e3 * min(samples), 3),
                       "step_ms_all": [round(1e3 * t, 3) for t in samples]}
        if side in counts:
            kernels = counts[side]["kernels"]
            sides[side].update(kernels_per_step=kernels, views_per_step=counts[side]["views"],
                               host_us_per_kernel=round(1e3 * sides[side]["step_ms"] / kernels, 2))
            if "torch" in times and times["torch"]:
                torch_ms = 1e3 * statistics.median(times["torch"])
                sides[side]["ratio_over_torch"] = round(sides[side]["step_ms"] / torch_ms, 3)
                sides[side]["ratio_best_over_best_torch"] = round(min(samples) / min(times["torch"]), 3)
    result = {
        "benchmark": "bench_host",
        "what": f"host time of one SGD training step, {SETTING}: ours (plain code; fused path, launches only) vs torch CPU",
        "setting": SETTING,
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "numpy": np.__version__,
        "command": "python benchmarks/bench_host.py",
        "quick": args.quick,
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "first_step_loss": first_loss,
        "sides": sides,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "sides"}, indent=2))
    for side, r in sides.items():
        print(side, {k: v for k, v in r.items() if k != "step_ms_all"})
    return result


if __name__ == "__main__":
    main()
