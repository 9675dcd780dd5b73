"""Central-difference gradient checks, used by the tests and the notebooks.

The check every hand-written backward pass must pass::

    numeric = numerical_gradient(lambda: float(loss_of(x)), x)
    assert rel_error(analytic, numeric) < 1e-6       # in float64

Notes
-----
The central difference

.. math:: \\frac{\\partial f}{\\partial x_i} \\approx \\frac{f(x + h e_i) - f(x - h e_i)}{2h}

has error :math:`O(h^2)`; with :math:`h = 10^{-5}` in float64 that is about 1e-10 relative,
far below the 1e-6 we demand. In float32 the round-off :math:`\\epsilon / h` dominates, so
gradient checks are always run in float64.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from swav_ref.backend import array_namespace, to_numpy


def rel_error(a: Any, b: Any) -> float:
    """``max |a - b| / max(|a| + |b|)``, a scale-free distance between two arrays.

    Zero when both are zero. Host floats in, a host float out (a logging boundary).
    """
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    denom = np.max(np.abs(a) + np.abs(b))
    return 0.0 if denom == 0 else float(np.max(np.abs(a - b)) / denom)


def numerical_gradient(f: Callable[[], float], x: Any, h: float = 1e-5) -> Any:
    """The central-difference gradient of the scalar ``f()`` with respect to the array ``x``.

    ``x`` is perturbed in place, one entry at a time, and restored; ``f`` must read ``x``
    each time it is called. Returns an array of ``x``'s shape and namespace.

    Cost: ``2 * x.size`` calls of ``f``; keep the checked arrays small.
    """
    xp = array_namespace(x)
    if x.dtype != xp.float64:
        raise ValueError(f"gradient checks need float64, got {x.dtype}")
    grad = np.zeros(x.shape, dtype=np.float64)
    flat_shape = x.shape
    for idx in np.ndindex(*flat_shape):
        old = x[idx]
        x[idx] = old + h
        f_plus = f()
        x[idx] = old - h
        f_minus = f()
        x[idx] = old
        grad[idx] = (f_plus - f_minus) / (2.0 * h)
    return xp.asarray(grad) if xp is not np else grad


def check_gradient(f: Callable[[], float], x: Any, analytic: Any, h: float = 1e-5) -> float:
    """``rel_error(analytic, numerical_gradient(f, x))``: the number the tests bound."""
    return rel_error(analytic, numerical_gradient(f, x, h))
