"""How many array operations one training step issues: the fused kernels against the plain code.

Why count them: on a GPU every array operation is a kernel launch, and CuPy spends several
microseconds of Python and driver time on the host to issue each one. The H200 run before
the fused kernels timed our ``resnet_tiny`` step (batch 256 of 8x8 images, so almost no
work on the device) at 23 ms, against 3.7 ms for PyTorch. The step issues 735 array
operations, so that is about 30 µs of host time each (18 µs in the profiled run of the same
step, at 13.3 ms). At 18 to 30 µs a step that issues 1,500 operations cannot take less
than 27 to 45 ms, however fast the GPU. So the number of launches is a cost of its own, and one
that can be measured exactly on any machine.

How: the step runs on NumPy arrays of a subclass (:class:`CountingArray`) that tallies
every NumPy operation done on it, and NumPy's array-creating functions are wrapped for the
duration so that every array of the step is such an array. For the fused path the kernels
are compiled for the CPU (``tests/fused_host.py``, as in the test suite) and each launch is
counted. Operations are sorted into

- ``kernels``: what launches a kernel on a GPU: element-wise operations, reductions,
  matrix products, copies and fills, and the fused kernels;
- ``views``: reshapes, transposes and slices (host work only, but not free in CuPy);
- ``allocations``: ``empty`` arrays (a memory-pool lookup in CuPy);
- ``host_syncs``: reads of an array's value into Python (``float``, ``int``, ``bool``,
  an index, ``item``, ``tolist``) and calls of ``swav_ref.backend.to_numpy``. On a GPU
  each one makes the host wait for every queued kernel, so a training step should have
  none (the loop reads its losses every ``log_every`` steps, outside the step). On NumPy a
  host array looks like a device array, so reads of host-side arrays count too: in the
  SwAV step, ``render_crops``' 4 decisions on its crop parameters (host arrays by
  construction) and the seeding of the augmentation's host random generator. (NumPy returns full reductions as scalars; here they are 0-d
  arrays, as on CuPy, so that their reads, and operations on them, count.)

The NumPy step takes the same code path as CuPy's. Counts are a little higher here than
on a GPU for three reasons. The augmentation's random draws are host NumPy work on every
backend (``sample_boxes``, ``sample_crop_params``: about 80 operations of the SwAV step),
but here they look like device operations. And two branches differ: ``conv2d_backward`` forms the weight gradient transposed on
NumPy (OpenBLAS is faster so), which costs the fused optimiser one copy per convolution
(20 per resnet18 pass); and LARS's sums of squares are one CuPy reduction kernel each but
two operations here (2 per parameter: 132 in the SwAV step). The counts are exact and do
not depend on the batch size, so small inputs are used.

Cases: the step of ``benchmarks/bench_resnet.py`` (forward, linear head, cross-entropy,
backward, SGD) for ``resnet_tiny`` and ``resnet18``, and the full SwAV step of
``benchmarks/bench_gpu.py`` (multi-crop, resnet18, prototypes, Sinkhorn, LARS) at toy sizes.

Run:  python benchmarks/bench_launches.py   (writes benchmarks/results/bench_launches.json)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # fused_host: the kernels compiled for the CPU

from swav_ref import fused  # noqa: E402

#: NumPy functions that only make a new view of the same memory.
VIEW_FUNCTIONS = {"reshape", "permute_dims", "transpose", "squeeze", "expand_dims", "broadcast_to",
                  "ravel", "matrix_transpose", "swapaxes", "moveaxis"}
#: Functions that answer questions about arrays without computing anything.
QUERY_FUNCTIONS = {"shape", "ndim", "size", "result_type", "can_cast", "isdtype", "may_share_memory",
                   "shares_memory", "iterable"}
#: Array-creating functions wrapped while counting (``empty*`` only reserve memory).
CREATORS = {"empty": "allocations", "empty_like": "allocations", "zeros": "kernels", "zeros_like": "kernels",
            "ones": "kernels", "ones_like": "kernels", "full": "kernels", "full_like": "kernels",
            "arange": "kernels", "eye": "kernels", "asarray": "kernels", "ascontiguousarray": "kernels",
            "concat": "kernels", "concatenate": "kernels", "stack": "kernels"}


class Tally:
    """Operations by kind and by the library function that issued them."""

    def __init__(self) -> None:
        self.on = False
        self.depth = 0  # > 0 inside a counted operation: NumPy's own inner calls are not counted
        self.by_kind: collections.Counter = collections.Counter()
        self.by_site: collections.Counter = collections.Counter()

    def add(self, kind: str, what: str) -> None:
        if self.on and self.depth == 0:
            self.by_kind[kind] += 1
            self.by_site[(kind, _caller(), what)] += 1

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


TALLY = Tally()


def _caller() -> str:
    """``module.function`` of the innermost swav_ref frame outside swav_ref.fused."""
    frame = sys._getframe(3)
    while frame is not None:
        name = frame.f_code.co_filename
        if "swav_ref" in name and "fused" not in name:
            module = name.split("swav_ref")[-1].strip("/\\").removesuffix(".py").replace("/", ".")
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _plain(a: Any) -> Any:
    return a.view(np.ndarray) if isinstance(a, CountingArray) else a


_NP_ASARRAY = np.asarray


def _counting(a: Any) -> Any:
    """A result as a :class:`CountingArray`. NumPy returns a full reduction as a scalar;
    it becomes a 0-d array here, as CuPy returns it, so that reading its value counts."""
    if isinstance(a, np.generic):
        a = _NP_ASARRAY(a)  # NumPy's own: the wrapped one would count this as an operation
    return a.view(CountingArray) if type(a) is np.ndarray else a


class CountingArray(np.ndarray):
    """A NumPy array that reports every operation done on it to :data:`TALLY`."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        TALLY.add("kernels", f"{ufunc.__name__}" + ("" if method == "__call__" else f".{method}"))
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(o) for o in kwargs["out"])
        with TALLY.inside():
            result = getattr(ufunc, method)(*(_plain(i) for i in inputs), **kwargs)
        return tuple(map(_counting, result)) if isinstance(result, tuple) else _counting(result)

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__
        if name not in QUERY_FUNCTIONS:
            TALLY.add("views" if name in VIEW_FUNCTIONS else "kernels", name)
        with TALLY.inside():
            result = super().__array_function__(func, types, args, kwargs)
        return _counting(result) if isinstance(result, np.generic) else result

    def __getitem__(self, key):
        TALLY.add("views", "getitem")
        with TALLY.inside():
            return _counting(super().__getitem__(key))  # an element too, as a 0-d array

    def __setitem__(self, key, value):
        TALLY.add("kernels", "setitem")
        with TALLY.inside():
            super().__setitem__(key, value)

    def astype(self, *args, **kwargs):
        TALLY.add("kernels", "astype")
        with TALLY.inside():
            return super().astype(*args, **kwargs)


