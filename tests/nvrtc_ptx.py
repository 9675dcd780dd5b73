"""NVRTC, the compiler CuPy uses for ``swav_ref/fused/kernels.cu``, run without a GPU.

NVIDIA ships NVRTC as a pip wheel (``nvidia-cuda-nvrtc-cu12``, a dev dependency); it
compiles CUDA C++ to PTX, and to machine code for a named GPU, on any Linux or Windows
machine, GPU or not. This module drives its C API through ctypes (the five calls a
compile needs), so the test suite can check on every machine that the kernels compile as
CuPy will compile them on the GPU (:func:`compile_cuda`) and that the compiled entry
points take the parameters the Python wrappers pass (:func:`ptx_entry_parameters`).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path


def load_nvrtc() -> ctypes.CDLL | None:
    """The NVRTC library of NVIDIA's wheel, ``nvidia-cuda-nvrtc-cu12`` (or CUDA 13's
    ``nvidia-cuda-nvrtc``, laid out as ``nvidia/cu13``), or None without either."""
    import importlib

    for package in ("nvidia.cuda_nvrtc", "nvidia.cu13"):
        try:
            folders = importlib.import_module(package).__path__
        except ImportError:
            continue
        for folder in folders:
            found = [f for f in sorted((Path(folder) / "lib").glob("libnvrtc.so*"))
                     + sorted((Path(folder) / "bin").glob("nvrtc64*.dll")) if ".alt." not in f.name]
            if found:
                return ctypes.CDLL(str(found[0]))
    return None


class NvrtcError(RuntimeError):
    """A compile that failed, with NVRTC's log."""


def compile_cuda(nvrtc: ctypes.CDLL, source: str, name: str, options: list[str]) -> tuple[str, str, int]:
    """Compile ``source`` with ``options`` (e.g. ``-arch=sm_90``, as CuPy passes them).

    Returns ``(ptx, log, cubin_bytes)``: the PTX, the compiler's log (warnings; empty for
    a clean compile) and the size of the machine code when the architecture is a real GPU
    (``sm_XX``; 0 for a virtual ``compute_XX``). Raises :class:`NvrtcError` with the log
    when the source does not compile."""
    program = ctypes.c_void_p()
    _call(nvrtc, "nvrtcCreateProgram", ctypes.byref(program), source.encode(), name.encode(), 0, None, None)
    try:
        encoded = [o.encode() for o in options]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        log = _read(nvrtc, "nvrtcGetProgramLog", program)
        if status != 0:
            raise NvrtcError(f"NVRTC could not compile {name} with {options}:\n{log}")
        ptx = _read(nvrtc, "nvrtcGetPTX", program)
        cubin_size = ctypes.c_size_t(0)
        if any(re.search(r"sm_\d+", o) for o in options):
            _call(nvrtc, "nvrtcGetCUBINSize", program, ctypes.byref(cubin_size))
        return ptx, log, cubin_size.value
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def ptx_entry_parameters(ptx: str) -> dict[str, tuple[str, ...]]:
    """Every kernel entry point of ``ptx`` and its parameters' PTX types (``.u64`` for a
    pointer or a 64-bit integer, ``.u32`` for a 32-bit one, ``.f32``, ``.f64``)."""
    entries = {}
    for name, params in re.findall(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S):
        entries[name] = tuple(re.findall(r"\.param\s+(\.[a-z]+\d+)", params))
    return entries


def _read(nvrtc: ctypes.CDLL, getter: str, program: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    _call(nvrtc, getter + "Size", program, ctypes.byref(size))
    buffer = ctypes.create_string_buffer(size.value)
    _call(nvrtc, getter, program, buffer)
    return buffer.value.decode()


def _call(nvrtc: ctypes.CDLL, function: str, *args) -> None:
    status = getattr(nvrtc, function)(*args)
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise NvrtcError(f"{function} failed: {nvrtc.nvrtcGetErrorString(status).decode()}")
