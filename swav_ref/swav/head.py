r"""The prototype layer: scores = normalize(z) @ C^T, its backward, and its upkeep.

SwAV's head ends in an L2 normalisation and a bias-free linear layer whose K rows are the
prototypes :math:`C` (K, d). Because both the embeddings and the prototypes have unit
length, the scores are cosines in [-1, 1], which is what keeps ``exp(score / eps)`` in
Sinkhorn tame.

Functional pairs (CS231n style)::

    scores, cache = prototypes_forward(z, weight)
    dz, dweight   = prototypes_backward(dscores, cache)

plus the two things the training loop does to the prototypes outside back-propagation:
:func:`normalize_prototypes` (every step, before the forward pass) and
:func:`prototypes_frozen` (no update at all during the first iterations).

The modules built on them: :class:`SwAVHead`, the whole head after the backbone (projection
MLP, L2 normalisation, one set of prototypes, or several for DeepCluster-v2), and
:class:`ClassifierHead`, a linear layer over the backbone's features that the trainer uses
for the supervised baseline in the same training loop (no prototypes, no normalisation).
"""

from __future__ import annotations

import numbers
import operator

import numpy as np
from typing import Any, NamedTuple

from swav_ref.backend import array_namespace, python_int
from swav_ref.nn.functional import l2_normalize_backward, l2_normalize_forward
from swav_ref.nn.layers import BatchNorm1d, Linear, Module, ReLU, Sequential

__all__ = [
    "ClassifierHead",
    "PrototypesCache",
    "SwAVHead",
    "normalize_prototypes",
    "prototypes_backward",
    "prototypes_forward",
    "prototypes_frozen",
]


class PrototypesCache(NamedTuple):
    """What :func:`prototypes_backward` needs. ``embedding`` is also what the queue stores."""

    embedding: Any  # (N, d) the L2-normalised z
    weight: Any  # (K, d) the prototypes used in the forward pass
    norm_cache: tuple  # l2_normalize_forward's cache


def prototypes_forward(z: Any, weight: Any) -> tuple[Any, PrototypesCache]:
    r"""Scores of the embeddings against the prototypes.

    Parameters
    ----------
    z : array (N, d)
        Projection-head outputs (not yet normalised).
    weight : array (K, d)
        The prototypes, one per row (PyTorch's ``nn.Linear(d, K, bias=False).weight``).

    Returns
    -------
    scores : array (N, K)
    cache : PrototypesCache
        ``cache.embedding`` is the normalised embedding (N, d), the one the queue stores.

    Notes
    -----
    .. math:: e_i = \frac{z_i}{\lVert z_i \rVert}, \qquad S = E\, C^\top
    """
    if z.ndim != 2 or weight.ndim != 2 or z.shape[1] != weight.shape[1]:
        raise ValueError(
            f"prototypes_forward: z (N, d) and weight (K, d) must share d, got shapes "
            f"{tuple(z.shape)} and {tuple(weight.shape)}"
        )
    embedding, norm_cache = l2_normalize_forward(z)
    scores = embedding @ weight.T
    return scores, PrototypesCache(embedding, weight, norm_cache)


def prototypes_backward(dscores: Any, cache: PrototypesCache) -> tuple[Any, Any]:
    r"""Gradients of :func:`prototypes_forward`.

    Parameters
    ----------
    dscores : array (N, K)
        d loss / d scores.
    cache : PrototypesCache

    Returns
    -------
    dz : array (N, d)
    dweight : array (K, d)

    Notes
    -----
    .. math::

        \frac{\partial L}{\partial C} &= G^\top E, \qquad
        \frac{\partial L}{\partial E} = G\, C, \\
        \frac{\partial L}{\partial z_i} &= \frac{g_i - e_i (e_i^\top g_i)}{\lVert z_i \rVert}
        \ \text{ with } g_i = (G C)_i,

    where :math:`G = \partial L / \partial S`. The last step is
    :func:`~swav_ref.nn.functional.l2_normalize_backward`.

    The gradient of C is taken at the weight used in the forward pass. The prototypes are
    re-normalised outside back-propagation (:func:`normalize_prototypes`), so no gradient
    flows through that normalisation, as in the official code.
    """
    embedding, weight, norm_cache = cache
    dweight = dscores.T @ embedding
    dembedding = dscores @ weight
    dz = l2_normalize_backward(dembedding, norm_cache)
    return dz, dweight


