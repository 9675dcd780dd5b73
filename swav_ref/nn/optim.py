"""Optimisers (SGD, LARS) and the warm-up + cosine learning-rate schedule.

Both optimisers walk ``model.named_parameters()`` at every step and update
``module.params[key]`` in place. A parameter whose gradient is ``None`` is skipped
entirely (no weight decay, no momentum update): that is how SwAV keeps its prototypes
frozen for the first iterations. The learning rate is passed to each :meth:`~SGD.step`, from
:func:`warmup_cosine_schedule`. Optimiser state is a flat dict of arrays keyed by parameter
name (plus :data:`HAS_BUFFER_KEY`, which parameters have one), so a checkpoint needs no pickle.

On CuPy each parameter's whole update is one fused kernel (:func:`swav_ref.fused.sgd_update`,
:func:`swav_ref.fused.lars_update`) instead of five to fifteen small array operations;
the array code here is the reference the kernels are tested against.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from swav_ref import fused
from swav_ref.backend import array_namespace, asarray, host_dtype, python_float, to_numpy
from swav_ref.checkpoint import CheckpointError
from swav_ref.nn.layers import Module

__all__ = ["HAS_BUFFER_KEY", "LARS", "SGD", "warmup_cosine_schedule"]

#: The optimiser-state entry flagging which parameters have a momentum buffer. Buffers are
#: made at a parameter's first update, so some are legitimately absent: all with momentum 0
#: or before the first step, SwAV's prototypes while they are frozen, DeepCluster-v2's always.
HAS_BUFFER_KEY = "__has_momentum_buffer__"


class SGD:
    r"""Stochastic gradient descent with momentum and weight decay (PyTorch's semantics).

    Parameters
    ----------
    model : Module
        the parameters it updates (its ``named_parameters``) and their gradients.
    momentum : float, default 0.9
        SwAV's value. PyTorch's ``torch.optim.SGD`` defaults to 0; pass ``momentum=0.0``
        for plain gradient descent.
    weight_decay : float, default 0
        the L2 penalty added to every gradient.

    Notes
    -----
    For each parameter :math:`p` with gradient :math:`g`:

    .. math:: g \leftarrow g + \lambda p, \qquad b \leftarrow \mu b + g, \qquad
              p \leftarrow p - \eta\, b

    with :math:`\lambda` = ``weight_decay`` (not the :math:`\lambda = 1/\varepsilon` of
    optimal transport), :math:`\mu` = ``momentum``, :math:`\eta` the learning rate, and
    :math:`b = g` at the first step (PyTorch's initial buffer) and no buffer at all when
    ``momentum`` is 0.
    """

    def __init__(self, model: Module, momentum: float = 0.9, weight_decay: float = 0.0):
        momentum, weight_decay = python_float(momentum, "momentum"), python_float(weight_decay, "weight_decay")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        self.model, self.momentum, self.weight_decay = model, momentum, weight_decay
        self.momentum_buffers: dict[str, Any] = {}

    def _direction(self, p: Any, g: Any) -> Any:
        """The gradient the momentum sees; here with plain weight decay."""
        return g + self.weight_decay * p if self.weight_decay else g

    def step(self, lr: float) -> None:
        """One update of every parameter that has a gradient, with learning rate ``lr``."""
        lr = python_float(lr, "lr")
        for name, module, key in self.model.named_parameters():
            g = module.grads[key]
            if g is None:
                continue
            p = module.params[key]
            if fused.usable(p) and g.dtype == p.dtype:
                # one launch instead of six; a gradient stored otherwise (on NumPy a
                # convolution's is a transposed view) is first made dense by one copy
                buf, first = self._buffer_for(name, p)
                self._fused_update(p, fused.dense(g), buf, lr, first)
                continue
            d = self._direction(p, g)
            if self.momentum:
                buf = self.momentum_buffers.get(name)
                if buf is None:
                    buf = array_namespace(d).asarray(d, copy=True)
                    self.momentum_buffers[name] = buf
                else:
                    buf *= self.momentum
                    buf += d
                d = buf
            p -= lr * d  # in place: the module keeps the same array

    def _buffer_for(self, name: str, p: Any) -> tuple[Any, bool]:
        """The momentum buffer of a fused update (``None`` without momentum), and whether it
        is new (then the kernel fills it with the first direction)."""
        if not self.momentum:
            return None, False
        buf = self.momentum_buffers.get(name)
        if buf is None:
            buf = self.momentum_buffers[name] = array_namespace(p).empty_like(p)
            return buf, True
        return buf, False

    def _fused_update(self, p: Any, g: Any, buf: Any, lr: float, first: bool) -> None:
        fused.sgd_update(p, g, buf, lr, self.momentum, self.weight_decay, first)

    def state_dict(self) -> dict[str, Any]:
        """Momentum buffers by parameter name (copies), and under :data:`HAS_BUFFER_KEY` a
        bool array (one flag per parameter, in ``named_parameters`` order) saying which
        parameters have one: a buffer is made at a parameter's first update, so without the
        flags a lost buffer would look like one never made (see :meth:`load_state_dict`)."""
        state = {name: array_namespace(b).asarray(b, copy=True) for name, b in self.momentum_buffers.items()}
        params = [(name, module.params[key]) for name, module, key in self.model.named_parameters()]
        xp = array_namespace(params[0][1]) if params else np  # on the parameters' backend
        state[HAS_BUFFER_KEY] = xp.asarray([name in self.momentum_buffers for name, _ in params], dtype=xp.bool)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (any backend's arrays, NumPy included).

        Each buffer is cast to its parameter's dtype. Raises
        :class:`~swav_ref.checkpoint.CheckpointError` (a ``ValueError``) naming every entry
        at fault, and loads nothing, unless the state resumes the run exactly: no buffer
        missing or unexpected by the :data:`HAS_BUFFER_KEY` flags, none of a parameter the
        model lacks, each an array of a floating dtype (an integer array is not momentum) of
        its parameter's shape, finite once cast. State saved before the flags existed has
        no way to tell a lost buffer from one never made; it is checked for the rest. Not a
        hot path: the finiteness of all buffers is read back from the device at once.
        """
        params = {name: module.params[key] for name, module, key in self.model.named_parameters()}
        state = dict(state)
        flags = state.pop(HAS_BUFFER_KEY, None)
        problems = []
        unknown = sorted(set(state) - set(params))
        if unknown:
            problems.append(f"buffers for unknown parameters: {unknown} (not in the model)")
        if flags is not None:
            expected = self._flagged(flags, list(params))
            missing = sorted(expected - set(state))
            if missing:  # momentum lost: the resumed run would restart it from the next gradient
                problems.append(f"missing buffers {missing} (flagged in {HAS_BUFFER_KEY})")
            unflagged = sorted((set(state) & set(params)) - expected)
            if unflagged:
                problems.append(f"buffers {unflagged} that {HAS_BUFFER_KEY} says were never made")
        for name in sorted(set(state) & set(params)):
            value = state[name]
            if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                problems.append(f"{name}: {type(value).__name__}, not an array")
            elif host_dtype(value.dtype).kind != "f":
                problems.append(f"{name}: dtype {host_dtype(value.dtype).name}, not a floating dtype")
            elif tuple(value.shape) != tuple(params[name].shape):
                problems.append(f"{name}: shape {tuple(value.shape)}, the parameter is {tuple(params[name].shape)}")
        if problems:
            raise CheckpointError("optimiser state does not fit: " + "; ".join(problems))
        buffers = {}
        with np.errstate(over="ignore"):  # a float64 too large for float32 becomes inf: refused below
            for name, value in state.items():
                xp = array_namespace(params[name])
                buffers[name] = xp.astype(asarray(value, xp), params[name].dtype)  # a copy, never aliased
        if buffers:
            xp = array_namespace(*buffers.values())
            finite = to_numpy(xp.stack([xp.all(xp.isfinite(b)) for b in buffers.values()]))  # one read-back
            bad = [name for name, ok in zip(buffers, finite) if not ok]
            if bad:
                raise CheckpointError(f"optimiser state does not fit: buffers {sorted(bad)} hold NaN or infinity "
                                      "(or values too large for the parameter's dtype)")
        self.momentum_buffers = buffers

    @staticmethod
    def _flagged(flags: Any, names: list[str]) -> set[str]:
        """The parameters that :data:`HAS_BUFFER_KEY`'s flags say have a momentum buffer."""
        host = to_numpy(flags) if hasattr(flags, "shape") and hasattr(flags, "dtype") else None
        if host is None or host.dtype != np.bool_ or host.shape != (len(names),):
            got = (f"dtype {host.dtype}, shape {host.shape}" if host is not None else type(flags).__name__)
            raise CheckpointError(f"optimiser state does not fit: {HAS_BUFFER_KEY} must be a bool array of shape "
                                  f"({len(names)},), one flag per parameter; got {got}")
        return {name for name, has in zip(names, host.tolist()) if has}


class LARS(SGD):
    r"""Layer-wise adaptive rate scaling, as NVIDIA apex's LARC wrapping SGD (SwAV's optimiser).

    Parameters
    ----------
    model : Module
    momentum : float, 0.9 in SwAV
    weight_decay : float, 1e-6 in SwAV
    trust_coefficient : float, 0.001
    eps : float, 1e-8
        (LARC's guard in the denominator)

    Notes
    -----
    Per parameter tensor, with norms over the whole tensor:

    .. math:: \alpha = \frac{\tau \lVert p \rVert}{\lVert g \rVert + \lambda \lVert p \rVert
              + \epsilon}, \qquad g \leftarrow \alpha\,(g + \lambda p)

    with :math:`\tau` = ``trust_coefficient`` (not the loss's temperature) and
    :math:`\lambda` = ``weight_decay``, then SGD with momentum and *no further* weight decay (LARC moves the decay into the
    scaled gradient). If :math:`\lVert p \rVert = 0` or :math:`\lVert g \rVert = 0` the gradient
    is left as it is (:math:`\alpha = 1`, no decay), as LARC does; no clipping (SwAV uses
    ``clip=False``). The norms and the guard stay on the device as 0-d arrays: no sync.
    """

    def __init__(
        self,
        model: Module,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        super().__init__(model, momentum, weight_decay)
        self.trust_coefficient = python_float(trust_coefficient, "trust_coefficient")
        self.eps = python_float(eps, "eps")
        if self.trust_coefficient <= 0 or self.eps < 0:  # a negative guard can zero the denominator
            raise ValueError(f"LARS needs trust_coefficient > 0 and eps >= 0, got {trust_coefficient}, {eps}")

    def _direction(self, p: Any, g: Any) -> Any:
        xp = array_namespace(p, g)
        p_norm = xp.sqrt(xp.sum(p * p))
        g_norm = xp.sqrt(xp.sum(g * g))
        usable = (p_norm > 0) & (g_norm > 0)
        one, zero = xp.asarray(1.0, dtype=p.dtype), xp.asarray(0.0, dtype=p.dtype)
        ratio = self.trust_coefficient * p_norm / (g_norm + self.weight_decay * p_norm + self.eps)
        adaptive_lr = xp.where(usable, ratio, one)
        decay = xp.where(usable, xp.asarray(self.weight_decay, dtype=p.dtype), zero)
        return (g + decay * p) * adaptive_lr

    def _fused_update(self, p: Any, g: Any, buf: Any, lr: float, first: bool) -> None:
        # one reduction launch per sum on CuPy; the kernel takes the square roots
        fused.lars_update(p, g, buf, fused.sum_of_squares(p), fused.sum_of_squares(g), lr, self.momentum,
                          self.weight_decay, self.trust_coefficient, self.eps, first)


def warmup_cosine_schedule(
    step: int,
    total_steps: int,
    base_lr: float,
    final_lr: float = 0.0,
    warmup_steps: int = 0,
    start_warmup: float = 0.0,
) -> float:
    r"""The learning rate at ``step`` (0-based): linear warm-up, then cosine decay.

    Parameters
    ----------
    step : int in ``[0, total_steps)``
    total_steps : int
        all steps of training (warm-up included)
    base_lr : float
        the rate reached at the end of the warm-up
    final_lr : float
        the rate the cosine decays to
    warmup_steps : int
    start_warmup : float
        the rate at step 0

    Notes
    -----
    As the official SwAV schedule (``np.linspace`` warm-up, then cosine over the rest):

    .. math:: \eta_t = \begin{cases}
              \eta_0 + (\eta_\text{base} - \eta_0)\,\frac{t}{T_w - 1} & t < T_w \\
              \eta_\text{final} + \frac12(\eta_\text{base} - \eta_\text{final})
              \big(1 + \cos\frac{\pi (t - T_w)}{T - T_w}\big) & t \ge T_w
              \end{cases}
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps {warmup_steps} must lie in [0, total_steps={total_steps}]")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, total_steps={total_steps})")
    if step < warmup_steps:
        if warmup_steps == 1:
            return float(start_warmup)
        return float(start_warmup + (base_lr - start_warmup) * step / (warmup_steps - 1))
    t, span = step - warmup_steps, total_steps - warmup_steps
    return float(final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * t / span)))
