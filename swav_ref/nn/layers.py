"""Thin stateful layers over the pure pairs in :mod:`swav_ref.nn.functional`.

A :class:`Module` holds three dicts of arrays, named as in PyTorch:

``params``
    what the optimiser updates (``weight``, ``bias``);
``grads``
    the same keys; ``None`` until a backward pass writes them, and ``None`` again after
    :meth:`Module.zero_grad`. The optimisers skip a parameter whose gradient is ``None``,
    so setting ``grads[key] = None`` after a backward freezes it for one step (SwAV's
    prototypes during the first iterations).
``buffers``
    state that is saved but not trained (BatchNorm's ``running_mean``, ``running_var``,
    ``num_batches_tracked``).

Forward/backward bookkeeping: a forward in training mode pushes its cache on a stack and a
backward pops the newest one (last in, first out) and *adds* to the gradients. So, as with
autograd and two forward passes through one network::

    y1 = m.forward(x1); y2 = m.forward(x2)
    m.backward(dy2); m.backward(dy1)      # grads = d(L1 + L2)

which is how SwAV's crop-size groups go through one backbone. A forward in eval mode keeps
nothing (feature extraction does not grow memory), so it cannot be followed by a backward.

Initialisation (documented choices): convolutions draw Kaiming-normal weights with
``fan_out`` (:math:`\\mathcal N(0, 2 / (O k_h k_w))`, torchvision's ResNet rule);
:class:`Linear` uses PyTorch's default, :math:`\\mathcal U(-1/\\sqrt{D_\\text{in}},
1/\\sqrt{D_\\text{in}})` for weight and bias; BatchNorm starts at weight 1, bias 0. Draws come
from a seeded :class:`swav_ref.backend.Random` (an ``int`` seed is accepted too), so the
same seed gives the same network on every backend.
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable, Iterator

import numpy as np

from swav_ref.backend import Random, array_namespace, asarray, get_backend, host_dtype, python_float
from swav_ref.nn import functional as F

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "GlobalAvgPool",
    "Linear",
    "MaxPool2d",
    "Module",
    "ReLU",
    "Sequential",
]


def _as_random(rng: Random | int | None) -> Random:
    """A :class:`Random` from a generator, a seed, or ``None`` (seed 0)."""
    if isinstance(rng, Random):
        return rng
    return Random(0 if rng is None else rng)


def _as_namespace(xp: Any) -> types.ModuleType:
    """``xp`` itself, or the namespace a backend name (``"numpy"``, ``"cupy"``) stands for."""
    if isinstance(xp, str):
        return get_backend(xp)
    if not hasattr(xp, "asarray"):
        raise TypeError(
            f"xp must be an array namespace module such as numpy, or a name for get_backend, got {xp!r}"
        )
    return xp


#: The dtypes a Module computes in: real floating point (integer weights would all be
#: rounded to 0 by the initialisation, and BatchNorm cannot write a float into them).
FLOAT_DTYPES = ("float16", "float32", "float64")


def _integer_range(dtype: Any) -> tuple[float, float]:
    """The half-open range ``[low, high)`` of an integer dtype's values as exact floats:
    ``[-2**(bits-1), 2**(bits-1))`` when signed, ``[0, 2**bits)`` when not. Powers of two,
    unlike the largest integer itself (``float(2**63 - 1)`` rounds up to ``2.0**63``)."""
    info = np.iinfo(host_dtype(dtype))
    if info.min < 0:
        return -(2.0 ** (info.bits - 1)), 2.0 ** (info.bits - 1)
    return 0.0, 2.0**info.bits


def _resolve_dtype(xp: types.ModuleType, dtype: Any) -> Any:
    """``xp``'s dtype for a name (``"float32"``) or for another backend's dtype; ``ValueError``
    naming it unless it is one of ``FLOAT_DTYPES`` (float16, float32, float64) that ``xp`` has."""
    try:
        name = host_dtype(dtype).name
    except (TypeError, ValueError):
        name = None
    if name not in FLOAT_DTYPES:
        raise ValueError(
            f"a Module's dtype must be real floating point, one of {', '.join(FLOAT_DTYPES)}; "
            f"got {name or repr(dtype)}"
        )
    resolved = getattr(xp, name, None)
    if resolved is None:
        has = ", ".join(n for n in FLOAT_DTYPES if hasattr(xp, n))
        raise ValueError(f"a Module's dtype: the backend {xp.__name__} has no {name}; use one of {has}")
    return resolved


class Module:
    """Base class: parameters, gradients, buffers, children, the cache stack.

    Sub-classes with parameters implement ``_forward(x) -> (out, cache)`` and
    ``_backward(dout, cache) -> dx`` (calling ``_accumulate(key, grad)`` for each parameter);
    containers override :meth:`forward` and :meth:`backward` and delegate to children.
    Assigning a Module to an attribute registers it as a child under that name, as in
    PyTorch, which gives the dotted names of :meth:`state_dict`.

    ``xp`` is the array namespace the arrays live on (or a backend name such as ``"cupy"``,
    see :func:`~swav_ref.backend.get_backend`), ``dtype`` their real floating dtype
    (float16, float32 or float64; ``ValueError`` otherwise).
    """

    def __init__(self, xp: types.ModuleType | str = np, dtype: Any = "float32"):
        object.__setattr__(self, "_children", {})
        self.xp = xp = _as_namespace(xp)
        self.dtype = _resolve_dtype(xp, dtype)
        self.params: dict[str, Any] = {}
        self.grads: dict[str, Any] = {}
        self.buffers: dict[str, Any] = {}
        self.training = True
        self._caches: list[tuple[Any, tuple]] = []

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Module):
            self._children[name] = value
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        inner = "".join(
            f"\n  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in self._children.items()
        )
        return f"{type(self).__name__}({self.extra_repr()}{inner}{chr(10) if inner else ''})"

    def extra_repr(self) -> str:
        """The settings shown inside this module's ``repr`` (empty here), as in PyTorch."""
        return ""

    # -- forward / backward --------------------------------------------------------------
    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def forward(self, x: Any) -> Any:
        """Run the layer; in training mode remember what the backward needs."""
        out, cache = self._forward(x)
        if self.training:
            self._caches.append((cache, out.shape))
        return out

    def backward(self, dout: Any) -> Any:
        """Gradient for the newest pending forward; adds parameter gradients to ``grads``."""
        if not self._caches:
            raise RuntimeError(
                f"{type(self).__name__}.backward called with no pending forward (a forward in "
                "eval mode stores nothing, and each forward allows one backward)"
            )
        cache, out_shape = self._caches[-1]
        if tuple(dout.shape) != tuple(out_shape):  # checked before popping: nothing is lost
            raise ValueError(
                f"{type(self).__name__}.backward: dout has shape {tuple(dout.shape)} but the "
                f"pending forward returned {tuple(out_shape)} (backwards run in reverse order)"
            )
        if self.params:  # as the forward checks its input (parameter-free layers take any dtype)
            self._check_gradient(dout)
        self._caches.pop()
        return self._backward(dout, cache)

    def _forward(self, x: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def _backward(self, dout: Any, cache: Any) -> Any:
        raise NotImplementedError

    def _accumulate(self, key: str, grad: Any) -> None:
        """``grads[key] += grad``; the first contribution is stored as is (it is a fresh array)."""
        if self.grads.get(key) is None:
            self.grads[key] = grad
        else:
            self.grads[key] += grad

    def _check_input(self, x: Any, ndim: int, channels: int | None = None) -> None:
        if x.ndim != ndim or (channels is not None and x.shape[1] != channels):
            want = f"{ndim}-d input" + (f" with {channels} channels in axis 1" if channels else "")
            raise ValueError(f"{type(self).__name__} expects {want}, got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(
                f"{type(self).__name__} holds {host_dtype(self.dtype).name} parameters but got "
                f"{host_dtype(x.dtype).name} input; "
                "convert one of them (Module.astype)"
            )

    def _check_gradient(self, dout: Any) -> None:
        """The gradient has the parameters' dtype (a dtype comparison: no host sync), so a
        float64 gradient never turns a float32 network's gradients into float64."""
        if dout.dtype != self.dtype:
            raise ValueError(
                f"{type(self).__name__} holds {host_dtype(self.dtype).name} parameters but got a "
                f"{host_dtype(dout.dtype).name} gradient in backward; convert the gradient or the "
                "module (Module.astype)"
            )

    # -- tree walking --------------------------------------------------------------------
    def children(self) -> Iterator[Module]:
        """The direct children, in the order they were registered (not their children)."""
        yield from self._children.values()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Every module in the tree (this one first, named ``prefix``), depth first."""
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self) -> Iterator[tuple[str, Module, str]]:
        """Every parameter in the tree as a triple ``(dotted name, owning module, key)``,
        e.g. ``("layer1.0.conv1.weight", conv, "weight")``: the array is
        ``conv.params["weight"]`` and its gradient ``conv.grads["weight"]``.

        This is not what PyTorch's method of the same name yields: there, pairs
        ``(name, tensor)``, each tensor carrying its own gradient (``tensor.grad``). Our
        arrays are plain NumPy or CuPy arrays with no room for a gradient, which lives in
        the owner's ``grads`` dict instead: ``None`` until a backward writes it, and
        replaced, not modified, by :meth:`~swav_ref.nn.layers.Module.zero_grad`, by
        freezing (``grads[key] = None``) and by the data-parallel average (a new array).
        So a caller needs the owner and the key to write a gradient or a parameter back
        in place, as the optimisers do (``module.params[key] -= ...``). In particular
        ``dict(model.named_parameters())`` is not a dict of arrays as in PyTorch; this is:
        ``{name: m.params[k] for name, m, k in model.named_parameters()}``.
        """
        for prefix, module in self.named_modules():
            for key in module.params:
                yield (f"{prefix}.{key}" if prefix else key), module, key

    def num_parameters(self) -> int:
        """Number of parameter entries in the tree (the sizes of all parameters, summed)."""
        return sum(int(math.prod(m.params[k].shape)) for _, m, k in self.named_parameters())

    # -- modes and bookkeeping -----------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Training mode for this module and all children (BatchNorm uses batch statistics,
        forwards keep their caches)."""
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self) -> Module:
        """Evaluation mode for the whole tree, ``self.train(False)``: BatchNorm uses its
        running statistics and forwards keep no caches. Returns self."""
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients: ``None`` (the default, as PyTorch) or arrays of zeros."""
        for _, module, key in self.named_parameters():
            p = module.params[key]
            module.grads[key] = None if set_to_none else array_namespace(p).zeros(p.shape, dtype=p.dtype)

    def clear_cache(self) -> None:
        """Drop every pending forward cache in the tree (e.g. after an aborted step)."""
        for _, module in self.named_modules():
            module._caches.clear()

    def num_pending(self) -> int:
        """How many forward caches wait for a backward, summed over the tree."""
        return sum(len(module._caches) for _, module in self.named_modules())

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Parameters and buffers under PyTorch-style dotted names (copies, so a later
        optimiser step leaves the returned dict unchanged)."""
        state = {}
        for prefix, module in self.named_modules():
            for key, value in list(module.params.items()) + list(module.buffers.items()):
                state[f"{prefix}.{key}" if prefix else key] = array_namespace(value).asarray(value, copy=True)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output (any backend's arrays, NumPy included).

        Each value is cast to the dtype of the array it replaces. Raises ``ValueError``
        naming the missing keys, the unexpected keys, the entries that are not arrays of
        real numbers (object, string, bool or complex dtypes), the entries whose shape
        differs, the floating entries that are not finite once cast (NaN, or a float64 too
        large for a float32 module), and the integer buffers given values that are not
        integers in the buffer's range (``num_batches_tracked``); nothing is loaded unless
        everything fits. Not a hot path: the value checks read one flag per entry back
        from the device.
        """
        targets = {}
        for prefix, module in self.named_modules():
            for store in (module.params, module.buffers):
                for key in store:
                    targets[f"{prefix}.{key}" if prefix else key] = (module, store, key)
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        if missing or unexpected:
            raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        not_real = []
        for name in targets:
            value = state[name]
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                not_real.append(f"{name}: {type(value).__name__}, not an array")
                continue
            try:
                kind = host_dtype(value.dtype).kind
            except (TypeError, ValueError):
                kind = "?"
            if kind not in ("i", "u", "f"):
                not_real.append(f"{name}: dtype {value.dtype}")
        if not_real:
            raise ValueError(
                "load_state_dict: parameters and buffers are real numbers (integer or floating "
                "dtypes), but got " + "; ".join(not_real)
            )
        bad = []
        for name, (_, store, key) in targets.items():
            if tuple(state[name].shape) != tuple(store[key].shape):
                bad.append(f"{name}: expected {tuple(store[key].shape)}, got {tuple(state[name].shape)}")
        if bad:
            raise ValueError("load_state_dict: shape mismatch for " + "; ".join(bad))
        loaded, refused = {}, []
        for name, (module, store, key) in targets.items():
            xp, target = module.xp, store[key].dtype
            value = asarray(state[name], xp)  # onto the module's backend, in its own dtype
            with np.errstate(over="ignore", invalid="ignore"):  # (NumPy's warnings: refused below)
                cast = xp.astype(value, target)  # a copy: never aliases the caller's arrays
                if xp.isdtype(target, "real floating"):
                    ok = xp.all(xp.isfinite(cast))
                    why = f"not finite as {host_dtype(target).name} (NaN or inf, or too large for it)"
                else:  # an integer buffer: the values must survive the cast exactly
                    ok = xp.all((xp.astype(cast, value.dtype) == value) & ((cast < 0) == (value < 0)))
                    if xp.isdtype(value.dtype, "real floating"):
                        # and lie in its range, said outright: a GPU's cast saturates
                        # (2.0**63 -> 2**63 - 1, which rounds back to 2.0**63 and so survives
                        # the round trip) where NumPy's wraps to a negative number
                        # (finite first: in float16 the bound -2.0**63 is itself -inf)
                        low, high = _integer_range(target)
                        ok = ok & xp.all(xp.isfinite(value) & (value >= low) & (value < high))
                    why = f"not integers in the range of {host_dtype(target).name}"
            if not bool(ok):
                refused.append(f"{name}: {why}")
            loaded[name] = cast
        if refused:
            raise ValueError("load_state_dict: refused values for " + "; ".join(refused))
        for name, (module, store, key) in targets.items():
            store[key] = loaded[name]
            if store is module.params:
                module.grads[key] = None

    def to(self, xp: types.ModuleType | str) -> Module:
        """Move every parameter and buffer to the backend ``xp`` (a namespace or a name for
        :func:`~swav_ref.backend.get_backend`; in place; returns self)."""
        xp = _as_namespace(xp)
        resolved = [(module, _resolve_dtype(xp, module.dtype)) for _, module in self.named_modules()]
        for module, dtype in resolved:  # (all checked first: a backend without the dtype changes nothing)
            for store in (module.params, module.buffers):
                for key, value in store.items():
                    store[key] = asarray(value, xp)
            module.grads = {key: None for key in module.params}
            module._caches.clear()
            module.xp, module.dtype = xp, dtype
        return self

    def astype(self, dtype: Any) -> Module:
        """Cast parameters and floating buffers to ``dtype`` (e.g. ``"float64"`` for gradient
        checks); in place, returns self. ``ValueError`` unless ``dtype`` is one of
        ``FLOAT_DTYPES`` (float16, float32, float64)."""
        resolved = [(module, _resolve_dtype(module.xp, dtype)) for _, module in self.named_modules()]
        for module, module_dtype in resolved:  # (all checked first: a refused dtype changes nothing)
            xp = module.xp
            module.dtype = module_dtype
            module.params = {k: xp.astype(v, module.dtype) for k, v in module.params.items()}
            module.buffers = {
                k: xp.astype(v, module.dtype) if xp.isdtype(v.dtype, "real floating") else v
                for k, v in module.buffers.items()
            }
            module.grads = {key: None for key in module.params}
            module._caches.clear()
        return self


# ---------------------------------------------------------------------------------------
# Layers with parameters
# ---------------------------------------------------------------------------------------


class Conv2d(Module):
    """2-D convolution, weight (out_channels, in_channels, k, k); see
    :func:`~swav_ref.nn.functional.conv2d_forward`. No bias by default (it is followed by
    BatchNorm in a ResNet, which would cancel it)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        *,
        rng: Random | int | None = None,
        xp: types.ModuleType = np,
        dtype: Any = "float32",
    ):
        super().__init__(xp, dtype)
        xp = self.xp  # the namespace, also when a backend name was given
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        rng = _as_random(rng)
        std = math.sqrt(2.0 / (out_channels * kernel_size * kernel_size))  # Kaiming normal, fan_out
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.params["weight"] = asarray(rng.normal(shape, scale=std), xp, self.dtype)
        if bias:
            bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
            self.params["bias"] = asarray(rng.uniform((out_channels,), -bound, bound), xp, self.dtype)
        self.grads = {key: None for key in self.params}

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}"
        )

    def _forward(self, x):
        self._check_input(x, 4, self.in_channels)
        out, cache = F.conv2d_forward(x, self.params["weight"], self.params.get("bias"), self.stride, self.padding)
        if not self.training:
            F.conv2d_release(cache)  # no backward will come: recycle the column matrix now
        return out, cache

    def _backward(self, dout, cache):
        dx, dweight, dbias = F.conv2d_backward(dout, cache)
        self._accumulate("weight", dweight)
        if dbias is not None:
            self._accumulate("bias", dbias)
        return dx