def normalize_prototypes(weight: Any) -> Any:
    r"""The prototypes re-scaled to unit rows (a new array; ``weight`` is not modified).

    Notes
    -----
    .. math:: c_k \leftarrow c_k / \lVert c_k \rVert

    The official training loop does this at the start of every step, before the forward
    pass, without gradient (``w = normalize(w, dim=1); weight.copy_(w)``). It keeps the
    scores cosines; the optimiser step may push the rows off the unit sphere in between.
    """
    if weight.ndim != 2:
        raise ValueError(f"normalize_prototypes: weight must be (K, d), got shape {tuple(weight.shape)}")
    array_namespace(weight)  # rejects non-arrays with a clear TypeError
    return l2_normalize_forward(weight)[0]


def prototypes_frozen(iteration: int, freeze_iters: int) -> bool:
    """Whether the prototypes receive no update at this iteration.

    The official code drops the prototype gradients (``p.grad = None``) while
    ``iteration < freeze_prototypes_niters``, counting iterations over all epochs
    (``epoch * iters_per_epoch + it``). The optimiser then skips them entirely: no step, no
    momentum, no weight decay. Our trainer does the same by setting the prototype gradient
    to ``None``. Letting the prototypes move only once the network produces meaningful
    scores makes early collapse less likely.

    Parameters
    ----------
    iteration : int
        Global iteration count, from 0.
    freeze_iters : int
        ``freeze_prototypes_niters`` (official 313 on ImageNet, about one epoch at batch
        4096); 0 never freezes.
    """
    checked = []
    for name, value in (("iteration", iteration), ("freeze_iters", freeze_iters)):
        try:
            checked.append(operator.index(value))
        except TypeError:
            checked.append(-1)
        if isinstance(value, bool) or checked[-1] < 0:
            raise ValueError(f"prototypes_frozen: {name} must be a non-negative integer, got {value!r}")
    return checked[0] < checked[1]


# ---------------------------------------------------------------------------------------
# The head as a module: projection MLP, L2 normalisation, one or several prototype sets.
# ---------------------------------------------------------------------------------------


