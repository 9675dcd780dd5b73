"""The ResNet backbone: whole-network gradient checks, PyTorch agreement, crop groups."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import required

from swav_ref.backend import asarray, to_numpy
from swav_ref.nn.gradcheck import check_gradient, check_gradient_sampled, projected_loss, rel_error
from swav_ref.nn.resnet import BasicBlock, ResNet, resnet18, resnet_tiny

TOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]


def _torch_mirror():
    """PyTorch's ``Block(cin, cout, stride)`` and ``ResNet(in_channels, widths, blocks)`` with
    our parameter names: the ones benchmarks/bench_resnet.py measures against."""
    torch = required.module("torch")
    spec = importlib.util.spec_from_file_location("bench_resnet", ROOT / "benchmarks" / "bench_resnet.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return torch, bench.torch_block(torch), functools.partial(bench.torch_mirror, torch)


def _load_into_torch(torch, ours, theirs):
    theirs.double().load_state_dict({k: torch.tensor(to_numpy(v)) for k, v in ours.state_dict().items()})


def _randomise_bn(module, rng):
    """Non-trivial BatchNorm affine parameters, so their gradients are not special."""
    for _, owner in module.named_modules():
        if "running_mean" in owner.buffers:
            c = owner.params["weight"].shape[0]
            xp = owner.xp
            owner.params["weight"] = asarray(rng.uniform(0.5, 1.5, size=c), xp, "float64")
            owner.params["bias"] = asarray(rng.normal(size=c) * 0.1, xp, "float64")


def _is_strict(xp) -> bool:
    return xp.__name__ == "array_api_strict"


def _assert_matches_numpy(build, xp, x_shape, seed=0):
    """The array_api_strict lane of a gradient test: the module ``build(lane, rng)`` makes
    computes on ``xp`` what it computes on NumPy from the same seeds and input (output, input
    gradient, every parameter gradient, and the state after the step), to 1e-12.

    The lane is there to prove the code uses only the Array API; the calculus is checked by
    central differences on the NumPy (and CuPy) lanes. One forward and backward per lane
    instead of the hundreds of forwards a sampled check costs on array_api_strict."""
    results = []
    for lane in (np, xp):
        rng = np.random.default_rng(seed)
        module = build(lane, rng)
        x = rng.normal(size=x_shape)
        out = module.forward(asarray(x, lane, "float64"))
        r = rng.normal(size=tuple(out.shape))
        module.zero_grad()
        dx = module.backward(asarray(r, lane, "float64"))
        assert module.num_pending() == 0
        grads = {name: to_numpy(owner.grads[key]) for name, owner, key in module.named_parameters()}
        state = {name: to_numpy(v) for name, v in module.state_dict().items()}
        results.append(([to_numpy(out), to_numpy(dx)], grads, state))
    (arrays_np, grads_np, state_np), (arrays_b, grads_b, state_b) = results
    for what, a, b in zip(("output", "input gradient"), arrays_np, arrays_b):
        assert rel_error(a, b) < 1e-12, what
    assert grads_np.keys() == grads_b.keys() and state_np.keys() == state_b.keys()
    for name in grads_np:
        assert rel_error(grads_np[name], grads_b[name]) < 1e-12, name
    for name in state_np:
        assert rel_error(state_np[name], state_b[name]) < 1e-12, name


def _check_network_gradients(net, x, rng, samples):
    xp = net.xp
    out = net.forward(x)
    r = asarray(rng.normal(size=out.shape), xp, "float64")
    net.zero_grad()
    dx = net.backward(r)
    assert net.num_pending() == 0
    f = projected_loss(net, x, r)
    assert check_gradient_sampled(f, x, dx, samples=samples) < TOL
    for name, owner, key in net.named_parameters():
        err = check_gradient_sampled(f, owner.params[key], owner.grads[key], samples=samples, seed=len(name))
        assert err < TOL, f"{name}: rel_error {err}"


@pytest.mark.parametrize("stride, in_planes, planes", [(1, 3, 3), (2, 2, 3), (1, 2, 4)])
def test_basic_block_gradients(backend, stride, in_planes, planes, rng):
    def build(xp, rng):
        block = BasicBlock(in_planes, planes, stride, rng=1, xp=xp, dtype="float64")
        _randomise_bn(block, rng)
        return block

    if _is_strict(backend):
        _assert_matches_numpy(build, backend, (2, in_planes, 5, 4))
        return
    block = build(backend, rng)
    assert (block.downsample is None) == (stride == 1 and in_planes == planes)
    x = asarray(rng.normal(size=(2, in_planes, 5, 4)), backend, "float64")
    out = block.forward(x)
    r = asarray(rng.normal(size=out.shape), backend, "float64")
    dx = block.backward(r)
    f = projected_loss(block, x, r)
    assert check_gradient(f, x, dx) < TOL
    for name, owner, key in block.named_parameters():
        err = check_gradient_sampled(f, owner.params[key], owner.grads[key], samples=12, seed=len(name))
        assert err < TOL, f"{name}: rel_error {err}"


def test_small_odd_resnet_gradients(backend, rng):
    """Two stages, a stride-2 projection, a non-square input, every parameter tensor."""
    def build(xp, rng):
        net = ResNet(2, widths=(3, 4), blocks=(1, 2), rng=3, xp=xp, dtype="float64")
        _randomise_bn(net, rng)
        return net

    if _is_strict(backend):
        _assert_matches_numpy(build, backend, (3, 2, 5, 7))
        return
    net = build(backend, rng)
    x = asarray(rng.normal(size=(3, 2, 5, 7)), backend, "float64")
    _check_network_gradients(net, x, rng, samples=8)


def test_resnet_tiny_gradients(backend, rng):
    if _is_strict(backend):
        _assert_matches_numpy(lambda xp, rng: resnet_tiny(rng=0, xp=xp, dtype="float64"), backend, (2, 1, 8, 8))
        return
    net = resnet_tiny(rng=0, xp=backend, dtype="float64")
    x = asarray(rng.normal(size=(2, 1, 8, 8)), backend, "float64")
    _check_network_gradients(net, x, rng, samples=6)


def _assert_param_grads_match(ours, theirs):
    tparams = dict(theirs.named_parameters())
    for name, owner, key in ours.named_parameters():
        assert rel_error(owner.grads[key], tparams[name].grad.numpy()) < 1e-10, name


def _assert_matches_torch(torch, ours, theirs, x, rng):
    """Forward and backward (of a random projection) through ours and the torch mirror:
    the same output, input gradient and parameter gradients. Returns our output."""
    out = ours.forward(x)
    r = rng.normal(size=out.shape)
    dx = ours.backward(r)
    tx = torch.tensor(x, requires_grad=True)
    tout = theirs(tx)
    tout.backward(torch.tensor(r))
    assert rel_error(out, tout.detach().numpy()) < 1e-10
    assert rel_error(dx, tx.grad.numpy()) < 1e-10
    _assert_param_grads_match(ours, theirs)
    return out


@pytest.mark.parametrize("stride, in_planes, planes", [(1, 4, 4), (2, 3, 5)])
def test_basic_block_matches_torch(stride, in_planes, planes, rng):
    torch, TorchBlock, _ = _torch_mirror()
    block = BasicBlock(in_planes, planes, stride, rng=2, dtype="float64")
    _randomise_bn(block, rng)
    theirs = TorchBlock(in_planes, planes, stride)
    _load_into_torch(torch, block, theirs)
    _assert_matches_torch(torch, block, theirs, rng.normal(size=(3, in_planes, 6, 5)), rng)


def test_resnet_tiny_matches_torch_train_and_eval(rng):
    torch, _, TorchResNet = _torch_mirror()
    net = resnet_tiny(rng=0, dtype="float64")
    _randomise_bn(net, rng)
    theirs = TorchResNet(1, (16, 32, 64), (1, 1, 1))
    _load_into_torch(torch, net, theirs)
    assert list(theirs.state_dict()) == list(net.state_dict())  # the same names, in order
    out = _assert_matches_torch(torch, net, theirs, rng.normal(size=(4, 1, 8, 8)), rng)
    assert out.shape == (4, net.out_dim) == (4, 64)
    net.eval(), theirs.eval()  # now with the running statistics one step has produced
    x = rng.normal(size=(3, 1, 8, 8))
    assert rel_error(net.forward(x), theirs(torch.tensor(x)).detach().numpy()) < 1e-10
    assert net.num_pending() == 0


def test_crop_groups_match_torch_two_forward_passes(rng):
    """SwAV's multi-crop: two size groups through one backbone, gradients summed."""
    torch, _, TorchResNet = _torch_mirror()
    net = ResNet(3, widths=(4, 6), blocks=(1, 1), rng=1, dtype="float64")
    theirs = TorchResNet(3, (4, 6), (1, 1))
    _load_into_torch(torch, net, theirs)
    big, small = rng.normal(size=(4, 3, 8, 8)), rng.normal(size=(6, 3, 4, 4))
    feats = net.forward_groups([big, small])
    r = [rng.normal(size=f.shape) for f in feats]
    dinputs = net.backward_groups(r)
    assert [d.shape for d in dinputs] == [big.shape, small.shape]
    tb, ts = torch.tensor(big, requires_grad=True), torch.tensor(small, requires_grad=True)
    tf = [theirs(tb), theirs(ts)]
    sum((t * torch.tensor(g)).sum() for t, g in zip(tf, r)).backward()
    for ours, t in zip(feats, tf):
        assert rel_error(ours, t.detach().numpy()) < 1e-10
    assert rel_error(dinputs[0], tb.grad.numpy()) < 1e-10
    assert rel_error(dinputs[1], ts.grad.numpy()) < 1e-10
    _assert_param_grads_match(net, theirs)
    with pytest.raises(ValueError, match="pending"):
        net.backward_groups(r)