class Linear(Module):
    """Affine layer ``y = x W^T + b``, weight (out_features, in_features) as in PyTorch."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rng: Random | int | None = None,
        xp: types.ModuleType = np,
        dtype: Any = "float32",
    ):
        super().__init__(xp, dtype)
        xp = self.xp  # the namespace, also when a backend name was given
        self.in_features, self.out_features = in_features, out_features
        rng = _as_random(rng)
        bound = 1.0 / math.sqrt(in_features)  # PyTorch's default for weight and bias
        self.params["weight"] = asarray(rng.uniform((out_features, in_features), -bound, bound), xp, self.dtype)
        if bias:
            self.params["bias"] = asarray(rng.uniform((out_features,), -bound, bound), xp, self.dtype)
        self.grads = {key: None for key in self.params}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self.params}"

    def _forward(self, x):
        self._check_input(x, 2, self.in_features)
        return F.linear_forward(x, self.params["weight"], self.params.get("bias"))

    def _backward(self, dout, cache):
        dx, dweight, dbias = F.linear_backward(dout, cache)
        self._accumulate("weight", dweight)
        if dbias is not None:
            self._accumulate("bias", dbias)
        return dx


class _BatchNorm(Module):
    """Shared by :class:`BatchNorm1d` and :class:`BatchNorm2d` (PyTorch semantics).

    Training: normalise with the batch statistics (biased variance) and update
    ``running_mean``/``running_var`` with momentum 0.1, the variance unbiased; count the
    update in ``num_batches_tracked``. Eval: normalise with the running statistics.

    ``allreduce`` (None by default): a function summing an array over data-parallel
    workers; set it to make this a synchronised BatchNorm.
    """

    _ndim = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        *,
        allreduce: Callable[[Any], Any] | None = None,
        xp: types.ModuleType = np,
        dtype: Any = "float32",
    ):
        super().__init__(xp, dtype)
        xp = self.xp  # the namespace, also when a backend name was given
        eps, momentum = python_float(eps, "BatchNorm eps"), python_float(momentum, "BatchNorm momentum")
        if eps < 0 or not 0 <= momentum <= 1:
            raise ValueError(f"BatchNorm needs eps >= 0 and momentum in [0, 1], got eps={eps}, momentum={momentum}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.allreduce = allreduce
        self.params["weight"] = xp.ones((num_features,), dtype=self.dtype)
        self.params["bias"] = xp.zeros((num_features,), dtype=self.dtype)
        self.grads = {key: None for key in self.params}
        self.buffers["running_mean"] = xp.zeros((num_features,), dtype=self.dtype)
        self.buffers["running_var"] = xp.ones((num_features,), dtype=self.dtype)
        self.buffers["num_batches_tracked"] = xp.asarray(0, dtype=xp.int64)

    def extra_repr(self) -> str:
        sync = ", sync" if self.allreduce is not None else ""
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}{sync}"

    def _forward(self, x):
        self._check_input(x, self._ndim, self.num_features)
        b = self.buffers
        out, cache = F.batchnorm_forward(
            x, self.params["weight"], self.params["bias"], b["running_mean"], b["running_var"],
            training=self.training, eps=self.eps, allreduce=self.allreduce,
        )  # fmt: skip
        if self.training:
            b["running_mean"], b["running_var"] = F.batchnorm_update_running(
                b["running_mean"], b["running_var"], cache, self.momentum
            )
            b["num_batches_tracked"] = b["num_batches_tracked"] + 1
        return out, cache

    def _backward(self, dout, cache):
        dx, dweight, dbias = F.batchnorm_backward(dout, cache)
        self._accumulate("weight", dweight)
        self._accumulate("bias", dbias)
        return dx


class BatchNorm2d(_BatchNorm):
    """BatchNorm over (N, C, H, W): statistics per channel over N, H and W."""

    _ndim = 4


class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N, C): statistics per feature over the batch."""

    _ndim = 2