def _value_read(method: str, label: str) -> Callable:
    """A method that records a read of the array's value on the host, then does it: on a
    GPU the host must wait for every queued kernel (a synchronisation) and copy back."""
    def read(self, *args):
        TALLY.add("host_syncs", label)
        with TALLY.inside():
            return getattr(super(CountingArray, self), method)(*args)
    return read


for _method, _label in (("__float__", "float()"), ("__int__", "int()"), ("__index__", "index"),
                        ("__bool__", "bool()"), ("item", "item()"), ("tolist", "tolist()")):
    setattr(CountingArray, _method, _value_read(_method, _label))


@contextlib.contextmanager
def counting_numpy() -> Iterator[None]:
    """While active, NumPy's array-creating functions return :class:`CountingArray` and
    count themselves (``asarray`` only when it makes a new array)."""
    originals = {name: getattr(np, name) for name in CREATORS}

    def wrap(name: str, fn: Callable) -> Callable:
        def creator(*args, **kwargs):
            with TALLY.inside():
                result = fn(*args, **kwargs)
            if name not in ("asarray", "ascontiguousarray") or not (args and result is args[0]):
                TALLY.add(CREATORS[name], name)
            return _counting(result)
        return creator

    for name, fn in originals.items():
        setattr(np, name, wrap(name, fn))
    # swav_ref.backend.to_numpy is the library's one way to bring an array to the host (a
    # no-op on NumPy, a device-to-host copy on CuPy): every module's binding of it counts
    from swav_ref import backend

    to_numpy = backend.to_numpy

    def counted_to_numpy(x):
        TALLY.add("host_syncs", "to_numpy")
        with TALLY.inside():
            return _plain(to_numpy(x))  # a host array, as from CuPy: reading it costs no sync

    bindings = [m for name, m in list(sys.modules.items())
                if name.startswith("swav_ref") and getattr(m, "to_numpy", None) is to_numpy]
    for module in bindings:
        module.to_numpy = counted_to_numpy
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(np, name, fn)
        for module in bindings:
            module.to_numpy = to_numpy


