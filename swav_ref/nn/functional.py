"""Pure forward/backward pairs, CS231n style.

Each operation is two functions::

    out, cache = op_forward(x, ...)
    dx, ...    = op_backward(dout, cache)

They take and return arrays of any Array-API namespace and never average over the batch
(the 1/N belongs to the loss). Shapes use PyTorch's conventions (NCHW). They hold no
state, with one exception that never changes a result: the convolution recycles its large
column matrices through :data:`SCRATCH`, so a convolution's cache serves one backward
(as a PyTorch graph does without ``retain_graph``).

Memory layout
-------------
Shapes are always NCHW, but the 4-d arrays this module returns are *views* of buffers
stored channels first and batch last (memory order C, H, W, N), the order in which the
convolution's GEMM produces its output. Element-wise operations (BatchNorm, ReLU, the
residual add) keep the memory order of their inputs on NumPy, so the next convolution
finds its input already in that order and skips a transpose; and with the batch last, the
shifted slices of im2col and col2im copy runs of W * N contiguous numbers instead of W,
which made col2im about a third faster. Nothing here depends on the memory order; only
speed does.

On CuPy, the chains of element-wise work (im2col, col2im, BatchNorm's normalisation and
input gradient, the ReLU gradient) run as single fused kernels from :mod:`swav_ref.fused`
when that applies; the array code below is the reference they are tested against, and
the only path on NumPy.

Operations: :func:`l2_normalize_forward`, :func:`conv2d_forward` (with :func:`im2col` and
:func:`col2im`), :func:`batchnorm_forward`, :func:`relu_forward`, :func:`linear_forward`,
:func:`global_avg_pool_forward`, :func:`maxpool2d_forward`, :func:`add_forward`,
:func:`softmax_cross_entropy_forward`, each with its ``*_backward``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from swav_ref import fused
from swav_ref.backend import array_namespace, is_cupy, is_numpy, logsumexp, python_float


def l2_normalize_forward(x: Any, eps: float = 1e-12) -> tuple[Any, tuple]:
    r"""Scale each row of ``x`` (N, D) to unit length.

    Parameters
    ----------
    x : array (N, D)
    eps : float
        the smallest norm a row is divided by (see the Notes).

    Returns
    -------
    y : array (N, D)
        rows of unit length (but for rows shorter than ``eps``)
    cache : for :func:`~swav_ref.nn.functional.l2_normalize_backward`

    Notes
    -----
    .. math:: y_i = \frac{x_i}{\max(\lVert x_i \rVert, \epsilon)}

    ``eps`` guards an all-zero row, as PyTorch's ``F.normalize`` does: a row shorter than
    ``eps`` is divided by the constant ``eps``, in the forward and in the backward.
    """
    xp = array_namespace(x)
    eps = python_float(eps, "l2_normalize_forward: eps")
    length = xp.sqrt(xp.sum(x * x, axis=1, keepdims=True))
    norm = xp.maximum(length, eps)
    y = x / norm
    return y, (y, norm, length > eps)


def l2_normalize_backward(dy: Any, cache: tuple) -> Any:
    r"""Gradient of :func:`l2_normalize_forward`.

    Parameters
    ----------
    dy : array (N, D)
        :math:`g = \partial L / \partial y`.
    cache : from :func:`~swav_ref.nn.functional.l2_normalize_forward`

    Returns
    -------
    dx : array (N, D)

    Notes
    -----
    With :math:`y = x / \lVert x \rVert`, the Jacobian is
    :math:`(I - y y^\top) / \lVert x \rVert`, so

    .. math:: \frac{\partial L}{\partial x} = \frac{g - y\,(y^\top g)}{\lVert x \rVert},
              \qquad g = \frac{\partial L}{\partial y}

    i.e. the incoming gradient with its component along ``y`` removed: moving along the
    unit vector does not change a normalised output. A row shorter than ``eps`` was divided
    by a constant, so its gradient is just :math:`g / \epsilon`.
    """
    xp = array_namespace(dy)
    y, norm, normalised = cache
    along_y = y * xp.sum(y * dy, axis=1, keepdims=True)
    return (dy - xp.where(normalised, along_y, xp.zeros_like(along_y))) / norm


# ---------------------------------------------------------------------------------------
# Convolution: im2col from shifted slices, one GEMM, col2im by adding the slices back
# ---------------------------------------------------------------------------------------


def _check_conv_geometry(kernel: tuple[int, int], stride: int, padding: int) -> None:
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    if min(kernel) < 1:
        raise ValueError(f"kernel size must be positive, got {kernel}")


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    r"""Output length of a convolution or pooling along one axis.

    .. math:: H_\text{out} = \left\lfloor \frac{H + 2p - k}{s} \right\rfloor + 1

    with ``size`` :math:`H` (or :math:`W`), ``kernel`` :math:`k`, ``stride`` :math:`s` and
    ``padding`` :math:`p` (on each side). Raises ``ValueError`` when the (padded) input is
    smaller than the kernel.
    """
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"input of size {size} with padding {padding} is smaller than the kernel {kernel}"
        )
    return out


def _to_chwn(x: Any) -> Any:
    """(N, C, H, W) -> (C, H, W, N), a view (contiguous when ``x`` is stored that way)."""
    return array_namespace(x).permute_dims(x, (1, 2, 3, 0))


def _from_chwn(t: Any) -> Any:
    """(C, H, W, N) -> the (N, C, H, W) view of the same memory."""
    return array_namespace(t).permute_dims(t, (3, 0, 1, 2))


def _storage_view(a: Any) -> tuple[Any, Callable[[Any], Any]] | None:
    """The C-contiguous view of ``a``'s memory and the map back to ``a``'s shape: the
    (C, H, W, N) view for a 4-d array stored channels first, ``a`` itself for a
    C-contiguous one; ``None`` for any other layout."""
    if a.ndim == 4 and fused.is_dense(_to_chwn(a)):
        return _to_chwn(a), _from_chwn
    if fused.is_dense(a):
        return a, _unchanged
    return None


def _unchanged(t: Any) -> Any:
    return t


def _keeping_layout(op: Callable[..., Any], *arrays: Any) -> Any:
    """``op(*arrays)`` for an element-wise ``op``, with the result stored like the inputs.

    NumPy's element-wise operations keep their inputs' memory order by themselves; CuPy's
    return C-contiguous (N, C, H, W) arrays, which would cost the next convolution a
    transposing copy and keep the fused ReLU backward from reading its two inputs in step.
    So on CuPy the operation runs on the (C, H, W, N) storage views when all inputs share it.
    """
    if not is_cupy(array_namespace(*arrays)):
        return op(*arrays)
    views = [_storage_view(a) for a in arrays]
    if any(v is None for v in views) or len({v[1] for v in views}) != 1:
        return op(*arrays)
    return views[0][1](op(*(v[0] for v in views)))


def _shifted(x_t: Any, i: int, j: int, out_h: int, out_w: int, stride: int) -> Any:
    """The window offset (i, j) of every output pixel: a strided slice of (C, Hp, Wp, N)."""
    return x_t[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]


def _chwn_padded(x: Any, padding: int) -> Any:
    """``x`` (N, C, H, W) as (C, H + 2p, W + 2p, N), zero-padded: one copy, or a view if p = 0."""
    xp = array_namespace(x)
    x_t = _to_chwn(x)
    if padding == 0:
        return x_t
    c, h, w, n = x_t.shape
    out = xp.zeros((c, h + 2 * padding, w + 2 * padding, n), dtype=x.dtype)
    out[:, padding : padding + h, padding : padding + w, :] = x_t
    return out


class ScratchPool:
    """Large scratch arrays kept for reuse, by namespace, dtype and shape.

    On the CPU a freshly allocated array is paid for twice: the kernel maps and zeroes each
    page at its first touch, then we write it. The column matrices of a convolution (9 times
    its input for a 3x3 kernel) are the largest arrays of a training step and the same
    shapes come back at every step, so :func:`conv2d_forward` takes them from
    :data:`SCRATCH` and :func:`conv2d_backward` gives them back (which roughly halved the
    cost of im2col in a ResNet-18 step). A buffer is handed to one user at a time; the
    arrays a function returns to its caller never come from here. CuPy has its own memory
    pool, and the same code runs there unchanged.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list] = {}

    @staticmethod
    def _key(xp: Any, shape: tuple[int, ...], dtype: Any) -> tuple:
        return (xp.__name__, dtype, tuple(shape))  # an array's dtype: hashable on every backend

    def take(self, xp: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        """An array of namespace ``xp``, this shape and dtype, with arbitrary contents
        (overwrite all of it)."""
        free = self._free.get(self._key(xp, shape, dtype))
        return free.pop() if free else xp.empty(shape, dtype=dtype)

    def give_back(self, array: Any) -> None:
        """Return an array obtained from :meth:`take`; the caller must not use it again."""
        xp = array_namespace(array)
        self._free.setdefault(self._key(xp, array.shape, array.dtype), []).append(array)

    def clear(self) -> None:
        """Let every kept array go (e.g. after training, before a different workload)."""
        self._free.clear()

    def nbytes(self) -> int:
        """Bytes held for reuse."""
        total = 0
        for free in self._free.values():
            for a in free:
                xp = array_namespace(a)
                info = xp.finfo if xp.isdtype(a.dtype, "real floating") else xp.iinfo
                total += int(a.size) * info(a.dtype).bits // 8
        return total


#: The pool behind the column matrices of :func:`conv2d_forward` / :func:`conv2d_backward`.
SCRATCH = ScratchPool()


def _matmul_into(a: Any, b: Any, out: Any) -> Any:
    """``a @ b`` written into ``out`` where the namespace allows it (NumPy and CuPy take
    ``out=``; the standard has no such argument, so elsewhere a new array is returned)."""
    xp = array_namespace(a, b)
    if is_numpy(xp) or is_cupy(xp):
        return xp.matmul(a, b, out=out)
    return xp.matmul(a, b)


def im2col(
    x: Any, kernel_size: tuple[int, int], stride: int = 1, padding: int = 0, out: Any = None
) -> Any:
    r"""Unfold the sliding windows of ``x`` into the columns of a matrix.

    Parameters
    ----------
    x : array (N, C, H, W)
    kernel_size : (kh, kw)
    stride, padding : int
        the same along both axes; ``padding`` zeros on each side.
    out : array (C * kh * kw, H_out * W_out * N), optional
        Where to write the columns (a reused buffer); a new array when None. Not used for
        a 1x1 kernel with stride 1 and no padding, whose columns are a view of ``x``.

    Returns
    -------
    cols : array (C * kh * kw, H_out * W_out * N)
        Row ``(c, i, j)`` (in that nesting order, matching a weight reshaped to
        ``(O, C * kh * kw)``), column ``(u, v, n)`` (batch last, see the module notes)
        holds :math:`x_\text{pad}[n, c, s u + i, s v + j]`.

    Notes
    -----
    Built from ``kh * kw`` shifted, strided slices of the padded input, each one a whole
    (C, H_out, W_out, N) block copied at once: no Python loop over the batch or the pixels.
    A 1x1 convolution with stride 1 (and no padding) needs no unfolding; its ``cols`` is the input
    itself viewed as (C, H W N) (free when the input is stored that way, which is how
    :func:`conv2d_forward` leaves its output).
    """
    xp = array_namespace(x)
    kh, kw = kernel_size
    _check_conv_geometry((kh, kw), stride, padding)
    n, c, h, w = x.shape
    out_h = conv_output_size(h, kh, stride, padding)
    out_w = conv_output_size(w, kw, stride, padding)
    if kh == kw == 1 and stride == 1 and padding == 0:
        return xp.reshape(_to_chwn(x), (c, h * w * n))
    shape = (c * kh * kw, out_h * out_w * n)
    if out is None:
        out = xp.empty(shape, dtype=x.dtype)
    elif tuple(out.shape) != shape or out.dtype != x.dtype:
        raise ValueError(f"im2col: out must be {shape} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if fused.applies(xp, x.dtype):  # one gather kernel, the padding never materialised
        return fused.im2col(fused.dense(_to_chwn(x)), out, (kh, kw), stride, padding)
    x_t = _chwn_padded(x, padding)
    cols = xp.reshape(out, (c, kh, kw, out_h, out_w, n))  # a view: writing it fills out
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j, ...] = _shifted(x_t, i, j, out_h, out_w, stride)
    return out


def col2im(
    dcols: Any,
    x_shape: tuple[int, int, int, int],
    kernel_size: tuple[int, int],
    stride: int = 1,
    padding: int = 0,
) -> Any:
    r"""The adjoint of :func:`im2col`: add every column entry back to the pixel it came from.

    Parameters
    ----------
    dcols : array (C * kh * kw, H_out * W_out * N)
        laid out as :func:`~swav_ref.nn.functional.im2col` returns its columns.
    x_shape
        (N, C, H, W) of the original input
    kernel_size : (kh, kw)
    stride, padding : int
        the geometry the columns were unfolded with (as given to
        :func:`~swav_ref.nn.functional.im2col`).

    Returns
    -------
    dx : array (N, C, H, W)
        stored as (C, H, W, N).

    Notes
    -----
    A pixel belongs to up to ``kh * kw`` windows, so its gradient is a sum: each of the
    ``kh * kw`` shifted slices is added (``+=``) onto a zero-padded buffer, and the padding
    is cut off at the end.
    """
    xp = array_namespace(dcols)
    kh, kw = kernel_size
    n, c, h, w = x_shape
    out_h = conv_output_size(h, kh, stride, padding)
    out_w = conv_output_size(w, kw, stride, padding)
    if kh == kw == 1 and stride == 1 and padding == 0:
        return _from_chwn(xp.reshape(dcols, (c, h, w, n)))
    if fused.applies(xp, dcols.dtype):  # one kernel: each pixel gathers its windows' entries
        return _from_chwn(fused.col2im(fused.dense(dcols), (c, h, w, n), (kh, kw), stride, padding))
    dcols = xp.reshape(dcols, (c, kh, kw, out_h, out_w, n))
    dx_t = xp.zeros((c, h + 2 * padding, w + 2 * padding, n), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * (out_h - 1) + 1, stride)
            cols = slice(j, j + stride * (out_w - 1) + 1, stride)
            dx_t[:, rows, cols, :] += dcols[:, i, j, ...]
    if padding:
        dx_t = dx_t[:, padding : padding + h, padding : padding + w, :]
    return _from_chwn(dx_t)


class ConvCache:
    """What :func:`conv2d_backward` needs. Used once: the backward gives the column matrix
    back to :data:`SCRATCH` (as PyTorch frees a graph's buffers after one backward)."""

    __slots__ = ("cols", "pooled", "weight", "x_shape", "stride", "padding", "has_bias")

    def __init__(self, cols, pooled, weight, x_shape, stride, padding, has_bias):
        self.cols, self.pooled, self.weight = cols, pooled, weight
        self.x_shape, self.stride, self.padding, self.has_bias = x_shape, stride, padding, has_bias


def conv2d_forward(
    x: Any, weight: Any, bias: Any = None, stride: int = 1, padding: int = 0
) -> tuple[Any, ConvCache]:
    r"""2-D convolution (cross-correlation, as in PyTorch), NCHW.

    Parameters
    ----------
    x : array (N, C, H, W)
    weight : array (O, C, kh, kw)
    bias : array (O,) or None
    stride, padding : int
        (the same along both axes)

    Returns
    -------
    out : array (N, O, H_out, W_out)
        a view of an (O, H_out, W_out, N) buffer
    cache : :class:`ConvCache`
        for one call of :func:`conv2d_backward` (or
        :func:`conv2d_release` when no backward will follow)

    Notes
    -----
    .. math:: y[n, o, u, v] = b_o + \sum_{c, i, j} W[o, c, i, j]\,
              x_\text{pad}[n, c, s u + i, s v + j]

    With :math:`X_\text{col} = \operatorname{im2col}(x)` of shape
    (C kh kw, H_out W_out N) this is a single matrix product,
    :math:`Y = W_\text{mat} X_\text{col}` with :math:`W_\text{mat}` of shape (O, C kh kw).
    ``Y`` comes out as (O, H_out W_out N) and is returned as an NCHW view without a copy.
    """
    xp = array_namespace(x, weight, bias)
    if x.ndim != 4 or weight.ndim != 4:
        raise ValueError(
            f"conv2d expects x (N, C, H, W) and weight (O, C, kh, kw), got {x.shape} and {weight.shape}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1]}: {weight.shape}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
    _check_conv_geometry(weight.shape[2:], stride, padding)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    out_h = conv_output_size(h, kh, stride, padding)
    out_w = conv_output_size(w, kw, stride, padding)
    pooled = not (kh == kw == 1 and stride == 1 and padding == 0)  # else cols is a view of x
    buffer = SCRATCH.take(xp, (c * kh * kw, out_h * out_w * n), x.dtype) if pooled else None
    cols = im2col(x, (kh, kw), stride, padding, out=buffer)
    w_mat = xp.reshape(weight, (o, c * kh * kw))
    out_t = xp.matmul(w_mat, cols)  # (O, H_out * W_out * N): the one GEMM
    if bias is not None:
        out_t += xp.reshape(bias, (o, 1))
    out = _from_chwn(xp.reshape(out_t, (o, out_h, out_w, n)))
    return out, ConvCache(cols, pooled, weight, tuple(x.shape), stride, padding, bias is not None)


def conv2d_release(cache: ConvCache) -> None:
    """Give a cache's column matrix back to :data:`SCRATCH` when no backward will follow
    (a forward in eval mode). Harmless to skip: the array is then simply freed."""
    if cache.cols is not None and cache.pooled:
        SCRATCH.give_back(cache.cols)
    cache.cols = None


def conv2d_backward(dout: Any, cache: ConvCache) -> tuple[Any, Any, Any]:
    r"""Gradients of :func:`conv2d_forward` (the cache is used up).

    Parameters
    ----------
    dout : array (N, O, H_out, W_out)
    cache : from :func:`conv2d_forward`

    Returns
    -------
    dx : array (N, C, H, W)
    dweight : array (O, C, kh, kw)
    dbias : array (O,), or None
        when the forward had no bias

    Notes
    -----
    With :math:`Y = W_\text{mat} X_\text{col}` and :math:`G = \partial L / \partial Y`
    reshaped to (O, H_out W_out N):

    .. math:: \frac{\partial L}{\partial W_\text{mat}} = G X_\text{col}^\top, \qquad
              \frac{\partial L}{\partial X_\text{col}} = W_\text{mat}^\top G, \qquad
              \frac{\partial L}{\partial b_o} = \sum_{n, u, v} G[o, (n, u, v)]

    and :math:`\partial L / \partial x = \operatorname{col2im}(\partial L / \partial X_\text{col})`:
    every input pixel collects the gradient of each window it appeared in.
    """
    xp = array_namespace(dout)
    if cache.cols is None:
        raise RuntimeError(
            "conv2d_backward: this cache was already used by a backward (or released); "
            "run conv2d_forward again for another gradient"
        )
    cols, weight = cache.cols, cache.weight
    o, c, kh, kw = weight.shape
    if dout.ndim != 4 or dout.shape[1] != o:
        raise ValueError(f"dout must be (N, {o}, H_out, W_out), got {dout.shape}")
    dout_t = xp.reshape(_to_chwn(dout), (o, cols.shape[1]))  # free when stored (O, H, W, N)
    w_mat = xp.reshape(weight, (o, c * kh * kw))
    if is_numpy(xp):
        # dW = G X_col^T, computed as its transpose X_col G^T: with 2 threads OpenBLAS ran the
        # direct form (a short-and-wide times a long K) up to 10x slower than this one.
        dweight_mat = xp.permute_dims(xp.matmul(cols, xp.permute_dims(dout_t, (1, 0))), (1, 0))
    else:  # cuBLAS runs both forms alike; this one comes out stored as the weight is
        dweight_mat = xp.matmul(dout_t, xp.permute_dims(cols, (1, 0)))  # (O, C kh kw), small
    dweight = xp.reshape(dweight_mat, weight.shape)
    dbias = xp.sum(dout_t, axis=1) if cache.has_bias else None
    conv2d_release(cache)  # the columns are no longer needed: reuse them for dcols
    dcols = SCRATCH.take(xp, tuple(cols.shape), dout.dtype)
    dcols = _matmul_into(xp.permute_dims(w_mat, (1, 0)), dout_t, dcols)
    dx = col2im(dcols, cache.x_shape, (kh, kw), cache.stride, cache.padding)
    if cache.pooled:  # else col2im returned a view of dcols
        SCRATCH.give_back(dcols)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------
# Batch normalisation (training and eval, optionally synchronised across workers)
# ---------------------------------------------------------------------------------------


class BatchNormCache(NamedTuple):
    """What :func:`batchnorm_backward` needs, plus the batch statistics for the running ones."""

    xhat: Any  # (C, M) normalised values, one row per channel
    weight: Any  # (C,)
    invstd: Any  # (C,) 1 / sqrt(var + eps)
    count: Any  # M, values per channel (int, or a 0-d array when summed over workers)
    training: bool
    allreduce: Callable[[Any], Any] | None
    mean: Any  # (C,) the mean used (the batch's in training, the running one in eval)
    var: Any  # (C,) the biased variance used
    shape: tuple[int, ...]  # of x


def _channel_rows(x: Any) -> Any:
    """``x`` (N, C) or (N, C, H, W) as the (C, M) matrix whose row c holds every value of
    channel c (M = N H W). A view when ``x`` is stored channels first, as conv outputs are."""
    xp = array_namespace(x)
    if x.ndim == 2:
        return xp.permute_dims(x, (1, 0))
    if x.ndim == 4:
        n, c, h, w = x.shape
        return xp.reshape(_to_chwn(x), (c, h * w * n))
    raise ValueError(f"batchnorm expects (N, C) or (N, C, H, W) input, got shape {tuple(x.shape)}")


def _from_channel_rows(rows: Any, shape: tuple[int, ...]) -> Any:
    """Inverse of :func:`_channel_rows`: (C, M) back to ``shape``, as a view."""
    xp = array_namespace(rows)
    if len(shape) == 2:
        return xp.permute_dims(rows, (1, 0))
    n, c, h, w = shape
    return _from_chwn(xp.reshape(rows, (c, h, w, n)))


def _row_dot(a: Any, b: Any) -> Any:
    """``sum(a * b, axis=1)`` for (C, M) arrays, as C dot products (a batched matmul):
    no (C, M) temporary, and several times faster than the product and the sum."""
    xp = array_namespace(a, b)
    c, m = a.shape
    return xp.reshape(xp.matmul(xp.reshape(a, (c, 1, m)), xp.reshape(b, (c, m, 1))), (c,))


def _column(v: Any) -> Any:
    """A (C,) vector as a (C, 1) column, to broadcast along the rows of a (C, M) matrix."""
    return array_namespace(v).reshape(v, (v.shape[0], 1))


def batchnorm_forward(
    x: Any,
    weight: Any,
    bias: Any,
    running_mean: Any = None,
    running_var: Any = None,
    training: bool = True,
    eps: float = 1e-5,
    allreduce: Callable[[Any], Any] | None = None,
) -> tuple[Any, BatchNormCache]:
    r"""Batch normalisation of (N, C) or (N, C, H, W) input, per channel.

    Parameters
    ----------
    x : array (N, C) or (N, C, H, W)
    weight, bias : arrays (C,)
        the affine :math:`\gamma, \beta`
    running_mean, running_var : arrays (C,)
        used (and required) when ``training`` is False
    training : bool
        True: normalise with the batch's statistics. False: with the running ones.
    eps : float
        added to the variance before the square root (PyTorch's default 1e-5).
    allreduce : callable or None
        Sync-BN: a function that sums an array over all workers. The batch statistics are
        then those of the union of every worker's batch. ``None``: this batch only.

    Returns
    -------
    out : array
        the shape of ``x`` (stored channels first)
    cache : :class:`BatchNormCache`
        its ``mean``, ``var`` and ``count`` feed
        :func:`batchnorm_update_running`.

    Notes
    -----
    Over the :math:`m` values of a channel (:math:`m = N H W`):

    .. math:: \mu = \frac1m \sum x, \quad \sigma^2 = \frac1m \sum (x - \mu)^2, \quad
              \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad
              y = \gamma \hat x + \beta

    The work is done on the (C, M) matrix with one row per channel, so every statistic is a
    reduction along rows. Locally the variance is computed from the centred values (two
    passes, accurate in float32). With ``allreduce``, one call sums the packed vector
    :math:`(\sum (x - s), \sum (x - s)^2, m)` over the workers, for a shift :math:`s` that
    every worker holds alike (the running mean, kept identical by the synchronised
    updates; zero without one), and
    :math:`\sigma^2 = \overline{(x - s)^2} - (\overline{x - s})^2`: one communication round
    per layer, and in float32 the subtraction cancels only :math:`(\mu - s)^2`, small once
    the running mean has caught up, rather than :math:`\mu^2` (a relative error of 2e-4 in
    the variance of a channel whose mean is 30 standard deviations).
    """
    xp = array_namespace(x, weight, bias)
    eps = python_float(eps, "batchnorm_forward: eps")
    if eps < 0:  # var + eps < 0 would give NaN
        raise ValueError(f"batchnorm_forward: eps must be >= 0, got {eps}")
    rows = _channel_rows(x)
    c, m = rows.shape
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"weight and bias must have shape ({c},), got {weight.shape}, {bias.shape}")
    count, invstd = m, None
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batchnorm in eval mode needs running_mean and running_var")
        mean, var = running_mean, running_var
        centred = rows - _column(mean)
    elif allreduce is None:
        if m < 2:
            raise ValueError(f"batchnorm in training needs more than 1 value per channel, got input {x.shape}")
        mean = xp.mean(rows, axis=1)
        centred = rows - _column(mean)
        sum_sq = _row_dot(centred, centred)
        if fused.usable(sum_sq, weight):  # var and 1 / sqrt(var + eps) in one launch
            var, invstd = fused.batchnorm_variance(sum_sq, m, eps)
        else:
            var = sum_sq / m
    else:
        shift = running_mean if running_mean is not None else xp.zeros((c,), dtype=x.dtype)
        centred = rows - _column(shift)  # x - s, centred below once the global mean is known
        local = [xp.sum(centred, axis=1), _row_dot(centred, centred), xp.full((1,), m, dtype=x.dtype)]
        total = allreduce(xp.concat(local))
        count = total[2 * c]
        offset = total[:c] / count  # the global mean of x - s
        var = xp.maximum(total[c : 2 * c] / count - offset * offset, 0.0)
        mean = shift + offset
        centred -= _column(offset)
    if invstd is None:
        invstd = 1.0 / xp.sqrt(var + eps)
    if fused.usable(centred, invstd, weight, bias):
        xhat, out = fused.batchnorm_scale_shift(centred, invstd, weight, bias)  # one pass
    else:
        centred *= _column(invstd)  # a fresh array of ours: normalise it in place
        xhat = centred
        out = xhat * _column(weight)
        out += _column(bias)
    cache = BatchNormCache(xhat, weight, invstd, count, training, allreduce, mean, var, tuple(x.shape))
    return _from_channel_rows(out, x.shape), cache


def batchnorm_backward(dout: Any, cache: BatchNormCache) -> tuple[Any, Any, Any]:
    r"""Gradients of :func:`batchnorm_forward`.

    Parameters
    ----------
    dout : array
        the shape of ``x``: (N, C) or (N, C, H, W)
    cache : :class:`~swav_ref.nn.functional.BatchNormCache`
        from :func:`~swav_ref.nn.functional.batchnorm_forward`

    Returns
    -------
    dx : array
        the shape of ``x``
    dweight, dbias : arrays (C,)
        this worker's share (the data-parallel gradient all-reduce
        sums them like any other parameter gradient)

    Notes
    -----
    In eval mode the statistics are constants: :math:`\partial L/\partial x = \gamma\,
    \sigma^{-1} g` with :math:`g = \partial L / \partial y`. In training :math:`\mu` and
    :math:`\sigma` depend on every :math:`x` of the channel, and the chain rule through them
    collapses to two reductions:

    .. math:: \frac{\partial L}{\partial \beta} &= \sum g, \qquad
              \frac{\partial L}{\partial \gamma} = \sum g \hat x, \\
              \frac{\partial L}{\partial x} &= \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
              \Big( g - \frac1m \sum g - \hat x\, \frac1m \sum g \hat x \Big)

    (the gradient with its mean and its component along :math:`\hat x` removed). Under
    sync-BN the two sums in :math:`\partial L/\partial x` run over all workers (one
    all-reduce of the packed pair), which gives exactly the gradient of one big batch.
    """
    xp = array_namespace(dout)
    xhat, weight, invstd, count, training, allreduce, _, _, shape = cache
    if tuple(dout.shape) != shape:
        raise ValueError(f"dout has shape {tuple(dout.shape)}, the forward output had {shape}")
    g = _channel_rows(dout)
    c = g.shape[0]
    sum_dy = xp.sum(g, axis=1)
    sum_dy_xhat = _row_dot(g, xhat)
    if not training:
        return _from_channel_rows(g * _column(weight * invstd), shape), sum_dy_xhat, sum_dy
    if allreduce is None and fused.usable(g, xhat, sum_dy, sum_dy_xhat, weight, invstd):
        # one launch: the means and the scale are formed inside the kernel
        dx = fused.batchnorm_backward_input(g, xhat, sum_dy, sum_dy_xhat, weight, invstd, count)
        return _from_channel_rows(dx, shape), sum_dy_xhat, sum_dy
    if allreduce is None:
        mean_dy, mean_dy_xhat = sum_dy / count, sum_dy_xhat / count
    else:
        total = allreduce(xp.concat([sum_dy, sum_dy_xhat]))
        mean_dy, mean_dy_xhat = total[:c] / count, total[c:] / count
    if fused.usable(g, xhat, weight, invstd):  # sync-BN: the all-reduced means, count 1
        dx = fused.batchnorm_backward_input(g, xhat, fused.dense(mean_dy), fused.dense(mean_dy_xhat), weight,
                                            invstd, 1)
        return _from_channel_rows(dx, shape), sum_dy_xhat, sum_dy
    scale = _column(weight * invstd)
    dx = xhat * _column(-mean_dy_xhat)
    dx += g
    dx -= _column(mean_dy)
    dx *= scale
    return _from_channel_rows(dx, shape), sum_dy_xhat, sum_dy


def batchnorm_update_running(
    running_mean: Any, running_var: Any, cache: BatchNormCache, momentum: float = 0.1
) -> tuple[Any, Any]:
    r"""PyTorch's running-statistics rule, as new arrays (the inputs are not modified).

    Parameters
    ----------
    running_mean, running_var : arrays (C,)
    cache : :class:`~swav_ref.nn.functional.BatchNormCache`
        from a training-mode :func:`~swav_ref.nn.functional.batchnorm_forward` (its batch
        mean, biased variance and count); ``ValueError`` for an eval-mode one.
    momentum : float
        :math:`\rho` below (PyTorch's default 0.1).

    Returns
    -------
    new_mean, new_var : arrays (C,)

    Notes
    -----
    .. math:: \hat\mu \leftarrow (1 - \rho)\,\hat\mu + \rho\,\mu, \qquad
              \hat\sigma^2 \leftarrow (1 - \rho)\,\hat\sigma^2 + \rho\,\frac{m}{m-1}\,\sigma^2

    with momentum :math:`\rho`: the running variance is the *unbiased* estimate while the
    normalisation itself used the biased one.
    """
    if not cache.training:
        raise ValueError("running statistics are only updated from a training-mode forward")
    momentum = python_float(momentum, "batchnorm_update_running: momentum")
    count = cache.count
    if isinstance(count, int) and fused.usable(running_mean, running_var, cache.mean, cache.var):
        return fused.batchnorm_running_update(running_mean, running_var, cache.mean, cache.var, momentum,
                                              count / (count - 1))  # one launch for the seven below
    new_mean = (1.0 - momentum) * running_mean + momentum * cache.mean
    new_var = (1.0 - momentum) * running_var + momentum * (cache.var * (count / (count - 1)))
    return new_mean, new_var


# ---------------------------------------------------------------------------------------
# Element-wise, linear, pooling, residual add, loss
# ---------------------------------------------------------------------------------------


def relu_forward(x: Any) -> tuple[Any, Any]:
    r"""``max(x, 0)`` for ``x`` of any shape ((N, C, H, W) in a ResNet); the output has
    that shape, and the cache is the output itself (its sign is the mask)."""
    xp = array_namespace(x)
    out = _keeping_layout(lambda t: xp.maximum(t, 0.0), x)
    return out, out


def relu_backward(dout: Any, cache: Any) -> Any:
    r"""Gradient of :func:`relu_forward`: ``dout`` and the returned ``dx`` have the shape
    of ``x``, and ``cache`` is the forward's output.

    Notes: :math:`\partial L/\partial x = g \cdot [x > 0]` (0 at the kink, as PyTorch).
    Written as a product with the 0/1 mask: NumPy's ``where`` with a scalar branch was
    10 times slower than the multiplication on (N, C, H, W) float32 arrays.
    """
    xp = array_namespace(dout)
    if fused.applies(xp, dout.dtype) and dout.dtype == cache.dtype:
        g_view, y_view = _storage_view(dout), _storage_view(cache)
        if g_view is not None and y_view is not None and g_view[1] is y_view[1]:
            return g_view[1](fused.relu_backward(g_view[0], y_view[0]))
    return dout * xp.astype(cache > 0, dout.dtype)


def linear_forward(x: Any, weight: Any, bias: Any = None) -> tuple[Any, tuple]:
    r"""Affine map ``x @ weight.T + bias`` (PyTorch's ``nn.Linear`` layout).

    Parameters
    ----------
    x : array (N, D_in)
    weight : array (D_out, D_in)
    bias : array (D_out,) or None

    Returns
    -------
    out : array (N, D_out)
    cache : for :func:`~swav_ref.nn.functional.linear_backward`

    Notes
    -----
    .. math:: y = x W^\top + b
    """
    xp = array_namespace(x, weight, bias)
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear expects x (N, D_in) and weight (D_out, D_in), got {x.shape}, {weight.shape}")
    out = xp.matmul(x, xp.permute_dims(weight, (1, 0)))
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
        out += bias
    return out, (x, weight, bias is not None)


def linear_backward(dout: Any, cache: tuple) -> tuple[Any, Any, Any]:
    r"""Gradients of :func:`linear_forward`: ``(dx, dweight, dbias or None)``.

    Parameters
    ----------
    dout : array (N, D_out)
    cache : from :func:`~swav_ref.nn.functional.linear_forward`

    Returns
    -------
    dx : array (N, D_in)
    dweight : array (D_out, D_in)
    dbias : array (D_out,), or None
        when the forward had no bias

    Notes
    -----
    .. math:: \frac{\partial L}{\partial x} = G W, \qquad
              \frac{\partial L}{\partial W} = G^\top x, \qquad
              \frac{\partial L}{\partial b} = \textstyle\sum_n G_n
    """
    xp = array_namespace(dout)
    x, weight, has_bias = cache
    if dout.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"dout must be {(x.shape[0], weight.shape[0])}, got {dout.shape}")
    dx = xp.matmul(dout, weight)
    dweight = xp.matmul(xp.permute_dims(dout, (1, 0)), x)
    dbias = xp.sum(dout, axis=0) if has_bias else None
    return dx, dweight, dbias


