"""Optimisers (SGD, LARS) and the warm-up + cosine learning-rate schedule.

Both optimisers walk ``model.named_parameters()`` at every step and update
``module.params[key]`` in place. A parameter whose gradient is ``None`` is skipped
entirely (no weight decay, no momentum update): that is how SwAV keeps its prototypes
frozen for the first iterations. The learning rate is passed to each :meth:`~SGD.step`, from
:func:`warmup_cosine_schedule`. Optimiser state is a flat dict of arrays keyed by parameter
name, so a checkpoint needs no pickle.

On CuPy each parameter's whole update is one fused kernel (:func:`swav_ref.fused.sgd_update`,
:func:`swav_ref.fused.lars_update`) instead of five to fifteen small array operations;
the array code here is the reference the kernels are tested against.
"""

from __future__ import annotations

import math
from typing import Any

from swav_ref import fused
from swav_ref.backend import array_namespace, asarray, python_float
from swav_ref.nn.layers import Module

__all__ = ["LARS", "SGD", "warmup_cosine_schedule"]


class SGD:
    r"""Stochastic gradient descent with momentum and weight decay (PyTorch's semantics).

    Parameters
    ----------
    model : Module
    momentum : float
    weight_decay : float

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
        """Momentum buffers by parameter name (copies)."""
        return {name: array_namespace(b).asarray(b, copy=True) for name, b in self.momentum_buffers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; ``ValueError`` for unknown names or shapes."""
        params = {name: module.params[key] for name, module, key in self.model.named_parameters()}
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"optimiser state for unknown parameters: {unknown}")
        bad = [f"{n}: {tuple(state[n].shape)} vs {tuple(params[n].shape)}" for n in state
               if tuple(state[n].shape) != tuple(params[n].shape)]  # fmt: skip
        if bad:
            raise ValueError("optimiser state shape mismatch: " + "; ".join(bad))
        self.momentum_buffers = {}
        for name, value in state.items():
            xp = array_namespace(params[name])
            self.momentum_buffers[name] = xp.asarray(asarray(value, xp, params[name].dtype), copy=True)


class LARS(SGD):
    r"""Layer-wise adaptive rate scaling, as NVIDIA apex's LARC wrapping SGD (SwAV's optimiser).

    Parameters
    ----------
    model : Module
    momentum : float, 0.9 in SwAV
    weight_decay : float, 1e-6 in SwAV
    trust_coefficient : float, 0.001
    eps : float, 1e-8 (LARC's guard in the denominator)

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
    total_steps : int, all steps of training (warm-up included)
    base_lr : float, the rate reached at the end of the warm-up
    final_lr : float, the rate the cosine decays to
    warmup_steps : int
    start_warmup : float, the rate at step 0

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
