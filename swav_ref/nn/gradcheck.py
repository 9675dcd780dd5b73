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

    Zero when both are zero. Arrays of any backend in (copied to the host as float64), a
    host float out: a check's boundary, not a step of numerical code.
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
    for idx in np.ndindex(*x.shape):
        grad[idx] = _central_difference(f, x, idx, h)
    return xp.asarray(grad) if xp is not np else grad


def _central_difference(f: Callable[[], float], x: Any, idx: tuple[int, ...], h: float) -> float:
    """``(f(x + h e_idx) - f(x - h e_idx)) / 2h``, with ``x[idx]`` restored afterwards."""
    old = float(x[idx])  # a copy: on CuPy x[idx] is a 0-d view that the next line would change
    x[idx] = old + h
    f_plus = f()
    x[idx] = old - h
    f_minus = f()
    x[idx] = old
    return (f_plus - f_minus) / (2.0 * h)


def check_gradient(f: Callable[[], float], x: Any, analytic: Any, h: float = 1e-5) -> float:
    """``rel_error(analytic, numerical_gradient(f, x))``: the number the tests bound."""
    return rel_error(analytic, numerical_gradient(f, x, h))


def check_gradient_sampled(
    f: Callable[[], float], x: Any, analytic: Any, samples: int = 20, seed: int = 0, h: float = 1e-5
) -> float:
    """:func:`check_gradient` on ``samples`` randomly chosen entries of ``x`` only.

    For tensors too big to perturb entry by entry (a network's weights): the entries are
    drawn without replacement (all of them when ``x`` has no more than ``samples``), and
    the relative error is taken over those entries. Cost: ``2 * samples`` calls of ``f``.
    """
    xp = array_namespace(x)
    if x.dtype != xp.float64:
        raise ValueError(f"gradient checks need float64, got {x.dtype}")
    if tuple(analytic.shape) != tuple(x.shape):
        raise ValueError(f"analytic gradient has shape {tuple(analytic.shape)}, x has {tuple(x.shape)}")
    size = int(np.prod(x.shape))
    flat = np.random.default_rng(seed).choice(size, size=min(samples, size), replace=False)
    analytic_host = to_numpy(analytic)
    numeric, expected = [], []
    for index in flat:
        idx = tuple(int(i) for i in np.unravel_index(int(index), x.shape))
        numeric.append(_central_difference(f, x, idx, h))
        expected.append(analytic_host[idx])
    return rel_error(np.asarray(expected), np.asarray(numeric))


def projected_loss(module: Any, x: Any, r: Any) -> Callable[[], float]:
    r"""The scalar :math:`L = \sum_i y_i r_i` with :math:`y = \text{module}(x)`, as a function
    of no arguments for the checks above.

    Its gradient with respect to ``y`` is ``r`` itself, so ``module.backward(r)`` gives the
    analytic gradients of :math:`L` to compare with. Each call runs a fresh forward and
    drops the cache it leaves, so the finite differences do not pile up pending backwards.
    """

    def loss() -> float:
        value = float(array_namespace(r).sum(module.forward(x) * r))
        module.clear_cache()
        return value

    return loss