def global_avg_pool_forward(x: Any) -> tuple[Any, tuple]:
    r"""Mean over the spatial axes: (N, C, H, W) -> (N, C).

    Notes: :math:`y_{nc} = \frac{1}{HW} \sum_{u,v} x_{ncuv}`.
    """
    xp = array_namespace(x)
    if x.ndim != 4:
        raise ValueError(f"global average pooling expects (N, C, H, W), got {x.shape}")
    return xp.mean(x, axis=(2, 3)), x.shape


def global_avg_pool_backward(dout: Any, cache: tuple) -> Any:
    r"""Gradient of :func:`global_avg_pool_forward`: ``dout`` (N, C) -> ``dx`` (N, C, H, W),
    each gradient spread evenly over its :math:`H W` pixels (stored as (C, H, W, N))."""
    xp = array_namespace(dout)
    n, c, h, w = cache
    if dout.shape != (n, c):
        raise ValueError(f"dout must be {(n, c)}, got {dout.shape}")
    per_pixel = xp.reshape(xp.permute_dims(dout, (1, 0)) / (h * w), (c, 1, 1, n))
    return _from_chwn(per_pixel * xp.ones((1, h, w, 1), dtype=dout.dtype))


def maxpool2d_forward(
    x: Any, kernel_size: int, stride: int | None = None, padding: int = 0
) -> tuple[Any, tuple]:
    r"""Max pooling over ``kernel_size`` x ``kernel_size`` windows (PyTorch's ``MaxPool2d``).

    Parameters
    ----------
    x : array (N, C, H, W)
    kernel_size : int
    stride : int, default ``kernel_size``
    padding : int
        at most ``kernel_size // 2``; padded cells hold :math:`-\infty`

    Returns
    -------
    out : array (N, C, H_out, W_out)
    cache : for :func:`~swav_ref.nn.functional.maxpool2d_backward`

    Notes
    -----
    :math:`y[n, c, u, v] = \max_{i, j} x_\text{pad}[n, c, s u + i, s v + j]`, computed as a
    running maximum over the ``k * k`` shifted slices. The cache keeps the winning offset
    (the first one on ties, as PyTorch) so the backward routes each gradient to one pixel.
    """
    xp = array_namespace(x)
    stride = kernel_size if stride is None else stride
    _check_conv_geometry((kernel_size, kernel_size), stride, padding)
    if x.ndim != 4:
        raise ValueError(f"max pooling expects (N, C, H, W), got {x.shape}")
    if padding > kernel_size // 2:
        raise ValueError(f"padding {padding} must be at most half the kernel size {kernel_size}")
    n, c, h, w = x.shape
    out_h = conv_output_size(h, kernel_size, stride, padding)
    out_w = conv_output_size(w, kernel_size, stride, padding)
    x_pad = x
    if padding:
        x_pad = xp.full((n, c, h + 2 * padding, w + 2 * padding), -xp.inf, dtype=x.dtype)
        x_pad[:, :, padding : padding + h, padding : padding + w] = x
    best, winner = None, None
    for k in range(kernel_size * kernel_size):
        i, j = divmod(k, kernel_size)
        window = x_pad[:, :, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
        if best is None:
            best = window
            winner = xp.zeros(window.shape, dtype=xp.int32)
        else:
            # A NaN wins over any number and over an earlier NaN, as in PyTorch, so that a
            # diverged input shows in the output instead of being pooled away.
            better = (window > best) | xp.isnan(window)
            best = xp.where(better, window, best)
            winner = xp.where(better, xp.asarray(k, dtype=xp.int32), winner)
    out = xp.asarray(best, copy=True) if kernel_size == 1 else best
    return out, (winner, x.shape, kernel_size, stride, padding)


def maxpool2d_backward(dout: Any, cache: tuple) -> Any:
    r"""Gradient of :func:`maxpool2d_forward`: ``dout`` (N, C, H_out, W_out) -> ``dx``
    (N, C, H, W), each output's gradient added to its winning input pixel."""
    xp = array_namespace(dout)
    winner, (n, c, h, w), kernel_size, stride, padding = cache
    if dout.shape != winner.shape:
        raise ValueError(f"dout must be {winner.shape}, got {dout.shape}")
    out_h, out_w = winner.shape[2:]
    dx_pad = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=dout.dtype)
    for k in range(kernel_size * kernel_size):
        i, j = divmod(k, kernel_size)
        rows = slice(i, i + stride * (out_h - 1) + 1, stride)
        cols = slice(j, j + stride * (out_w - 1) + 1, stride)
        dx_pad[:, :, rows, cols] += xp.where(winner == k, dout, 0.0)
    return dx_pad[:, :, padding : padding + h, padding : padding + w]


