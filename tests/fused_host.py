"""The fused CUDA kernels compiled as C++ and run on the CPU, for tests without a GPU.

``swav_ref/fused/kernels.cu`` is compiled by the system C++ compiler with
``tests/cuda_host_shim.h`` (which turns a launch into one thread that visits every
element) into a shared library, and :class:`HostLauncher` calls its exported functions
through ctypes on NumPy arrays. Registered with :func:`swav_ref.fused.register_launcher`,
it sends the library's NumPy code through the very kernels CuPy compiles, so their index
arithmetic and formulas are tested on every machine. (Registered for single tests only,
by the ``fused_lane`` fixture: a normal NumPy run never uses the kernels.)
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from swav_ref.fused import KERNEL_SOURCE

SHIM = Path(__file__).with_name("cuda_host_shim.h")

_C_TYPES = {np.int32: ctypes.c_int, np.int64: ctypes.c_longlong,
            np.float32: ctypes.c_float, np.float64: ctypes.c_double}


def compile_host_library(directory: Path) -> Path | None:
    """Compile the kernels into ``directory``; ``None`` when no C++ compiler is found."""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return None
    library = directory / "swav_fused_host.so"
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-x", "c++", "-include", str(SHIM),
                    str(KERNEL_SOURCE), "-o", str(library)], check=True, capture_output=True, text=True)
    return library


class HostLauncher:
    """Runs a kernel of the host library on NumPy arrays (the launcher interface of
    :func:`swav_ref.fused.register_launcher`)."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))

    def __call__(self, name: str, n_elements: int, args: tuple) -> None:
        converted = []
        for a in args:
            if isinstance(a, np.ndarray):
                converted.append(ctypes.c_void_p(a.ctypes.data))
            elif a is None:  # a null pointer, as CuPy passes None
                converted.append(ctypes.c_void_p(None))
            else:
                converted.append(_C_TYPES[type(a)](a))
        getattr(self._lib, name)(*converted)


class RecordingLauncher:
    """Wraps a launcher and records the name of every kernel it runs, so a test can tell
    that the fused path (and not the plain one) was taken."""

    def __init__(self, launcher):
        self._launcher = launcher
        self.calls: list[str] = []

    def __call__(self, name: str, n_elements: int, args: tuple) -> None:
        self._launcher(name, n_elements, args)
        self.calls.append(name)
