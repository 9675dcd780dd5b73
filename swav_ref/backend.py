"""Which array library runs the numbers.

Every numerical function in swav_ref is written once, against the Python Array API
standard, and asks its inputs which library they belong to (SciPy's rule: array type in
equals array type out)::

    xp = array_namespace(scores)       # numpy, cupy or array_api_strict
    probs = xp.exp(scores - logsumexp(scores, axis=1, keepdims=True))

Three namespaces are known:

``numpy``
    the teaching backend, on the CPU.
``cupy``
    the GPU backend (the ``gpu`` extra: ``pip install -e ".[gpu]"`` in the checkout).
``array_api_strict``
    used only by the tests: a namespace with nothing but the standard in it, which proves
    that no NumPy-only call hides in code that must also run on CuPy.

The standard lacks a few things we need; they live here: :func:`logsumexp`,
:func:`to_numpy` (to the host, at the boundaries), and :class:`Random`, a seeded generator that draws
on the host with NumPy's PCG64 and moves the draws to the backend, so the same seed gives
the same numbers on every backend (this is what makes NumPy-versus-CuPy runs comparable).
"""

from __future__ import annotations

import importlib
import math
import numbers
import types
import warnings
from typing import Any

import numpy as np

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Random",
    "array_namespace",
    "asarray",
    "backend_name",
    "default_tol",
    "get_backend",
    "host_dtype",
    "is_cupy",
    "is_numpy",
    "logsumexp",
    "python_float",
    "python_int",
    "set_tf32",
    "synchronize",
    "to_numpy",
    "use_device_for_local_rank",
]

#: The backends a user can ask for by name.
BACKENDS = ("numpy", "cupy")
#: Every name :func:`get_backend` accepts: the above and the tests' ``array_api_strict``.
_ALL_NAMES = (*BACKENDS, "array_api_strict")

_GPU_EXTRA_HINT = (
    'install CuPy as a prebuilt wheel for your CUDA version: the gpu extra, '
    '`pip install -e ".[gpu]"` in the swav_ref checkout (cupy-cuda12x, for CUDA 12), '
    'or `pip install cupy-cuda13x` (CUDA 13)'
)


class BackendUnavailableError(RuntimeError):
    """The requested array backend cannot be used on this machine."""


def get_backend(name: str) -> types.ModuleType:
    """Return the array namespace called ``name``.

    Parameters
    ----------
    name : {"numpy", "cupy", "array_api_strict"}

    Raises
    ------
    BackendUnavailableError
        ``cupy`` is not installed, or it is installed but sees no usable GPU; the message
        says which of the two and how to install the ``gpu`` extra.
    ValueError
        an unknown name.
    """
    if name == "numpy":
        return np
    if name == "array_api_strict":
        return importlib.import_module("array_api_strict")
    if name != "cupy":
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(map(repr, _ALL_NAMES))}")
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'cupy' asked for, but CuPy is not installed ({exc}); {_GPU_EXTRA_HINT}"
        ) from exc
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, insufficient driver, ...
        raise BackendUnavailableError(
            "backend 'cupy' asked for: CuPy is installed but sees no usable GPU "
            f"({type(exc).__name__}: {exc}). Check `nvidia-smi` and that the CuPy wheel matches "
            f"the CUDA driver; {_GPU_EXTRA_HINT}"
        ) from exc
    if n_devices < 1:
        raise BackendUnavailableError(
            "backend 'cupy' asked for: CuPy is installed but found 0 GPUs; run on a machine "
            "with an NVIDIA GPU or use --backend numpy"
        )
    return cupy


#: Array type -> its namespace (``None`` for Python scalars), learnt on first sight. Every
#: layer asks for the namespace of its inputs, about a thousand times per resnet18 step, so
#: the answer is looked up by type rather than worked out again (the step's host time is
#: what a GPU waits on; see ``benchmarks/bench_host.py``).
_NAMESPACE_OF_TYPE: dict[type, types.ModuleType | None] = {
    type(None): None, bool: None, int: None, float: None, complex: None, np.ndarray: np,
}