@contextlib.contextmanager
def fused_kernels_on_the_cpu() -> Iterator[None]:
    """The fused kernels compiled for the CPU and registered for NumPy; each launch counted."""
    from fused_host import HostLauncher, compile_host_library

    with tempfile.TemporaryDirectory() as tmp:
        library = compile_host_library(Path(tmp))
        if library is None:
            raise RuntimeError("no C++ compiler: the fused kernels cannot be built for the CPU")
        run = HostLauncher(library)

        def launcher(name: str, n_elements: int, args: tuple) -> None:
            TALLY.add("kernels", "fused " + name.rsplit("_", 2)[0])
            with TALLY.inside():
                run(name, n_elements, tuple(_plain(a) for a in args))

        with fused.launcher_registered("numpy", launcher):  # then the test suite's again, if any
            yield


def count_step(make_step: Callable[[], Callable[[], Any]], use_fused: bool, warm_steps: int = 2) -> dict:
    """Operations of one step (after ``warm_steps``, so that buffers and lazy set-up are in
    place, as in a long run). ``make_step`` builds the model and returns the step."""
    TALLY.by_kind.clear()
    TALLY.by_site.clear()
    with counting_numpy(), (fused_kernels_on_the_cpu() if use_fused else fused.disabled()):
        step = make_step()
        for _ in range(warm_steps):
            step()
        TALLY.on = True
        try:
            step()
        finally:
            TALLY.on = False
    sites = [{"kind": kind, "where": where, "what": what, "count": n}
             for (kind, where, what), n in TALLY.by_site.most_common() if kind == "kernels"]
    syncs = [{"where": where, "what": what, "count": n}
             for (kind, where, what), n in TALLY.by_site.most_common() if kind == "host_syncs"]
    return {"kernels": TALLY.by_kind["kernels"], "views": TALLY.by_kind["views"],
            "allocations": TALLY.by_kind["allocations"], "host_syncs": TALLY.by_kind["host_syncs"],
            "kernel_sites": sites, "host_sync_sites": syncs}


# -- the steps -------------------------------------------------------------------------------
def resnet_step(arch: str, batch: int = 2) -> Callable[[], Callable[[], Any]]:
    """``bench_resnet.py``'s SGD step of ``arch`` (its input size), on ``batch`` images."""
    from bench_resnet import build_case, case_inputs, make_ours

    def make():
        net, head, shape = build_case(arch, np)
        x, y = case_inputs(shape, batch)
        step = make_ours(net, head)
        x, y = np.asarray(x), np.asarray(y)
        return lambda: step(x, y)
    return make


def swav_step(batch: int = 4) -> Callable[[], Callable[[], Any]]:
    """``bench_gpu.py``'s full SwAV step (2x32 + 6x16 crops, resnet18, LARS) at toy sizes."""
    from bench_gpu import swav_step as make_swav_step

    return lambda: make_swav_step("numpy", batch, prototypes=30, hidden=32, feat_dim=16)


CASES = {
    "resnet_tiny_step": ("resnet_tiny SGD step (bench_resnet.py)", lambda: resnet_step("resnet_tiny")),
    "resnet18_step": ("resnet18 SGD step, CIFAR layout (bench_resnet.py, bench_gpu.py)", lambda: resnet_step("resnet18")),
    "swav_step": ("full SwAV step, resnet18, 2x32 + 6x16 crops, LARS (bench_gpu.py)", swav_step),
}


def run_case(name: str, top: int = 12) -> dict:
    what, make = CASES[name]
    plain = count_step(make(), use_fused=False)
    fused_counts = count_step(make(), use_fused=True)
    return {
        "what": f"{what}: array operations that launch a GPU kernel, fused kernels vs the plain code",
        "plain": {k: v for k, v in plain.items() if not k.endswith("_sites")},
        "fused": {k: v for k, v in fused_counts.items() if not k.endswith("_sites")},
        "host_sync_sites": fused_counts["host_sync_sites"] + plain["host_sync_sites"],
        "ratio": fused_counts["kernels"] / plain["kernels"],
        "top_kernel_sites_fused": fused_counts["kernel_sites"][:top],
        "top_kernel_sites_plain": plain["kernel_sites"][:top],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_launches.json")
    args = p.parse_args(argv)
    result = {"benchmark": "bench_launches", "date": time.strftime("%Y-%m-%d"),
              "machine": f"any (exact counts; run on {platform.machine()})", "numpy": np.__version__,
              "command": "python benchmarks/bench_launches.py", "cases": {}}
    for name in args.cases:
        result["cases"][name] = case = run_case(name)
        print(f"{name}: {case['fused']['kernels']} kernels fused, {case['plain']['kernels']} plain "
              f"({case['ratio']:.2f}); views {case['fused']['views']} / {case['plain']['views']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