def add_forward(a: Any, b: Any) -> tuple[Any, None]:
    """The residual add ``a + b`` (same shapes; no broadcasting, so no hidden reduction in
    the backward)."""
    if a.shape != b.shape:
        raise ValueError(f"residual add needs equal shapes, got {a.shape} and {b.shape}")
    return _keeping_layout(lambda u, v: u + v, a, b), None


def add_backward(dout: Any, cache: None = None) -> tuple[Any, Any]:
    r"""Both inputs receive the incoming gradient unchanged: :math:`(g, g)`."""
    return dout, dout


def softmax_cross_entropy_forward(logits: Any, labels: Any) -> tuple[Any, tuple]:
    r"""Mean softmax cross-entropy with integer class labels.

    Parameters
    ----------
    logits : array (N, K)
    labels : integer array (N,)
        values in ``[0, K)``. Checked on NumPy (``ValueError``
        naming the bad values and K); not checked on other backends, where it would need a
        sync with the host (a label out of range there gives a zero one-hot row: a wrong loss)

    Returns
    -------
    loss : 0-d array
    cache : for :func:`softmax_cross_entropy_backward`

    Notes
    -----
    .. math:: L = -\frac1N \sum_n \log \frac{e^{z_{n y_n}}}{\sum_k e^{z_{nk}}}
    """
    xp = array_namespace(logits, labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, K) and labels (N,), got {logits.shape} and {labels.shape}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    n, k = logits.shape
    if is_numpy(xp) and n:  # NumPy only: host memory, free to read (never run on a device)
        host = labels.view(np.ndarray)  # a plain view: array subclasses (counters) see no read
        if host.min() < 0 or host.max() >= k:
            bad = sorted(set(host[(host < 0) | (host >= k)].tolist()))
            raise ValueError(f"labels must be in [0, {k}) for K={k} classes, got {bad[:10]}")
    log_probs = logits - logsumexp(logits, axis=1, keepdims=True)
    classes = xp.reshape(xp.arange(k, dtype=labels.dtype), (1, k))
    one_hot = xp.astype(xp.reshape(labels, (n, 1)) == classes, logits.dtype)
    loss = -xp.sum(one_hot * log_probs) / n
    return loss, (xp.exp(log_probs), one_hot)


def softmax_cross_entropy_backward(dloss: Any, cache: tuple) -> Any:
    r"""Gradient of :func:`softmax_cross_entropy_forward` with respect to the logits.

    Parameters
    ----------
    dloss : float or 0-d array
        the upstream gradient of the loss.
    cache : from :func:`~swav_ref.nn.functional.softmax_cross_entropy_forward`

    Returns
    -------
    dlogits : array (N, K)

    Notes
    -----
    .. math:: \frac{\partial L}{\partial z_{nk}} = \frac{1}{N}\big(\operatorname{softmax}(z_n)_k
              - [k = y_n]\big) \cdot \frac{\partial \ell}{\partial L}

    ``dloss`` is the upstream gradient of the scalar loss (1.0 when it is the objective).
    """
    probs, one_hot = cache
    return (probs - one_hot) * (dloss / probs.shape[0])