def _namespace_of_type(x: Any) -> types.ModuleType | None:
    """Work out (and remember) the namespace of ``type(x)``."""
    if isinstance(x, (bool, int, float, complex)):  # subclasses of the Python scalars too
        xp = None
    elif isinstance(x, (np.ndarray, np.generic)):
        xp = np
    elif type(x).__module__.startswith("cupy"):
        # CuPy 14's ndarray does not answer __array_namespace__; the module is the namespace.
        xp = importlib.import_module("cupy")
    elif hasattr(x, "__array_namespace__"):
        xp = x.__array_namespace__()
        if getattr(xp, "__name__", "").startswith("numpy"):
            xp = np  # numpy 2 answers with the numpy module itself; keep one identity
    else:
        raise TypeError(f"not an array: {type(x).__name__}")
    _NAMESPACE_OF_TYPE[type(x)] = xp
    return xp


def array_namespace(*arrays: Any) -> types.ModuleType:
    """The namespace of the given arrays (Python scalars and ``None`` are ignored).

    Raises ``TypeError`` if the arrays come from different libraries, so that a NumPy
    array never meets a CuPy array silently.
    """
    found = None
    for x in arrays:
        try:
            xp = _NAMESPACE_OF_TYPE[type(x)]
        except KeyError:
            xp = _namespace_of_type(x)
        if xp is None:
            continue
        if found is not None and xp is not found:
            raise TypeError(
                f"arrays from different libraries: {found.__name__} and {xp.__name__}; "
                "move them to one backend first (swav_ref.backend.asarray)"
            )
        found = xp
    return np if found is None else found


def backend_name(xp: types.ModuleType) -> str:
    """``"numpy"``, ``"cupy"`` or ``"array_api_strict"`` for a namespace."""
    return xp.__name__.split(".")[0]


def is_numpy(xp: types.ModuleType) -> bool:
    """Whether the namespace ``xp`` is NumPy itself."""
    return xp is np


def is_cupy(xp: types.ModuleType) -> bool:
    """Whether the namespace ``xp`` is CuPy (the GPU backend)."""
    return backend_name(xp) == "cupy"


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy (or view) of any backend's array. For the host boundaries only
    (logs, plots, input checks, the solvers that run on the host, saving): on a GPU every
    call waits for the device and copies, so numerical code never calls it inside a loop."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (np.generic, bool, int, float)):
        return np.asarray(x)
    if hasattr(x, "get") and is_cupy(array_namespace(x)):
        return x.get()
    try:
        return np.from_dlpack(x)
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return np.asarray(x)


def asarray(x: Any, xp: types.ModuleType, dtype: Any = None) -> Any:
    """Move ``x`` (host data or another backend's array) onto the backend ``xp``.

    ``dtype`` may be a dtype of ``xp`` or a name such as ``"float32"``.
    """
    if isinstance(dtype, str):
        dtype = getattr(xp, dtype)
    if not isinstance(x, np.ndarray) and not isinstance(x, (list, tuple, int, float)):
        if array_namespace(x) is not xp:
            x = to_numpy(x)
    return xp.asarray(x, dtype=dtype)