def test_resnet18_layout():
    net = resnet18()
    assert net.out_dim == 512 and net.widths == (64, 128, 256, 512)
    assert net.num_parameters() == 11_168_832  # CIFAR ResNet-18 without its classifier
    assert "layer2.0.downsample.0.weight" in net.state_dict() and "layer1.0.downsample.0.weight" not in net.state_dict()
    assert net.conv1.params["weight"].shape == (64, 3, 3, 3) and net.conv1.stride == 1
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    net.eval()
    y = net.forward(x)
    assert y.shape == (2, 512) and y.dtype == np.float32 and net.num_pending() == 0


def test_resnet_rejects_bad_input():
    with pytest.raises(ValueError, match=r"images \(N, 1, H, W\)"):
        resnet_tiny().forward(np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="same, non-zero length"):
        ResNet(3, widths=(4, 8), blocks=(1,))


def test_resnet_takes_a_backend_name():
    # resnet_tiny(xp="numpy") used to fail with "'str' object has no attribute 'float32'"
    net = resnet_tiny(xp="numpy", zero_init_residual=True)
    assert net.xp is np and all(m.xp is np for _, m in net.named_modules())
    assert net.forward(np.zeros((2, 1, 8, 8), dtype=np.float32)).shape == (2, 64)


def test_resnet_backward_refuses_a_gradient_of_another_dtype():
    net = resnet_tiny()
    net.forward(np.zeros((2, 1, 8, 8), dtype=np.float32))
    pending = net.num_pending()
    with pytest.raises(ValueError, match="float32 parameters but got a float64 gradient"):
        net.backward(np.ones((2, 64)))
    assert net.num_pending() == pending  # checked before any layer popped its cache
    net.backward(np.ones((2, 64), dtype=np.float32))
    assert all(o.grads[k].dtype == np.float32 for _, o, k in net.named_parameters())


