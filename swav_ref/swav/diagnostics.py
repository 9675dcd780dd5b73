r"""Is SwAV learning, or has it collapsed? Prototype usage and a loss watchdog.

SwAV's characteristic failure: the network maps every image to the same point, every
prediction :math:`\operatorname{softmax}(s/\tau)` becomes uniform over the K prototypes,
and the loss settles at exactly :math:`\ln K` (the cross-entropy of any code against the
uniform prediction). Sinkhorn's equal-partition constraint is satisfied by the uniform
code too, so it does not prevent this; it only rules out the *other* trivial solution
(everything on one prototype).

- :func:`code_usage` -- how many prototypes are the favourite of some sample, and the
  entropies that tell sharp codes from uniform ones (backend arrays, no sync).
- :class:`CollapseMonitor` -- fed the loss as a host float at the logging boundary, warns
  once (:class:`CollapseWarning`) when it sits at :math:`\ln K`.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from swav_ref.backend import array_namespace, python_int

__all__ = ["CodeUsage", "CollapseMonitor", "CollapseWarning", "code_usage"]


@dataclass(frozen=True)
class CodeUsage:
    """Summary of a batch of codes (or predicted probabilities).

    Attributes
    ----------
    n_used : 0-d integer array
        Prototypes that are the arg-max of at least one row.
    entropy_of_mean : 0-d array
        Entropy of the mean code (how evenly the batch as a whole uses the prototypes).
        For Sinkhorn codes it is close to ``max_entropy`` by construction.
    mean_entropy : 0-d array
        Mean entropy of the individual rows: near 0 for sharp (confident) codes, near
        ``max_entropy`` when every row is uniform, the collapsed state.
    max_entropy : float
        :math:`\\ln K`, the upper bound of both entropies.
    """

    n_used: Any
    entropy_of_mean: Any
    mean_entropy: Any
    max_entropy: float


def code_usage(codes: Any) -> CodeUsage:
    r"""Prototype usage of codes Q (B, K) (or of predictions softmax(scores / tau)).

    Notes
    -----
    .. math::

        n_{\text{used}} &= \#\{k : \exists b,\ k = \arg\max_j Q_{bj}\}, \\
        H(\bar q) &= -\sum_k \bar q_k \ln \bar q_k, \qquad
            \bar q = \tfrac1B \textstyle\sum_b Q_b, \\
        \overline{H} &= \tfrac1B \textstyle\sum_b H(Q_b)

    with :math:`0 \ln 0 = 0`. Returned as backend arrays; convert them where you log.
    """
    if getattr(codes, "ndim", None) != 2:
        raise ValueError(f"code_usage: codes must be (B, K), got shape {getattr(codes, 'shape', None)}")
    xp = array_namespace(codes)
    n_prototypes = codes.shape[1]
    favourite = xp.argmax(codes, axis=1)  # (B,)
    prototype_ids = xp.arange(n_prototypes, dtype=favourite.dtype)
    used = xp.any(favourite[:, None] == prototype_ids[None, :], axis=0)  # (K,)
    n_used = xp.sum(xp.astype(used, favourite.dtype))
    mean_code = xp.mean(codes, axis=0)
    return CodeUsage(
        n_used=n_used,
        entropy_of_mean=_entropy(mean_code, axis=0),
        mean_entropy=xp.mean(_entropy(codes, axis=1)),
        max_entropy=math.log(n_prototypes),
    )


def _entropy(p: Any, axis: int) -> Any:
    xp = array_namespace(p)
    positive = p > 0
    safe = xp.where(positive, p, xp.ones_like(p))  # log(1) = 0 stands in for 0 ln 0
    return -xp.sum(p * xp.log(safe), axis=axis)


class CollapseWarning(UserWarning):
    """The SwAV loss has sat at ln K: the representation has collapsed."""


class CollapseMonitor:
    r"""Warns once when the loss stays within ``tolerance`` of :math:`\ln K` for ``window`` steps.

    Parameters
    ----------
    n_prototypes : int
        K.
    window : int
        Consecutive logged losses that must all be near :math:`\ln K` (default 100). At
        initialisation the loss is also near :math:`\ln K`; the window gives training time
        to move away from it.
    tolerance : float
        Absolute distance from :math:`\ln K`, in nats (default 0.01).

    Examples
    --------
    >>> monitor = CollapseMonitor(n_prototypes=30)
    >>> for step in range(steps):                       # doctest: +SKIP
    ...     loss, grad = swav_loss(scores, batch_size)
    ...     if step % log_every == 0:
    ...         monitor.update(float(loss))             # the logging boundary
    """

    def __init__(self, n_prototypes: int, window: int = 100, tolerance: float = 0.01):
        # a NumPy integer (K read from a config array) is an integer too
        n_prototypes = python_int(n_prototypes, "CollapseMonitor: n_prototypes", minimum=2)
        window = python_int(window, "CollapseMonitor: window")
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"CollapseMonitor: tolerance must be a positive number, got {tolerance!r}")
        self.n_prototypes = n_prototypes
        self.window = window
        self.tolerance = tolerance
        self.log_k = math.log(self.n_prototypes)
        self.fired = False
        self._recent: deque[float] = deque(maxlen=self.window)

    def remember(self, losses: Iterable[float]) -> None:
        """Record earlier losses (host floats) without warning: a resumed run's, read back
        from its log, so that the window spans the resume and a run split into jobs
        shorter than the window is watched as one run."""
        self._recent.extend(float(x) for x in losses)

    def update(self, loss: float) -> bool:
        """Record one loss (a host float); returns True on the call that warns."""
        self._recent.append(float(loss))
        if self.fired or not self.collapsed:
            return False
        self.fired = True
        warnings.warn(self.message(), CollapseWarning, stacklevel=2)
        return True

    @property
    def collapsed(self) -> bool:
        """True when the last ``window`` losses are all within ``tolerance`` of ln K."""
        return len(self._recent) == self.window and all(
            abs(x - self.log_k) <= self.tolerance for x in self._recent
        )

    def message(self) -> str:
        """The text of the :class:`~swav_ref.swav.diagnostics.CollapseWarning`: the level
        the loss sat at, what collapse means, and the settings to try against it."""
        return (
            f"SwAV loss has stayed within {self.tolerance} of ln K = ln {self.n_prototypes} = "
            f"{self.log_k:.4f} for {self.window} logged steps. This is collapse: the predictions "
            "are uniform over the prototypes, so every image gets the uniform code and the "
            "features carry no information about the image. Things to try: a lower epsilon "
            "(sharper codes), a lower learning rate or longer warm-up, freezing the prototypes "
            "for longer (freeze_prototypes_niters), starting the queue later or using a shorter "
            "one, more prototypes or more crops; check that features and prototypes are "
            "L2-normalised."
        )
