"""Pure forward/backward pairs, CS231n style.

Each operation is two functions::

    out, cache = op_forward(x, ...)
    dx, ...    = op_backward(dout, cache)

They hold no state, take and return arrays of any Array-API namespace, and never average
over the batch (the 1/N belongs to the loss). Shapes use PyTorch's conventions (NCHW).
"""

from __future__ import annotations

from typing import Any

from swav_ref.backend import array_namespace


def l2_normalize_forward(x: Any, eps: float = 1e-12) -> tuple[Any, tuple]:
    r"""Scale each row of ``x`` (N, D) to unit length.

    Notes
    -----
    .. math:: y_i = \frac{x_i}{\max(\lVert x_i \rVert, \epsilon)}

    ``eps`` only guards an all-zero row (PyTorch's ``F.normalize`` does the same).
    """
    xp = array_namespace(x)
    norm = xp.sqrt(xp.sum(x * x, axis=1, keepdims=True))
    norm = xp.maximum(norm, eps)
    y = x / norm
    return y, (y, norm)


def l2_normalize_backward(dy: Any, cache: tuple) -> Any:
    r"""Gradient of :func:`l2_normalize_forward`.

    Notes
    -----
    With :math:`y = x / \lVert x \rVert`, the Jacobian is
    :math:`(I - y y^\top) / \lVert x \rVert`, so

    .. math:: \frac{\partial L}{\partial x} = \frac{g - y\,(y^\top g)}{\lVert x \rVert},
              \qquad g = \frac{\partial L}{\partial y}

    i.e. the incoming gradient with its component along ``y`` removed: moving along the
    unit vector does not change a normalised output.
    """
    xp = array_namespace(dy)
    y, norm = cache
    return (dy - y * xp.sum(y * dy, axis=1, keepdims=True)) / norm
