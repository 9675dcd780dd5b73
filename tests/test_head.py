"""The SwAV head module and the whole model (ResNet + head + swapped loss): float64
gradient checks against central differences, and agreement with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

import required

from swav_ref.backend import Random, asarray, to_numpy
from swav_ref.nn.gradcheck import check_gradient_sampled, numerical_gradient, rel_error
from swav_ref.nn.resnet import ResNet
from swav_ref.swav import swapped_prediction_loss, sinkhorn_codes
from swav_ref.swav.head import ClassifierHead, SwAVHead


def _model(xp, n_prototypes=(7,)):
    backbone = ResNet(1, widths=(4, 6), blocks=(1, 1), xp=xp, dtype="float64", rng=Random(0))
    head = SwAVHead(backbone.out_dim, 8, 5, n_prototypes, xp=xp, dtype="float64", rng=Random(1))
    return backbone, head


def _objective(backbone, head, crops, batch, codes):
    """Swapped loss of 2 large + 2 small crops with fixed codes; returns (loss, dscores...)."""
    xp = backbone.xp
    feats = backbone.forward_groups([xp.concat(crops[:2], axis=0), xp.concat(crops[2:], axis=0)])
    _, scores = head.forward(xp.concat(feats, axis=0))
    total, grads = 0.0, []
    for h, s in enumerate(scores):
        loss, grad = swapped_prediction_loss(s, codes[h], batch)
        total = total + loss
        grads.append(grad)
    return total, grads


def _whole_model_step(xp, n_prototypes, batch):
    """The model, its crops and codes, and one forward and backward of the swapped loss:
    ``(backbone, head, crops, codes, loss, dinputs)``, from the same seeds on every backend."""
    rng = np.random.default_rng(0)
    backbone, head = _model(xp, n_prototypes)
    crops = [asarray(rng.normal(size=(batch, 1, s, s)), xp) for s in (6, 6, 4, 4)]
    # codes from the untrained model, then held fixed (they are constants of the loss)
    _, scores = head.forward(xp.concat(backbone.forward_groups(
        [xp.concat(crops[:2], axis=0), xp.concat(crops[2:], axis=0)]), axis=0))
    codes = [[sinkhorn_codes(s[i * batch:(i + 1) * batch, :]) for i in (0, 1)] for s in scores]
    backbone.clear_cache(), head.clear_cache()
    backbone.zero_grad(), head.zero_grad()
    loss, dscores = _objective(backbone, head, crops, batch, codes)
    dfeat = head.backward(dscores)
    dinputs = backbone.backward_groups([dfeat[:2 * batch, :], dfeat[2 * batch:, :]])
    return backbone, head, crops, codes, loss, dinputs


def _assert_whole_model_matches_numpy(xp, n_prototypes, batch):
    """The array_api_strict lane: the same step on ``xp`` and on NumPy gives the same codes,
    loss, input gradients and parameter gradients, to 1e-12. The lane proves the code uses
    only the Array API; the NumPy (and CuPy) lanes check the calculus by central differences,
    which would cost hundreds of forwards on array_api_strict."""
    results = []
    for lane in (np, xp):
        backbone, head, _, codes, loss, dinputs = _whole_model_step(lane, n_prototypes, batch)
        assert backbone.num_pending() == 0 and head.num_pending() == 0
        arrays = [to_numpy(c) for per_head in codes for c in per_head] + [to_numpy(d) for d in dinputs]
        grads = {f"{prefix}.{name}": to_numpy(owner.grads[key])
                 for prefix, module in (("backbone", backbone), ("head", head))
                 for name, owner, key in module.named_parameters()}
        results.append((float(loss), arrays, grads))
    (loss_np, arrays_np, grads_np), (loss_b, arrays_b, grads_b) = results
    assert abs(loss_np - loss_b) <= 1e-12 * abs(loss_np), (loss_np, loss_b)
    assert len(arrays_np) == len(arrays_b)
    for i, (a, b) in enumerate(zip(arrays_np, arrays_b)):
        assert rel_error(a, b) < 1e-12, i
    assert grads_np.keys() == grads_b.keys()
    for name in grads_np:
        assert rel_error(grads_np[name], grads_b[name]) < 1e-12, name


@pytest.mark.parametrize("n_prototypes", [(7,), (7, 3)])
def test_whole_model_gradients(backend, n_prototypes):
    xp, batch = backend, 3
    if xp.__name__ == "array_api_strict":
        _assert_whole_model_matches_numpy(xp, n_prototypes, batch)
        return
    backbone, head, crops, codes, _, dinputs = _whole_model_step(xp, n_prototypes, batch)

    def f():
        loss, _ = _objective(backbone, head, crops, batch, codes)
        backbone.clear_cache(), head.clear_cache()
        return float(loss)

    # input gradient of the first crop (large)
    err = check_gradient_sampled(f, crops[0], dinputs[0][:batch, ...], samples=12)
    assert err < 1e-6, err
    for module in (backbone, head):
        for name, owner, key in module.named_parameters():
            grad = owner.grads[key]
            if np.max(np.abs(to_numpy(grad))) < 1e-12:
                # a bias followed by BatchNorm: its gradient is exactly zero (BN subtracts
                # the mean), so check that the numerical one is zero too, absolutely
                numeric = numerical_gradient(f, owner.params[key])
                assert np.max(np.abs(to_numpy(numeric))) < 1e-8, name
                continue
            err = check_gradient_sampled(f, owner.params[key], grad, samples=6)
            assert err < 1e-6, (name, err)


def test_head_matches_torch():
    torch = required.module("torch")
    xp = np
    head = SwAVHead(6, 8, 5, (7,), xp=xp, dtype="float64", rng=Random(2))
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).double()
    state = head.state_dict()
    with torch.no_grad():
        for i, layer in ((0, "0"), (1, "1"), (3, "3")):
            for p in ("weight", "bias"):
                getattr(ref[i], p).copy_(torch.from_numpy(state[f"projection.{layer}.{p}"]))
    protos = torch.tensor(state["prototypes0.weight"], requires_grad=True)
    x_np = np.random.default_rng(1).normal(size=(10, 6))
    g_np = np.random.default_rng(2).normal(size=(10, 7))
    x = torch.tensor(x_np, requires_grad=True)
    z = torch.nn.functional.normalize(ref(x), dim=1)
    scores_t = z @ protos.T
    (scores_t * torch.from_numpy(g_np)).sum().backward()
    emb, scores = head.forward(x_np)
    dx = head.backward([g_np])
    np.testing.assert_allclose(emb, z.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(scores[0], scores_t.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(dx, x.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(head.prototype_layer(0).grads["weight"], protos.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(head.projection[0].grads["weight"], ref[0].weight.grad.numpy(), atol=1e-10)


def test_prototype_upkeep(backend):
    """Re-normalising and freezing reach every prototype set (DeepCluster-v2 has three; a
    loop over the first alone left the others drifting), and setting a set copies the
    caller's array instead of adopting it."""
    _, head = _model(backend, (7, 3))
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(k, 5)) * 3 for k in (7, 3)]
    for h, w in enumerate(weights):
        given = asarray(w.copy(), backend)
        head.set_prototype_weight(h, given)
        given *= 0.0
        np.testing.assert_array_equal(to_numpy(head.prototype_weight(h)), w)
    head.normalize_prototypes()
    for h in range(2):
        np.testing.assert_allclose(np.linalg.norm(to_numpy(head.prototype_weight(h)), axis=1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="expected shape"):
        head.set_prototype_weight(0, asarray(np.zeros((3, 5)), backend))
    for h, w in enumerate(weights):
        head.prototype_layer(h).grads["weight"] = asarray(w, backend)
    head.drop_prototype_gradients()
    assert all(head.prototype_layer(h).grads["weight"] is None for h in range(2))


def test_an_eval_forward_between_forward_and_backward_changes_nothing():
    """An eval-mode forward (a kNN check mid-step) keeps no cache; one kept made the next
    backward use the eval batch's activations."""
    rng = np.random.default_rng(0)
    x1, x2, g = rng.normal(size=(2, 4)), rng.normal(size=(2, 4)), rng.normal(size=(2, 5))
    reference = SwAVHead(4, 0, 3, (5,), rng=0, dtype="float64")
    reference.forward(x1)
    reference.backward([g])
    head = SwAVHead(4, 0, 3, (5,), rng=0, dtype="float64")
    head.forward(x1)
    head.eval()
    head.forward(x2)
    head.train()
    head.backward([g])
    assert head.num_pending() == 0
    np.testing.assert_allclose(head.prototype_layer(0).grads["weight"], reference.prototype_layer(0).grads["weight"])


def test_classifier_head_interface(backend):
    head = ClassifierHead(4, 3, xp=backend, dtype="float64", rng=Random(0))
    x = asarray(np.ones((2, 4)), backend)
    feats, logits = head.forward(x)
    assert feats is x and tuple(logits[0].shape) == (2, 3)
    assert tuple(head.backward([logits[0]]).shape) == (2, 4)


def test_swav_head_backward_refuses_a_gradient_of_another_dtype():
    head = SwAVHead(6, 0, 4, (5,), rng=0)
    head.forward(np.ones((3, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="float32 parameters but got a float64 gradient"):
        head.backward([np.ones((3, 5))])
    assert head.num_pending() == 2  # the head's and the projection's caches survived
    head.backward([np.ones((3, 5), dtype=np.float32)])
    assert head.prototype_layer(0).grads["weight"].dtype == np.float32


@pytest.mark.parametrize("module", ["codes", "loss", "head", "queue", "diagnostics"])
def test_swav_package_re_exports_every_public_name(module):
    """docs/api.md promises ``from swav_ref.swav import X`` for the main names of the modules
    (SwAVHead and ClassifierHead were missing)."""
    import importlib

    import swav_ref.swav as package

    mod = importlib.import_module(f"swav_ref.swav.{module}")
    for name in mod.__all__:
        assert name in package.__all__ and getattr(package, name) is getattr(mod, name), name


@pytest.mark.parametrize(
    "args, match",
    [((0, 8, 5, (7,)), r"SwAVHead: in_dim must be a positive integer, got 0"),  # was ZeroDivisionError
     ((6, 8, 0, (7,)), r"SwAVHead: out_dim must be a positive integer, got 0"),
     ((6, -1, 5, (7,)), r"SwAVHead: hidden_dim must be an integer >= 0, got -1"),
     ((6, 8, 5, (7, 0)), r"SwAVHead: n_prototypes must be a positive integer, got 0"),
     ((6, 8, 5, 7.0), r"SwAVHead: n_prototypes must be a positive integer, got 7.0"),
     ((6, 8, 5, ()), r"SwAVHead: n_prototypes must name at least one prototype set"),
     ((6.0, 8, 5, (7,)), r"SwAVHead: in_dim must be a positive integer, got 6.0")],
)
def test_swav_head_refuses_bad_dimensions(args, match):
    with pytest.raises(ValueError, match=match):
        SwAVHead(*args, rng=0)


def test_swav_head_defaults_to_swavs_3000_prototypes():
    """The official n_prototypes (ImageNet's K = 3000), as for the other SwAV defaults."""
    assert tuple(SwAVHead(4, 0, 3, rng=0).prototype_weight(0).shape) == (3000, 3)


def test_heads_accept_numpy_integer_dimensions():
    head = SwAVHead(np.int64(6), np.int64(0), np.int64(4), np.int64(5), rng=0)
    assert head.n_sets == 1 and tuple(head.prototype_weight(0).shape) == (5, 4)
    with pytest.raises(ValueError, match="ClassifierHead: n_classes must be a positive integer, got 0"):
        ClassifierHead(4, 0, rng=0)