def test_zero_init_residual_makes_blocks_start_as_identity_branches():
    net = resnet_tiny(zero_init_residual=True)
    assert float(np.abs(net.layer1[0].bn2.params["weight"]).max()) == 0.0


def test_every_backend_computes_the_same_network(backend, rng):
    """The same seed and data on another backend (array_api_strict, CuPy) give NumPy's
    features and gradients, forward_groups included."""
    x = rng.normal(size=(3, 1, 8, 8))
    small = rng.normal(size=(4, 1, 4, 4))
    dfeats = [rng.normal(size=(3, 64)), rng.normal(size=(4, 64))]
    results = []
    for xp in (np, backend):
        net = resnet_tiny(rng=0, xp=xp, dtype="float64")
        feats = net.forward_groups([asarray(x, xp), asarray(small, xp)])
        dins = net.backward_groups([asarray(d, xp) for d in dfeats])
        grads = {n: to_numpy(o.grads[k]) for n, o, k in net.named_parameters()}
        results.append(([to_numpy(f) for f in feats + dins], grads, to_numpy(net.bn1.buffers["running_var"])))
    (arrays_np, grads_np, var_np), (arrays_b, grads_b, var_b) = results
    for a, b in zip(arrays_np, arrays_b):
        assert rel_error(a, b) < 1e-12
    for name in grads_np:
        assert rel_error(grads_np[name], grads_b[name]) < 1e-12, name
    assert rel_error(var_np, var_b) < 1e-12
