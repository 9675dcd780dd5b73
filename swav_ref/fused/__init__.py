"""Fused CUDA kernels behind the CuPy backend, with the plain array code as the reference.

On a GPU every array operation is a kernel launch that reads and writes whole arrays, so a
formula such as BatchNorm's :math:`y = \\gamma (x - \\mu) / \\sigma + \\beta`, written as four
array operations, moves four times the data it needs and pays four launches. The kernels
in ``kernels.cu`` (next to this file) do such chains in one pass:

================================  =====================================================
kernel                            replaces (plain array code, still the reference)
================================  =====================================================
``im2col`` / ``col2im``           a padded copy and ``kh * kw`` strided slice copies
``batchnorm_variance``            ``var = ss / m; invstd = 1 / sqrt(var + eps)`` (4 ops)
``batchnorm_scale_shift``         ``xhat = centred * invstd; y = xhat * w + b``
``batchnorm_backward_input``      BatchNorm's input gradient (4 passes, 4 vector ops)
``batchnorm_running_update``      the running mean and variance (7 vector ops)
``relu_backward``                 ``g * (y > 0)`` (compare, cast, multiply)
``sgd_update`` / ``lars_update``  the five to fifteen small operations of one update
``sum_of_squares``                ``sum(p * p)`` for LARS's norms (a CuPy reduction kernel)
``shifted_exp``                   ``exp((s - max) / eps)`` in SwAV's Sinkhorn codes
``divide_columns`` / ``_rows``    a normalisation step of the Sinkhorn iterations
================================  =====================================================

Each public function here launches one kernel on the arrays it is given. The numerical
modules call them only when :func:`usable` says so: CuPy arrays (or, in the tests, NumPy
arrays with the kernels compiled for the CPU, see :func:`register_launcher`) of float32
or float64, C-contiguous, of one dtype, with fused kernels enabled. Everywhere else, including every NumPy
run, the plain code runs, so reading ``swav_ref.nn.functional`` still tells the whole
story. Set ``SWAV_REF_FUSED=0`` in the environment, or use :func:`disabled`, to run the
plain code on CuPy too (to compare, or to rule the kernels out when hunting a bug).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from swav_ref.backend import array_namespace, backend_name

__all__ = [
    "KERNEL_SOURCE",
    "applies",
    "batchnorm_backward_input",
    "batchnorm_running_update",
    "batchnorm_scale_shift",
    "batchnorm_variance",
    "col2im",
    "dense",
    "disabled",
    "divide_columns",
    "divide_rows",
    "enabled",
    "im2col",
    "is_dense",
    "lars_update",
    "launcher_registered",
    "register_launcher",
    "relu_backward",
    "sgd_update",
    "shifted_exp",
    "sum_of_squares",
    "usable",
]

#: The CUDA source of every kernel (compiled by NVRTC through CuPy on first use).
KERNEL_SOURCE = Path(__file__).with_name("kernels.cu")

#: Threads per block. The kernels are memory-bound and element-wise; 256 is a safe choice on
#: every NVIDIA GPU since Kepler.
BLOCK_SIZE = 256
#: Blocks per launch at most; the grid-stride loop in each kernel covers the rest.
MAX_BLOCKS = 65535
#: Below this many elements a kernel indexes with 32-bit integers (much cheaper division on
#: a GPU). The margin keeps ``index + grid size`` below 2^31 in the grid-stride loop.
INT32_LIMIT = 2**31 - BLOCK_SIZE * MAX_BLOCKS - 1

_state = {"enabled": os.environ.get("SWAV_REF_FUSED", "1") != "0"}

Launcher = Callable[[str, int, tuple], None]
_launchers: dict[str, Launcher] = {}


def enabled() -> bool:
    """Whether fused kernels are used where they apply (default True; ``SWAV_REF_FUSED=0``
    in the environment turns them off)."""
    return _state["enabled"]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run a block with the plain array code only (the reference), then restore."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def register_launcher(backend: str, launcher: Launcher | None) -> None:
    """Make the kernels available for arrays of ``backend`` (``None`` removes it).

    A launcher is called as ``launcher(kernel_name, n_elements, args)`` and runs the kernel
    (the exported name, e.g. ``"im2col_f32_i32"``) over ``n_elements`` with ``args``. CuPy's
    launcher is built in; the test suite registers one for NumPy that runs the same source
    compiled as C++ on the CPU.
    """
    if launcher is None:
        _launchers.pop(backend, None)
    else:
        _launchers[backend] = launcher


@contextlib.contextmanager
def launcher_registered(backend: str, launcher: Launcher | None) -> Iterator[None]:
    """Run a block with ``launcher`` for ``backend`` (see :func:`register_launcher`), then
    put back whatever was there before: nothing, CuPy's built-in launcher, or the one a
    test session registered for NumPy."""
    before = _launchers.get(backend)
    register_launcher(backend, launcher)
    try:
        yield
    finally:
        register_launcher(backend, before)


def _launcher_for(xp: Any) -> Launcher | None:
    name = backend_name(xp)
    if name == "cupy" and name not in _launchers:
        _launchers[name] = _CupyLauncher()
    return _launchers.get(name)


def applies(xp: Any, dtype: Any) -> bool:
    """True when a fused kernel should replace the plain code for arrays of ``xp`` and
    ``dtype``: kernels enabled, a launcher for this backend, and float32 or float64."""
    if not _state["enabled"] or backend_name(xp) not in ("cupy", *_launchers):
        return False
    return dtype == xp.float32 or dtype == xp.float64


def usable(*arrays: Any) -> bool:
    """True when a kernel can take these arrays as they are: :func:`applies` to their
    namespace and dtype, all C-contiguous, all of one dtype. The callers' test before
    choosing the fused path (anything else takes the plain code, which promotes dtypes and
    reads any layout)."""
    xp = array_namespace(*arrays)
    first = arrays[0].dtype
    return applies(xp, first) and all(a.dtype == first and is_dense(a) for a in arrays)


def is_dense(a: Any) -> bool:
    """True when ``a`` is C-contiguous, the layout every kernel reads and writes."""
    return bool(a.flags.c_contiguous)


def dense(a: Any) -> Any:
    """``a`` itself when C-contiguous, else a C-contiguous copy (NumPy and CuPy arrays)."""
    return a if is_dense(a) else array_namespace(a).ascontiguousarray(a)


class _CupyLauncher:
    """Compiles ``kernels.cu`` once per process with NVRTC (CuPy caches the binary on disk)
    and launches its functions on the current stream."""

    def __init__(self) -> None:
        import cupy

        self._module = cupy.RawModule(code=KERNEL_SOURCE.read_text())  # plain C++11: any NVRTC
        self._functions: dict[str, Any] = {}

    def __call__(self, name: str, n_elements: int, args: tuple) -> None:
        function = self._functions.get(name)
        if function is None:
            try:
                function = self._functions[name] = self._module.get_function(name)
            except Exception as exc:  # NVRTC missing or failing: say so, and how to go on
                raise RuntimeError(
                    f"could not compile the fused kernel {name} from {KERNEL_SOURCE} "
                    f"({type(exc).__name__}: {exc}); set SWAV_REF_FUSED=0 to run the plain CuPy code"
                ) from exc
        blocks = max(1, min(MAX_BLOCKS, math.ceil(n_elements / BLOCK_SIZE)))
        function((blocks,), (BLOCK_SIZE,), args)


def _launch(kernel: str, reference: Any, n_elements: int, make_args: Callable[[Any, Any], tuple],
            index_extent: int = 0) -> None:
    """Run ``kernel`` on ``n_elements`` with the float and index types of ``reference``.

    The index type is 32-bit only if every array the kernel touches has fewer than
    :data:`INT32_LIMIT` elements: ``index_extent`` is the largest (col2im reads ``kh * kw``
    times more than it writes, a strided im2col reads more than it writes).

    ``make_args(T, I)`` builds the argument tuple with scalars cast to the kernel's float
    type ``T`` and index type ``I`` (NumPy scalar types: CuPy passes them by their exact C
    type, where a Python int or float would not match a ``float`` or ``int`` parameter).
    """
    xp = array_namespace(reference)
    launcher = _launcher_for(xp)
    if launcher is None:
        raise RuntimeError(f"no fused-kernel launcher for backend {backend_name(xp)!r}")
    if n_elements == 0:
        return
    if reference.dtype == xp.float32:
        float_type, float_name = np.float32, "f32"
    elif reference.dtype == xp.float64:
        float_type, float_name = np.float64, "f64"
    else:
        raise TypeError(f"fused kernel {kernel}: float32 or float64 arrays only, got {reference.dtype}")
    extent = max(n_elements, index_extent)
    index_type, index_name = (np.int32, "i32") if extent < INT32_LIMIT else (np.int64, "i64")
    launcher(f"{kernel}_{float_name}_{index_name}", n_elements, make_args(float_type, index_type))


def _check_inputs(kernel: str, *arrays: Any) -> None:
    """Every array C-contiguous and of the first one's dtype: a kernel reads raw memory, so
    a float64 vector handed to a float32 kernel would be read as garbage, not converted.

    (Here and in every wrapper below a check is ``if ...: raise``, so that its message is
    formatted only when it fails: each launch's host time is time a GPU may wait for.)"""
    for a in arrays:
        if not is_dense(a):
            raise ValueError(f"fused kernel {kernel}: inputs must be C-contiguous, got strides {a.strides}")
        if a.dtype != arrays[0].dtype:
            raise TypeError(f"fused kernel {kernel}: all arrays must be {arrays[0].dtype}, got one of {a.dtype}")


# ---------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------


def im2col(x_t: Any, out: Any, kernel_size: tuple[int, int], stride: int, padding: int) -> Any:
    r"""Fill ``out`` (C kh kw, H_out W_out N) with the windows of ``x_t`` (C, H, W, N).

    The same numbers as :func:`swav_ref.nn.functional.im2col` (see there for the layout);
    the padding is never materialised: a window cell outside the image reads 0.
    """
    c, h, w, n = x_t.shape
    kh, kw = kernel_size
    out_h = (h + 2 * padding - kh) // stride + 1
    out_w = (w + 2 * padding - kw) // stride + 1
    _check_inputs("im2col", x_t, out)
    if not (tuple(out.shape) == (c * kh * kw, out_h * out_w * n) and out.dtype == x_t.dtype):
        raise ValueError(f"fused im2col: out must be {(c * kh * kw, out_h * out_w * n)} {x_t.dtype}, got {out.shape} {out.dtype}")
    _launch("im2col", x_t, out.size,
            lambda T, I: (x_t, out, I(c), I(h), I(w), I(n), I(kh), I(kw), I(stride), I(padding), I(out_h), I(out_w)),
            index_extent=x_t.size)
    return out


def col2im(dcols: Any, chwn_shape: tuple[int, int, int, int], kernel_size: tuple[int, int],
           stride: int, padding: int) -> Any:
    r"""The adjoint of :func:`im2col`: a new (C, H, W, N) array where every pixel holds the
    sum of the column entries that came from it (one gather per pixel, no atomics)."""
    xp = array_namespace(dcols)
    c, h, w, n = chwn_shape
    kh, kw = kernel_size
    out_h = (h + 2 * padding - kh) // stride + 1
    out_w = (w + 2 * padding - kw) // stride + 1
    _check_inputs("col2im", dcols)
    if tuple(dcols.shape) != (c * kh * kw, out_h * out_w * n):
        raise ValueError(f"fused col2im: dcols must be {(c * kh * kw, out_h * out_w * n)}, got {dcols.shape}")
    dx_t = xp.empty((c, h, w, n), dtype=dcols.dtype)
    _launch("col2im", dcols, dx_t.size,
            lambda T, I: (dcols, dx_t, I(c), I(h), I(w), I(n), I(kh), I(kw), I(stride), I(padding), I(out_h), I(out_w)),
            index_extent=dcols.size)
    return dx_t


# ---------------------------------------------------------------------------------------
# BatchNorm, ReLU
# ---------------------------------------------------------------------------------------


def batchnorm_scale_shift(centred: Any, invstd: Any, weight: Any, bias: Any) -> tuple[Any, Any]:
    r"""For the (C, M) centred channel rows: :math:`\hat x = (x - \mu) \sigma^{-1}`, written
    over ``centred`` (which must be a fresh array of the caller's), and a new
    :math:`y = \gamma \hat x + \beta`. Returns ``(xhat, y)``."""
    xp = array_namespace(centred)
    c, m = centred.shape
    _check_inputs("batchnorm_scale_shift", centred, invstd, weight, bias)
    y = xp.empty_like(centred)
    _launch("batchnorm_scale_shift", centred, centred.size,
            lambda T, I: (centred, invstd, weight, bias, y, I(c), I(m)))
    return centred, y


def batchnorm_variance(sum_sq: Any, count: float, eps: float) -> tuple[Any, Any]:
    r"""From the (C,) sums of squared centred values: new arrays
    :math:`\sigma^2 = \text{sum\_sq} / m` and :math:`1 / \sqrt{\sigma^2 + \epsilon}`, in one
    launch instead of four. Returns ``(var, invstd)``."""
    xp = array_namespace(sum_sq)
    _check_inputs("batchnorm_variance", sum_sq)
    if sum_sq.ndim != 1:
        raise ValueError(f"fused batchnorm_variance: sum_sq must be (C,), got {sum_sq.shape}")
    var, invstd = xp.empty_like(sum_sq), xp.empty_like(sum_sq)
    c = sum_sq.shape[0]
    _launch("batchnorm_variance", sum_sq, c, lambda T, I: (sum_sq, var, invstd, I(c), T(count), T(eps)))
    return var, invstd


def batchnorm_backward_input(g: Any, xhat: Any, sum_dy: Any, sum_dy_xhat: Any, weight: Any, invstd: Any,
                             count: float) -> Any:
    r"""Training-mode BatchNorm input gradient on (C, M) rows, from the channel sums
    :math:`\sum g` and :math:`\sum g \hat x` over ``count`` values:
    :math:`(g - \overline{g} - \hat x\, \overline{g \hat x})\, \gamma / \sigma` in one launch
    (the means and :math:`\gamma / \sigma` are formed inside it)."""
    xp = array_namespace(g)
    c, m = g.shape
    _check_inputs("batchnorm_backward_input", g, xhat, sum_dy, sum_dy_xhat, weight, invstd)
    if not (tuple(xhat.shape) == (c, m) and all(tuple(v.shape) == (c,) for v in (sum_dy, sum_dy_xhat, weight, invstd))):
        raise ValueError(f"fused batchnorm_backward_input: xhat must be {(c, m)} and the four vectors ({c},), got {xhat.shape}, "
                         f"{sum_dy.shape}, {sum_dy_xhat.shape}, {weight.shape}, {invstd.shape}")
    dx = xp.empty_like(g)
    _launch("batchnorm_backward_input", g, g.size,
            lambda T, I: (g, xhat, sum_dy, sum_dy_xhat, weight, invstd, dx, I(c), I(m), T(count)))
    return dx


def batchnorm_running_update(running_mean: Any, running_var: Any, mean: Any, var: Any, momentum: float,
                             unbias: float) -> tuple[Any, Any]:
    r"""PyTorch's running-statistics rule as new (C,) arrays, in one launch instead of seven:
    :math:`(1 - \rho)\hat\mu + \rho\mu` and :math:`(1 - \rho)\hat\sigma^2 + \rho\, u\, \sigma^2`
    with ``unbias`` :math:`u = m / (m - 1)`."""
    xp = array_namespace(running_mean)
    _check_inputs("batchnorm_running_update", running_mean, running_var, mean, var)
    c = running_mean.shape[0]
    if not all(a.shape == (c,) for a in (running_var, mean, var)):
        raise ValueError(f"fused batchnorm_running_update: four ({c},) vectors expected, got "
                         f"{running_var.shape}, {mean.shape}, {var.shape}")
    new_mean, new_var = xp.empty_like(running_mean), xp.empty_like(running_var)
    _launch("batchnorm_running_update", running_mean, c, lambda T, I: (
        running_mean, running_var, mean, var, new_mean, new_var, I(c), T(momentum), T(1.0 - momentum), T(unbias)))
    return new_mean, new_var


def relu_backward(g: Any, y: Any) -> Any:
    """``g`` where ``y > 0``, else 0, for two C-contiguous arrays of one shape."""
    xp = array_namespace(g, y)
    _check_inputs("relu_backward", g, y)
    if tuple(g.shape) != tuple(y.shape):
        raise ValueError(f"fused relu_backward: shapes differ, {g.shape} and {y.shape}")
    dx = xp.empty_like(g)
    _launch("relu_backward", g, g.size, lambda T, I: (g, y, dx, I(g.size)))
    return dx


# ---------------------------------------------------------------------------------------
# Optimiser updates (in place)
# ---------------------------------------------------------------------------------------


def sgd_update(p: Any, g: Any, buf: Any, lr: float, momentum: float, weight_decay: float, first: bool) -> None:
    """SGD with momentum on one parameter, in place on ``p`` and ``buf`` (``buf=None``:
    no momentum; the kernel gets a null pointer it never reads). ``first``: the buffer
    starts as the gradient (PyTorch's rule)."""
    _check_inputs("sgd_update", p, g, *(() if buf is None else (buf,)))
    has_buffer = buf is not None
    _launch("sgd_update", p, p.size, lambda T, I: (
        p, g, buf, I(p.size), T(lr), T(momentum), T(weight_decay),
        np.int32(first), np.int32(has_buffer)))


def lars_update(p: Any, g: Any, buf: Any, p_sq_sum: Any, g_sq_sum: Any, lr: float, momentum: float,
                weight_decay: float, trust_coefficient: float, eps: float, first: bool) -> None:
    """LARS (LARC + SGD) on one parameter, in place, from the sums of squares of ``p`` and
    ``g`` as 1-element (or 0-d) arrays on the device; the kernel takes their square roots
    (see :class:`swav_ref.nn.optim.LARS` for the formula)."""
    _check_inputs("lars_update", p, g, p_sq_sum, g_sq_sum, *(() if buf is None else (buf,)))
    if not (p_sq_sum.size == 1 and g_sq_sum.size == 1):
        raise ValueError(f"fused lars_update: one sum of squares each, got {p_sq_sum.shape} and {g_sq_sum.shape}")
    has_buffer = buf is not None
    _launch("lars_update", p, p.size, lambda T, I: (
        p, g, buf, p_sq_sum, g_sq_sum, I(p.size), T(lr), T(momentum),
        T(weight_decay), T(trust_coefficient), T(eps), np.int32(first), np.int32(has_buffer)))


_SUM_OF_SQUARES: list[Any] = []  # the CuPy reduction kernel, built on first use


def sum_of_squares(a: Any) -> Any:
    r""":math:`\sum_i a_i^2` over all of ``a``, as a 1-element array on ``a``'s device (the
    input of :func:`lars_update`).

    On CuPy one reduction launch (a ``cupy.ReductionKernel`` that squares as it sums: CuPy's
    own reduction machinery, so not in ``kernels.cu``); elsewhere the plain two operations
    ``sum(a * a)``. Not a dot product: CuPy may run those on TF32 tensor cores."""
    xp = array_namespace(a)
    if backend_name(xp) != "cupy" or not _state["enabled"]:
        return xp.sum(a * a, keepdims=True)
    if not _SUM_OF_SQUARES:
        _SUM_OF_SQUARES.append(xp.ReductionKernel("T x", "T y", "x * x", "a + b", "y = a", "0", "swav_sum_of_squares"))
    return _SUM_OF_SQUARES[0](a, axis=None, keepdims=True)


# ---------------------------------------------------------------------------------------
# Sinkhorn codes
# ---------------------------------------------------------------------------------------


def shifted_exp(scores: Any, shift: Any, epsilon: float) -> Any:
    r"""A new (B, K) array :math:`\exp((S_{bk} - m_k) / \varepsilon)` for ``shift`` :math:`m` of
    K entries."""
    xp = array_namespace(scores)
    b, k = scores.shape
    _check_inputs("shifted_exp", scores, shift)
    if shift.size != k:
        raise ValueError(f"fused shifted_exp: shift must have {k} entries, got {shift.shape}")
    q = xp.empty_like(scores)
    _launch("shifted_exp", scores, q.size, lambda T, I: (scores, shift, q, I(b), I(k), T(1.0 / epsilon)))
    return q


def divide_columns(q: Any, sums: Any, factor: Any) -> Any:
    """In place, ``q[b, k] /= sums[k] * factor`` (``factor`` a 1-element array). Returns ``q``."""
    return _divide("divide_columns", q, sums, factor, q.shape[1])


def divide_rows(q: Any, sums: Any, factor: Any) -> Any:
    """In place, ``q[b, k] /= sums[b] * factor`` (``factor`` a 1-element array). Returns ``q``."""
    return _divide("divide_rows", q, sums, factor, q.shape[0])


def _divide(kernel: str, q: Any, sums: Any, factor: Any, expected: int) -> Any:
    b, k = q.shape
    _check_inputs(kernel, q, sums, factor)
    if not (sums.size == expected and factor.size == 1):
        raise ValueError(f"fused {kernel}: sums must have {expected} entries and factor 1, got {sums.shape}, {factor.shape}")
    _launch(kernel, q, q.size, lambda T, I: (q, sums, factor, I(b), I(k)))
    return q
