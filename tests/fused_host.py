"""The fused CUDA kernels compiled as C++ and run on the CPU, for tests without a GPU.

``swav_ref/fused/kernels.cu`` is compiled by the system C++ compiler with
``tests/cuda_host_shim.h`` (which turns a launch into one thread that visits every
element) into a shared library, and :class:`HostLauncher` calls its exported functions
through ctypes on NumPy arrays. Registered with :func:`swav_ref.fused.register_launcher`,
it sends the library's NumPy code through the very kernels CuPy compiles, so their index
arithmetic and formulas are tested on every machine. (Registered for single tests only,
by the ``fused_lane`` fixture: a normal NumPy run never uses the kernels.)

Each call's arguments are checked against the kernel's C signature, read from the
source (:func:`kernel_signatures`), as strictly as CuPy packs them: CuPy lays scalars out
by their exact type, so an ``np.int64`` handed to an ``int`` parameter shifts every later
argument on a GPU, where on the CPU ctypes would quietly pass its low 32 bits.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from swav_ref.fused import KERNEL_SOURCE

SHIM = Path(__file__).with_name("cuda_host_shim.h")

#: The kernels' C scalar types, their NumPy scalar types (what the wrappers must pass) and
#: ctypes types. ``T`` and ``I`` of the source become these in the exported variants.
SCALARS = {"int": (np.int32, ctypes.c_int), "long long": (np.int64, ctypes.c_longlong),
           "float": (np.float32, ctypes.c_float), "double": (np.float64, ctypes.c_double)}
_VARIANTS = {"f32_i32": ("float", "int"), "f32_i64": ("float", "long long"),
             "f64_i32": ("double", "int"), "f64_i64": ("double", "long long")}


def kernel_signatures(source: str | None = None) -> dict[str, tuple[str, ...]]:
    """Every exported kernel (``im2col_f32_i32``, ...) and its parameters' C types, from
    the ``#define NAME_PARAMS(T, I) (...)`` and ``SWAV_EXPORT(name, NAME_PARAMS, ...)``
    lines of ``kernels.cu``: a pointer as ``"float*"``, a scalar as ``"int"`` (``const``
    and parameter names dropped)."""
    source = KERNEL_SOURCE.read_text() if source is None else source
    param_lists = dict(re.findall(r"#define\s+(\w+_PARAMS)\(T, I\)\s*\((.*)\)", source))
    signatures = {}
    for kernel, macro in re.findall(r"^SWAV_EXPORT\((\w+),\s*(\w+_PARAMS),", source, re.M):
        for variant, (float_type, index_type) in _VARIANTS.items():
            types = []
            for param in param_lists[macro].split(","):
                words = param.replace("*", " * ").split()[:-1]  # drop the parameter's name
                words = [{"T": float_type, "I": index_type}.get(w, w) for w in words if w != "const"]
                types.append("".join(words[:-1]) + "*" if words[-1] == "*" else " ".join(words))
            signatures[f"{kernel}_{variant}"] = tuple(types)
    return signatures


def check_arguments(name: str, args: tuple, signature: tuple[str, ...]) -> None:
    """Raise TypeError unless ``args`` are what ``signature`` takes, type for type: an
    array of the pointee's dtype (or None, a null pointer) for each pointer, and the exact
    NumPy scalar type for each scalar (a Python int or float has no fixed C type)."""
    if len(args) != len(signature):
        raise TypeError(f"{name} takes {len(signature)} arguments, got {len(args)}")
    for position, (arg, c_type) in enumerate(zip(args, signature)):
        if c_type.endswith("*"):
            dtype = SCALARS[c_type[:-1]][0]
            if not (arg is None or (isinstance(arg, np.ndarray) and arg.dtype == dtype)):
                got = arg.dtype if isinstance(arg, np.ndarray) else type(arg).__name__
                raise TypeError(f"{name} argument {position} ({c_type}): wants a {np.dtype(dtype)} array, got {got}")
        elif type(arg) is not SCALARS[c_type][0]:
            raise TypeError(f"{name} argument {position} ({c_type}): wants np.{SCALARS[c_type][0].__name__}, "
                            f"got {type(arg).__name__} {arg!r}")


def find_compiler() -> str | None:
    """The path of a C++ compiler on the PATH, or ``None``."""
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def compile_host_library(directory: Path) -> Path | None:
    """Compile the kernels into ``directory``; ``None`` when no C++ compiler is found."""
    compiler = find_compiler()
    if compiler is None:
        return None
    library = directory / "swav_fused_host.so"
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-x", "c++", "-include", str(SHIM),
                    str(KERNEL_SOURCE), "-o", str(library)], check=True, capture_output=True, text=True)
    return library


class HostLauncher:
    """Runs a kernel of the host library on NumPy arrays (the launcher interface of
    :func:`swav_ref.fused.register_launcher`), after :func:`check_arguments`."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        self._signatures = kernel_signatures()
        self._functions: dict[str, ctypes._CFuncPtr] = {}

    def __call__(self, name: str, n_elements: int, args: tuple) -> None:
        signature = self._signatures[name]
        check_arguments(name, args, signature)
        function = self._functions.get(name)
        if function is None:
            function = self._functions[name] = getattr(self._lib, name)
            function.argtypes = [ctypes.c_void_p if t.endswith("*") else SCALARS[t][1] for t in signature]
        function(*[a.ctypes.data if isinstance(a, np.ndarray) else None if a is None else a.item() for a in args])


class RecordingLauncher:
    """Wraps a launcher and records the name of every kernel it runs, so a test can tell
    that the fused path (and not the plain one) was taken."""

    def __init__(self, launcher):
        self._launcher = launcher
        self.calls: list[str] = []

    def __call__(self, name: str, n_elements: int, args: tuple) -> None:
        self._launcher(name, n_elements, args)
        self.calls.append(name)