def python_float(value: Any, name: str) -> float:
    """``value`` as a Python ``float``; ``ValueError`` naming ``name`` unless it is a finite
    real number.

    Hyperparameters (learning rate, momentum, epsilon, temperature) go through here where
    they enter numerical code, for two reasons. A NumPy scalar such as ``np.float64(0.9)``
    times a float32 array gives float64 under NumPy 2's promotion rules (and
    array_api_strict refuses it), where a Python float takes the array's dtype: state
    updated every step would silently become float64. And a 0-d device array is refused
    rather than read back to the host, a sync, at every call.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def python_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as a Python ``int`` (NumPy integers accepted, ``bool`` not); ``ValueError``
    naming ``name`` unless it is an integer >= ``minimum``. Sizes and counts go through here
    so that a 0 or a 2.5 is refused where it enters, not found later deep inside NumPy."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def default_tol(dtype: Any) -> float:
    """A marginal-error tolerance that the dtype can actually reach.

    float64 reaches 1e-9 comfortably; float32 (machine epsilon about 1.2e-7) stalls near
    1e-6 on problems of a few thousand entries, so it gets 1e-5.
    """
    return 1e-9 if host_dtype(dtype).itemsize >= 8 else 1e-5


def host_dtype(dtype: Any) -> np.dtype:
    """NumPy's dtype for any backend's dtype (array_api_strict prints as ``...float32``)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1])


