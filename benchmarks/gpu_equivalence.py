"""NumPy against CuPy: the same seed, the same augmentations, the same first training steps.

Trains SwAV on digits for ``--steps`` steps on each backend in float32 (same
initialisation, same crops: random parameters are drawn on the host by one generator) and
reports the per-step losses and their largest relative difference. Passes when every step
agrees to ``--rtol`` (1e-3). CuPy runs with the fused kernels unless ``SWAV_REF_FUSED=0``
(recorded as ``fused_kernels``). The file also records how it was made (``command``,
``argv``), the library versions and the GPU's name.

Run:  python benchmarks/gpu_equivalence.py --out FILE.json
``--backend numpy --out /tmp/x.json`` compares NumPy with itself: a trivial check, but it
rehearses the script on a machine without a GPU (the test suite runs it). A run that is not
the real comparison, or that failed, is never written to the committed results unless
``--out`` says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from swav_ref import fused
from swav_ref.train import TrainConfig, Trainer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_equivalence.json"


# -- provenance: shared with bench_gpu.py ------------------------------------------------------
def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that made a result, to show and to rerun: ``--out``/``--output`` dropped
    (where the file went, not how it was measured), ``SWAV_REF_FUSED=0`` put in front when
    the environment switched the fused kernels off."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--output"):
            skip = True
        elif not arg.startswith(("--out=", "--output=")):
            kept.append(arg)
    env = "SWAV_REF_FUSED=0 " if os.environ.get("SWAV_REF_FUSED") == "0" else ""
    return f"{env}python {script} {shlex.join(kept)}".rstrip()


def gpu_name(xp) -> str | None:
    """The name of the GPU ``xp`` runs on (CuPy), or None (NumPy, or CuPy cannot say)."""
    if getattr(xp, "__name__", "") != "cupy":
        return None
    try:
        name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # provenance only: never the reason a measurement is lost
        return None


def provenance(script: str, argv: Sequence[str], xp) -> dict:
    """``command``, ``argv``, ``versions`` (NumPy, CuPy when ``xp`` is CuPy, torch from its
    package metadata: no import) and ``gpu`` when on one."""
    versions = {"numpy": np.__version__}
    if getattr(xp, "__name__", "") == "cupy":
        versions["cupy"] = xp.__version__
    try:
        versions["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    info = {"command": command_line(script, argv), "argv": list(argv), "versions": versions}
    gpu = gpu_name(xp)
    if gpu:
        info["gpu"] = gpu
    return info


# -- the comparison ----------------------------------------------------------------------------
def make_trainer(backend: str) -> Trainer:
    return Trainer(TrainConfig(backend=backend, epochs=2, progress=False, log_every=1, out_dir=tempfile.mkdtemp()))


def losses(backend: str, steps: int, trainer: Trainer | None = None) -> tuple[list[float], float]:
    """The first ``steps`` training losses on ``backend`` and the seconds they took."""
    trainer = trainer or make_trainer(backend)
    out, t0 = [], time.perf_counter()
    while len(out) < steps:
        epoch, s = divmod(trainer.step, trainer.steps_per_epoch)
        if s == 0:
            trainer._start_epoch(epoch)
        idx = trainer.batch_indices(epoch, s)
        loss, _ = trainer.train_step(trainer.make_crops(idx), idx)
        out.append(float(loss))
    return out, time.perf_counter() - t0


def compare(a: list[float], b: list[float], rtol: float) -> dict:
    rel = (np.abs(np.array(a) - np.array(b)) / np.abs(np.array(a))).tolist()
    worst = max(rel)
    return {"relative_difference": rel, "max_relative_difference": worst, "passed": bool(worst <= rtol)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--backend", choices=("cupy", "numpy"), default="cupy",
                   help="the side compared with NumPy; numpy: a rehearsal on the CPU (needs --out)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    args.explicit_out = args.out is not None
    if args.out is None:
        if args.backend != "cupy":  # a rehearsal must not replace the committed GPU result
            p.error("--backend numpy is a rehearsal: give --out (e.g. --out /tmp/gpu_equivalence.json); the "
                    "default path holds the committed GPU result")
        args.out = DEFAULT_OUT
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "rtol": args.rtol,
                    "backend": args.backend, "fused_kernels": fused.enabled(), "passed": False}

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    try:
        trainer = make_trainer(args.backend)  # first: a missing GPU fails in seconds, not after NumPy's run
        result.update(provenance("benchmarks/gpu_equivalence.py", argv, trainer.xp))
        if "gpu" in result:
            result["machine"] = result["gpu"]
        result["numpy"], result["numpy_seconds"] = losses("numpy", args.steps)
        # the second side under "cupy", as report.py and the older files have it (a NumPy
        # rehearsal's second NumPy run too)
        result["cupy"], result["cupy_seconds"] = losses(args.backend, args.steps, trainer)
    except Exception as exc:  # recorded: the file says why there is no comparison
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc().splitlines()[-12:]
        if args.explicit_out:  # a failure never replaces the committed result
            write()
        print(json.dumps({k: result[k] for k in ("error", "traceback")}, indent=2), file=sys.stderr)
        return 1
    result.update(compare(result["numpy"], result["cupy"], args.rtol))
    write()
    print(json.dumps({k: v for k, v in result.items() if k not in ("numpy", "cupy", "relative_difference", "argv")}))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