# ---------------------------------------------------------------------------------------
# Layers without parameters
# ---------------------------------------------------------------------------------------


class ReLU(Module):
    """Element-wise ``max(x, 0)``, any shape ((N, C, H, W) in a ResNet) -> the same shape.

    Wraps :func:`~swav_ref.nn.functional.relu_forward` and
    :func:`~swav_ref.nn.functional.relu_backward`. No parameters, so it accepts input of
    any floating dtype; ``xp`` and ``dtype`` are those of
    :class:`~swav_ref.nn.layers.Module`.
    """

    def _forward(self, x):
        return F.relu_forward(x)

    def _backward(self, dout, cache):
        return F.relu_backward(dout, cache)


class GlobalAvgPool(Module):
    """(N, C, H, W) -> (N, C): the mean over the spatial axes."""

    def _forward(self, x):
        return F.global_avg_pool_forward(x)

    def _backward(self, dout, cache):
        return F.global_avg_pool_backward(dout, cache)


class MaxPool2d(Module):
    """Max pooling over ``kernel_size`` x ``kernel_size`` windows, as PyTorch's
    ``MaxPool2d``: (N, C, H, W) -> (N, C, H_out, W_out).

    Wraps :func:`~swav_ref.nn.functional.maxpool2d_forward` (the equation, the padding
    rule and the tie rule are there) and :func:`~swav_ref.nn.functional.maxpool2d_backward`.
    ``stride`` defaults to ``kernel_size``; ``padding`` is at most ``kernel_size // 2``.
    No parameters; other keywords (``xp``, ``dtype``) go to
    :class:`~swav_ref.nn.layers.Module`.
    """

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def _forward(self, x):
        return F.maxpool2d_forward(x, self.kernel_size, self.stride, self.padding)

    def _backward(self, dout, cache):
        return F.maxpool2d_backward(dout, cache)


class Sequential(Module):
    """Children ``"0"``, ``"1"``, ... run in order; the backward runs them in reverse."""

    def __init__(self, *modules: Module):
        xp = modules[0].xp if modules else np
        dtype = modules[0].dtype if modules else "float32"
        super().__init__(xp, dtype)
        for index, module in enumerate(modules):
            self._children[str(index)] = module

    def __getitem__(self, index: int) -> Module:
        return list(self._children.values())[index]

    def __len__(self) -> int:
        return len(self._children)

    def forward(self, x):
        """The children's forwards in order, each on the output of the one before."""
        for module in self._children.values():
            x = module.forward(x)
        return x

    def backward(self, dout):
        """The children's backwards in reverse order, each given the gradient that the child
        after it returned; returns the gradient of the first child's input."""
        for module in reversed(list(self._children.values())):
            dout = module.backward(dout)
        return dout