def logsumexp(x: Any, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Any:
    r"""``log(sum(exp(x), axis))`` without overflow.

    Notes
    -----
    .. math:: \operatorname{lse}(x) = m + \log \sum_i e^{x_i - m}, \qquad m = \max_i x_i

    The shift by the maximum keeps every exponent <= 0. Where the maximum is ``-inf`` (all
    entries ``-inf``) the result is ``-inf``, not NaN; a NaN entry makes the result NaN, as
    in ``scipy.special.logsumexp``.
    """
    xp = array_namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    total = xp.sum(xp.exp(x - m), axis=axis, keepdims=True)
    positive = total > 0
    # a sum of exponentials is 0 (all -inf: log 0 = -inf), positive, or NaN (kept)
    log_total = xp.where(positive, xp.log(xp.where(positive, total, 1.0)), xp.where(total == 0, -xp.inf, total))
    out = log_total + m
    if not keepdims:
        out = xp.squeeze(out, axis=axis) if axis is not None else xp.reshape(out, ())
    return out


def synchronize(xp: types.ModuleType) -> None:
    """Wait for the device to finish queued work (a no-op off the GPU); for timing only."""
    if is_cupy(xp):
        xp.cuda.get_current_stream().synchronize()


def use_device_for_local_rank(xp: types.ModuleType, local_rank: int, local_size: int = 1) -> int | None:
    """Make GPU ``local_rank mod n_gpus`` this process's current CuPy device; return its
    number (``None`` for the CPU backends, which have no device to choose).

    CuPy allocates on the current device, GPU 0 unless told otherwise, so without this
    every MPI rank on a machine would share GPU 0 while the others sat idle. Call it before
    the first allocation. ``local_rank`` is the process's place among the ranks on its
    machine (:attr:`swav_ref.distributed.MPICommunicator.local_rank`). A process alone on
    its machine (``local_size == 1``) keeps whatever device is current, so a single run
    stays on the GPU its user chose. Where the launcher already gives each rank one GPU
    (``CUDA_VISIBLE_DEVICES`` per rank, as Slurm's ``--gpus-per-task=1`` does), each
    process sees a single device and this picks it. More ranks than the GPUs they see
    still works, several ranks to a GPU: with two or more GPUs visible, with a warning
    (from the first local rank); with one, silently, since that is how a launcher that
    pins one GPU per rank looks.
    """
    if not is_cupy(xp):
        return None
    if local_size == 1:
        return xp.cuda.Device().id
    n_devices = xp.cuda.runtime.getDeviceCount()
    if 1 < n_devices < local_size and local_rank == 0:  # one device seen: the launcher pinned it
        warnings.warn(f"{local_size} processes share the {n_devices} GPUs of this machine, so several "
                      "run on one GPU; start at most one process per GPU", RuntimeWarning, stacklevel=2)
    device = local_rank % n_devices
    xp.cuda.Device(device).use()
    return device


def set_tf32(xp: types.ModuleType, enabled: bool) -> None:
    """Let float32 matrix products on CuPy use TF32 tensor cores (or forbid it again).

    TF32 rounds the inputs of a product to 10 mantissa bits (about 3 significant digits
    instead of 7) and accumulates in float32; on Ampere and later GPUs that makes the GEMMs,
    which are most of a ResNet step, several times faster. It reaches CuPy's 2-d matrix
    products (the convolutions' and the linear layers' GEMMs); CuPy 13's batched (3-d)
    products ignore it, so BatchNorm's per-channel sums of squares stay in float32 there.
    PyTorch does this by default for convolutions (``torch.backends.cudnn.allow_tf32``), so
    a like-for-like benchmark sets both libraries the same way. Off by default here: the teaching code computes in true float32.
    A no-op for NumPy (CPUs have no TF32). The setting is per process; the trainer sets it
    from its config, which overrides ``CUPY_TF32`` from the environment.
    """
    if not is_cupy(xp):
        return
    try:  # CuPy reads CUPY_TF32 once per dtype; this is the call that changes it afterwards
        from cupy._core import _routines_linalg as linalg

        linalg.set_compute_type(xp.float32, _CUPY_COMPUTE_TYPE_TF32 if enabled else _CUPY_COMPUTE_TYPE_DEFAULT)
    except Exception as exc:  # CuPy internals moved, or no usable device to ask
        if not enabled:
            return  # nothing was switched on, so there is nothing to switch off
        raise BackendUnavailableError(
            f"this CuPy ({xp.__version__}) does not expose its matmul compute type ({exc}); "
            "set the environment variable CUPY_TF32=1 before starting Python instead"
        ) from exc


# CuPy's cuBLAS compute types (cupy/_core/_routines_linalg.pxd): the default, and TF32.
_CUPY_COMPUTE_TYPE_DEFAULT = 1
_CUPY_COMPUTE_TYPE_TF32 = 7


class Random:
    """A seeded random generator that gives the same numbers on every backend.

    Draws are made on the host by NumPy's PCG64 and then moved to the backend ``xp``.
    The draws SwAV needs per step are small (crop boxes, flips, jitter factors, an
    initialisation), so the transfer costs nothing worth measuring, and the result is that
    a seed means the same thing on NumPy and on CuPy.

    Parameters
    ----------
    seed : int or numpy.random.SeedSequence
    xp
        the namespace the draws are returned in (default NumPy).
    """

    def __init__(self, seed: int | np.random.SeedSequence = 0, xp: types.ModuleType = np):
        self.xp = xp
        self._gen = np.random.Generator(np.random.PCG64(seed))

    # -- draws ---------------------------------------------------------------------------
    def _out(self, a: np.ndarray, dtype: Any) -> Any:
        if isinstance(dtype, str):
            dtype = getattr(self.xp, dtype)
        return self.xp.asarray(a, dtype=dtype) if dtype is not None else self.xp.asarray(a)

    def normal(self, shape, loc=0.0, scale=1.0, dtype="float64"):
        """Gaussian draws of ``shape`` on the backend."""
        return self._out(self._gen.normal(loc, scale, size=shape), dtype)

    def uniform(self, shape, low=0.0, high=1.0, dtype="float64"):
        """Uniform draws in ``[low, high)`` of ``shape`` on the backend."""
        return self._out(self._gen.uniform(low, high, size=shape), dtype)

    def integers(self, low, high, shape, dtype="int64"):
        """Integers in ``[low, high)`` of ``shape`` on the backend."""
        return self._out(self._gen.integers(low, high, size=shape), dtype)

    def permutation(self, n: int):
        """A random permutation of ``range(n)`` as a host NumPy array (used for indexing
        host data, so it stays on the host)."""
        return self._gen.permutation(n)

    def host(self) -> np.random.Generator:
        """The underlying NumPy generator, for host-side draws (data order, splits)."""
        return self._gen

    # -- state, for checkpoints ----------------------------------------------------------
    def get_state(self) -> dict:
        """The generator's state as a JSON-serialisable dict."""
        return self._gen.bit_generator.state

    def set_state(self, state: dict) -> None:
        self._gen.bit_generator.state = state