class SwAVHead(Module):
    r"""SwAV's head: Linear-BN-ReLU-Linear, L2 normalisation, prototypes.

    Parameters
    ----------
    in_dim
        the backbone's feature size D.
    hidden_dim
        width of the projection MLP (0 = a single Linear layer).
    out_dim
        d, the embedding size.
    n_prototypes
        K, or a tuple of K's for several prototype sets (DeepCluster-v2 uses
        three; SwAV one).
    xp, dtype, rng
        backend, dtype and seeded generator for the initialisation.

    Notes
    -----
    All sizes are positive integers (``hidden_dim`` may be 0); NumPy integers are accepted.

    ``forward(features) -> (embedding, [scores_h])``: the unit-norm embedding (N, d), which
    the queue and the memory bank store, and the scores (N, K_h) of each prototype set.
    ``backward([dscores_h]) -> dfeatures``. The prototypes are parameters named
    ``prototypes{h}.weight`` (K_h, d), initialised like PyTorch's bias-free Linear.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_prototypes: Any = (3000,), *,
                 xp: Any = None, dtype: Any = "float32", rng: Any = None):
        in_dim, out_dim = python_int(in_dim, "SwAVHead: in_dim"), python_int(out_dim, "SwAVHead: out_dim")
        hidden_dim = python_int(hidden_dim, "SwAVHead: hidden_dim", minimum=0)
        sizes = (n_prototypes,) if isinstance(n_prototypes, numbers.Number) else tuple(n_prototypes)
        if not sizes:
            raise ValueError("SwAVHead: n_prototypes must name at least one prototype set, got ()")
        sizes = tuple(python_int(k, "SwAVHead: n_prototypes") for k in sizes)
        xp = np if xp is None else xp
        super().__init__(xp, dtype)
        kw = {"xp": xp, "dtype": dtype, "rng": rng}
        if hidden_dim:
            self.projection = Sequential(
                Linear(in_dim, hidden_dim, **kw), BatchNorm1d(hidden_dim, xp=xp, dtype=dtype), ReLU(xp=xp, dtype=dtype),
                Linear(hidden_dim, out_dim, **kw),
            )
        else:
            self.projection = Linear(in_dim, out_dim, **kw)
        self.n_sets = len(sizes)
        for h, k in enumerate(sizes):
            setattr(self, f"prototypes{h}", Linear(out_dim, k, bias=False, **kw))

    def prototype_layer(self, h: int = 0) -> Module:
        """The bias-free :class:`~swav_ref.nn.layers.Linear` layer holding prototype set ``h``."""
        return getattr(self, f"prototypes{h}")

    def prototype_weight(self, h: int = 0) -> Any:
        """The (K_h, d) prototype matrix of set ``h``."""
        return self.prototype_layer(h).params["weight"]

    def set_prototype_weight(self, h: int, weight: Any) -> None:
        """Overwrite set ``h`` (DeepCluster-v2 sets the prototypes to the k-means centroids)."""
        layer = self.prototype_layer(h)
        if tuple(weight.shape) != tuple(layer.params["weight"].shape):
            raise ValueError(f"prototype set {h}: expected shape {tuple(layer.params['weight'].shape)}, "
                             f"got {tuple(weight.shape)}")
        layer.params["weight"] = self.xp.asarray(weight, dtype=self.dtype, copy=True)

    def normalize_prototypes(self) -> None:
        """Every prototype back to unit length (the official start of each step)."""
        for h in range(self.n_sets):
            layer = self.prototype_layer(h)
            layer.params["weight"] = normalize_prototypes(layer.params["weight"])

    def drop_prototype_gradients(self) -> None:
        """Freeze the prototypes for this step: the optimiser skips a ``None`` gradient."""
        for h in range(self.n_sets):
            self.prototype_layer(h).grads["weight"] = None

    def forward(self, features: Any) -> tuple[Any, list]:
        z = self.projection.forward(features)
        outputs = [prototypes_forward(z, self.prototype_weight(h)) for h in range(self.n_sets)]
        if self.training:
            self._caches.append([cache for _, cache in outputs])
        return outputs[0][1].embedding, [scores for scores, _ in outputs]

    def backward(self, dscores: Any) -> Any:
        if not self._caches:
            raise RuntimeError("SwAVHead.backward called with no pending forward")
        for ds in dscores:
            self._check_gradient(ds)  # before popping: nothing is lost
        if len(dscores) != len(self._caches[-1]):  # as is this
            raise ValueError(f"SwAVHead.backward: {len(dscores)} score gradients for {len(self._caches[-1])} "
                             "prototype sets")
        caches = self._caches.pop()
        dz = None
        for h, (ds, cache) in enumerate(zip(dscores, caches)):
            dz_h, dweight = prototypes_backward(ds, cache)
            self.prototype_layer(h)._accumulate("weight", dweight)
            dz = dz_h if dz is None else dz + dz_h
        return self.projection.backward(dz)


class ClassifierHead(Module):
    """The supervised baseline's head, with :class:`SwAVHead`'s interface: a Linear layer
    whose logits play the part of the scores (``forward -> (features, [logits])``)."""

    n_sets = 1

    def __init__(self, in_dim: int, n_classes: int, *, xp: Any = None, dtype: Any = "float32", rng: Any = None):
        in_dim = python_int(in_dim, "ClassifierHead: in_dim")
        n_classes = python_int(n_classes, "ClassifierHead: n_classes")
        xp = np if xp is None else xp
        super().__init__(xp, dtype)
        self.fc = Linear(in_dim, n_classes, xp=xp, dtype=dtype, rng=rng)

    def forward(self, features: Any) -> tuple[Any, list]:
        return features, [self.fc.forward(features)]

    def backward(self, dscores: Any) -> Any:
        return self.fc.backward(dscores[0])

    def normalize_prototypes(self) -> None:  # no prototypes: nothing to do
        pass

    def drop_prototype_gradients(self) -> None:
        pass
