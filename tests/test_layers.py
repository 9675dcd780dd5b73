"""Stateful layers: gradients through the Module API, the LIFO cache stack with gradient
accumulation, BatchNorm's PyTorch semantics, state dicts, modes and errors."""

from __future__ import annotations

import numpy as np
import pytest

import required

from swav_ref.backend import asarray, to_numpy
from swav_ref.nn import functional as F
from swav_ref.nn import layers as L
from swav_ref.nn.gradcheck import check_gradient, projected_loss, rel_error

TOL = 1e-6


def _check_module_gradients(module, x, rng):
    """Analytic backward against central differences for the input and every parameter."""
    xp = module.xp
    out = module.forward(x)
    r = asarray(rng.normal(size=out.shape), xp, "float64")
    module.zero_grad()
    dx = module.backward(r)
    assert module.num_pending() == 0
    f = projected_loss(module, x, r)
    assert check_gradient(f, x, dx) < TOL
    for name, owner, key in module.named_parameters():
        err = check_gradient(f, owner.params[key], owner.grads[key])
        assert err < TOL, f"{name}: rel_error {err}"


LAYER_CASES = [
    ("conv3_s1_p1", lambda kw: L.Conv2d(2, 3, 3, 1, 1, bias=True, **kw), (2, 2, 5, 4)),
    ("conv3_s2_p0", lambda kw: L.Conv2d(2, 3, 3, 2, 0, **kw), (2, 2, 7, 6)),
    ("conv1_s2", lambda kw: L.Conv2d(3, 2, 1, 2, 0, bias=True, **kw), (2, 3, 5, 6)),
    ("bn2d", lambda kw: L.BatchNorm2d(3, **kw), (3, 3, 2, 3)),
    ("bn1d", lambda kw: L.BatchNorm1d(4, **kw), (5, 4)),
    ("linear", lambda kw: L.Linear(5, 3, **kw), (4, 5)),
    ("gap", lambda kw: L.GlobalAvgPool(**kw), (2, 3, 3, 2)),
    ("maxpool", lambda kw: L.MaxPool2d(3, 2, 1, **kw), (1, 2, 5, 6)),
    (
        "sequential",
        lambda kw: L.Sequential(
            L.Conv2d(2, 3, 3, 2, 1, **kw), L.BatchNorm2d(3, **kw), L.ReLU(**kw), L.GlobalAvgPool(**kw),
            L.Linear(3, 2, rng=1, **kw),
        ),  # fmt: skip
        (3, 2, 5, 6),
    ),
]


@pytest.mark.parametrize("name, make, shape", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_gradients(backend, name, make, shape, rng):
    module = make(dict(xp=backend, dtype="float64"))
    x = asarray(rng.normal(size=shape), backend, "float64")
    _check_module_gradients(module, x, rng)


def test_relu_layer_gradient(backend, rng):
    a = rng.normal(size=(2, 3, 4))
    x = asarray(np.where(np.abs(a) < 0.05, 0.3, a), backend)
    _check_module_gradients(L.ReLU(xp=backend, dtype="float64"), x, rng)


# -- the cache stack ---------------------------------------------------------------------


def test_two_forwards_accumulate_like_one_concatenated_batch(backend, rng):
    """Without BatchNorm, per-sample independence makes (x1, x2) one batch."""
    kw = dict(xp=backend, dtype="float64")
    net = L.Sequential(L.Conv2d(2, 3, 3, 1, 1, bias=True, **kw), L.ReLU(**kw), L.GlobalAvgPool(**kw), L.Linear(3, 2, **kw))
    x1, x2 = (asarray(rng.normal(size=(n, 2, 4, 5)), backend) for n in (2, 3))
    r1, r2 = (asarray(rng.normal(size=(n, 2)), backend) for n in (2, 3))
    y1, y2 = net.forward(x1), net.forward(x2)
    assert net.num_pending() == 2 * 4
    dx2 = net.backward(r2)
    dx1 = net.backward(r1)
    assert net.num_pending() == 0
    split = {n: to_numpy(o.grads[k]) for n, o, k in net.named_parameters()}

    xp = backend
    net.zero_grad()
    y = net.forward(xp.concat([x1, x2]))
    dx = net.backward(xp.concat([r1, r2]))
    np.testing.assert_allclose(to_numpy(y), np.concatenate([to_numpy(y1), to_numpy(y2)]), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(dx), np.concatenate([to_numpy(dx1), to_numpy(dx2)]), rtol=1e-12)
    for name, owner, key in net.named_parameters():
        np.testing.assert_allclose(split[name], to_numpy(owner.grads[key]), rtol=1e-10, err_msg=name)


def test_two_forwards_with_batchnorm_match_torch_autograd(rng):
    torch = required.module("torch")
    net = L.Sequential(L.Conv2d(2, 3, 3, 1, 1, dtype="float64"), L.BatchNorm2d(3, dtype="float64"), L.ReLU())
    tnet = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(3), torch.nn.ReLU()).double()
    tnet.load_state_dict({k: torch.tensor(to_numpy(v)) for k, v in net.state_dict().items()})
    x1, x2 = rng.normal(size=(2, 2, 4, 5)), rng.normal(size=(3, 2, 6, 3))  # two crop sizes
    r1, r2 = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(3, 3, 6, 3))
    y1, y2 = net.forward(x1), net.forward(x2)
    net.backward(r2)
    net.backward(r1)
    t1, t2 = tnet(torch.tensor(x1)), tnet(torch.tensor(x2))
    ((t1 * torch.tensor(r1)).sum() + (t2 * torch.tensor(r2)).sum()).backward()
    assert rel_error(y1, t1.detach().numpy()) < 1e-10 and rel_error(y2, t2.detach().numpy()) < 1e-10
    tparams = dict(tnet.named_parameters())
    for name, owner, key in net.named_parameters():
        assert rel_error(owner.grads[key], tparams[name].grad.numpy()) < 1e-10, name
    for name, value in tnet.state_dict().items():  # two updates of the running statistics
        assert rel_error(net.state_dict()[name], value.numpy()) < 1e-12, name


def test_eval_forward_stores_nothing_and_cannot_backward(backend, rng):
    conv = L.Conv2d(1, 2, 3, padding=1, xp=backend)
    conv.eval()
    x = asarray(rng.normal(size=(2, 1, 4, 4)), backend, "float32")
    for _ in range(3):
        conv.forward(x)
    assert conv.num_pending() == 0
    with pytest.raises(RuntimeError, match="no pending forward"):
        conv.backward(asarray(np.ones((2, 2, 4, 4)), backend, "float32"))
    conv.train()
    conv.forward(x)
    conv.forward(x)
    assert conv.num_pending() == 2
    conv.clear_cache()
    assert conv.num_pending() == 0


def test_eval_conv_recycles_its_columns(rng):
    from swav_ref.nn import functional as F

    F.SCRATCH.clear()
    conv = L.Conv2d(2, 3, 3, padding=1, dtype="float64").eval()
    conv.forward(rng.normal(size=(2, 2, 4, 5)))
    assert F.SCRATCH.nbytes() == 2 * 9 * 2 * 4 * 5 * 8  # (C k k) x (N H W) float64, given back
    F.SCRATCH.clear()


def test_backward_checks_the_pending_shape():
    lin = L.Linear(3, 2)
    lin.forward(np.ones((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"pending forward returned \(4, 2\)"):
        lin.backward(np.ones((5, 2), dtype=np.float32))
    assert lin.num_pending() == 1  # the cache survived the bad call
    lin.backward(np.ones((4, 2), dtype=np.float32))


def test_backward_refuses_a_gradient_of_another_dtype():
    # forward refuses float64 input to a float32 layer; backward used to take a float64
    # gradient and store float64 parameter gradients
    for lin, dtype in ((L.Linear(3, 2), np.float64), (L.Linear(3, 2, dtype="float64"), np.float32)):
        lin.forward(np.ones((4, 3), dtype=lin.dtype))
        other = np.dtype(dtype).name
        with pytest.raises(ValueError, match=rf"holds {np.dtype(lin.dtype).name} parameters but got a {other} gradient"):
            lin.backward(np.ones((4, 2), dtype=dtype))
        assert lin.num_pending() == 1 and lin.grads.get("weight") is None  # nothing stored or lost
        lin.backward(np.ones((4, 2), dtype=lin.dtype))
        assert lin.grads["weight"].dtype == lin.dtype
    relu = L.ReLU()  # parameter-free layers take any dtype, in forward as in backward
    relu.forward(np.ones((2, 3)))
    assert relu.backward(np.ones((2, 3))).dtype == np.float64


def test_modules_take_a_backend_name_or_refuse_a_non_namespace():
    lin = L.Linear(3, 2, xp="numpy", dtype="float64")
    assert lin.xp is np and lin.params["weight"].dtype == np.float64
    assert L.BatchNorm2d(3, xp="numpy").xp is np and L.Conv2d(1, 2, 3, xp="numpy").xp is np
    assert L.Linear(3, 2).to("numpy").xp is np
    with pytest.raises(TypeError, match="xp must be an array namespace module such as numpy, or a name for get_backend"):
        L.Linear(3, 2, xp=42)
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        L.ReLU(xp="torch")


def test_input_checks():
    with pytest.raises(ValueError, match="3 channels"):
        L.Conv2d(3, 2, 3).forward(np.ones((1, 2, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="float64 input"):
        L.Linear(3, 2).forward(np.ones((4, 3)))
    with pytest.raises(ValueError, match="4-d input"):
        L.BatchNorm2d(3).forward(np.ones((4, 3), dtype=np.float32))


# -- BatchNorm's PyTorch semantics ---------------------------------------------------------


def test_numpy_scalar_hyperparameters_keep_float32_state(backend, rng):
    """A BatchNorm momentum or an epsilon given as a NumPy scalar would turn the running
    statistics (and the normalised output) float64 under NumPy 2's promotion; they are
    taken as Python floats on the way in."""
    bn = L.BatchNorm2d(3, eps=np.float64(1e-5), momentum=np.float64(0.1), xp=backend)
    x = asarray(rng.normal(size=(4, 3, 2, 2)), backend, "float32")
    assert bn.forward(x).dtype == backend.float32
    assert bn.buffers["running_mean"].dtype == bn.buffers["running_var"].dtype == backend.float32
    y, _ = F.l2_normalize_forward(x[:, :, 0, 0], eps=np.float64(1e-12))
    assert y.dtype == backend.float32
    with pytest.raises(ValueError, match=r"momentum in \[0, 1\], got eps=1e-05, momentum=1.5"):
        L.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="BatchNorm eps must be a finite real number, got nan"):
        L.BatchNorm1d(3, eps=float("nan"))
    with pytest.raises(ValueError, match="batchnorm_forward: eps must be >= 0, got -10"):
        F.batchnorm_forward(x, bn.params["weight"], bn.params["bias"], eps=-10)



@pytest.mark.parametrize("dims", [2, 4])
def test_batchnorm_train_eval_and_running_stats_match_torch(dims, rng):
    torch = required.module("torch")
    ours = (L.BatchNorm1d if dims == 2 else L.BatchNorm2d)(3, dtype="float64")
    theirs = (torch.nn.BatchNorm1d if dims == 2 else torch.nn.BatchNorm2d)(3).double()
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        theirs.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    shape = (6, 3) if dims == 2 else (4, 3, 2, 3)
    for step in range(3):
        x = rng.normal(size=shape) * (step + 1) + step
        y, ty = ours.forward(x), theirs(torch.tensor(x))
        ours.clear_cache()
        assert rel_error(y, ty.detach().numpy()) < 1e-10
    for name, value in theirs.state_dict().items():
        np.testing.assert_allclose(to_numpy(ours.buffers.get(name, ours.params.get(name))), value.numpy(), rtol=1e-12)
    assert int(ours.buffers["num_batches_tracked"]) == 3
    ours.eval(), theirs.eval()
    x = rng.normal(size=shape)
    assert rel_error(ours.forward(x), theirs(torch.tensor(x)).detach().numpy()) < 1e-10
    assert int(ours.buffers["num_batches_tracked"]) == 3  # eval does not count


# -- state dicts, modes, gradients --------------------------------------------------------


def _small_net(seed, **kw):
    return L.Sequential(
        L.Conv2d(2, 3, 3, 1, 1, rng=seed, **kw), L.BatchNorm2d(3, **kw), L.ReLU(**kw), L.GlobalAvgPool(**kw),
        L.Linear(3, 4, rng=seed, **kw), L.BatchNorm1d(4, **kw),
    )  # fmt: skip


def test_state_dict_round_trip_is_exact(backend, rng):
    a, b = _small_net(1, xp=backend), _small_net(2, xp=backend)
    a.forward(asarray(rng.normal(size=(4, 2, 3, 3)), backend, "float32"))  # moves running stats
    state = a.state_dict()
    assert list(state) == [
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "4.weight", "4.bias", "5.weight", "5.bias", "5.running_mean", "5.running_var", "5.num_batches_tracked",
    ]  # fmt: skip
    b.load_state_dict({k: to_numpy(v) for k, v in state.items()})  # through host arrays, as a checkpoint
    for name, value in b.state_dict().items():
        np.testing.assert_array_equal(to_numpy(value), to_numpy(state[name]), err_msg=name)
        assert value.dtype == state[name].dtype
    # the returned dict is a copy: changing the model does not change it
    first = a[0].params["weight"]
    first -= 1.0
    assert not np.array_equal(to_numpy(first), to_numpy(state["0.weight"]))
    x = asarray(rng.normal(size=(3, 2, 3, 3)), backend, "float32")
    a.load_state_dict(state)
    a.eval(), b.eval()
    np.testing.assert_array_equal(to_numpy(a.forward(x)), to_numpy(b.forward(x)))


def test_load_state_dict_errors_name_the_problem():
    net = _small_net(0)
    state = net.state_dict()
    missing = dict(state)
    del missing["1.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \['1.running_var'\]"):
        net.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        net.load_state_dict({**state, "extra.weight": np.zeros(2)})
    with pytest.raises(ValueError, match=r"4.weight: expected \(4, 3\), got \(3, 4\)"):
        net.load_state_dict({**state, "4.weight": np.zeros((3, 4))})


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("4.weight", np.full((4, 3), None), r"4.weight: dtype object"),  # was NaN weights, silently
        ("4.bias", np.array(["a", "b", "c", "d"]), r"4.bias: dtype <U1"),
        ("4.bias", np.ones(4, dtype=bool), r"4.bias: dtype bool"),
        ("4.weight", np.full((4, 3), 1 + 2j), r"4.weight: dtype complex128"),  # lost its imaginary part
        ("1.running_var", [1.0, 1.0, 1.0], r"1.running_var: list, not an array"),
        ("4.weight", np.full((4, 3), 1e300), r"refused values for 4.weight: not finite as float32"),  # was inf
        ("1.running_mean", np.array([0.0, np.nan, 0.0], dtype=np.float32), r"1.running_mean: not finite"),
        ("5.bias", np.array([0.0, np.inf, 0.0, 0.0]), r"5.bias: not finite"),
        ("1.num_batches_tracked", np.asarray(2.7), r"1.num_batches_tracked: not integers in the range of int64"),
        ("1.num_batches_tracked", np.asarray(np.nan), r"1.num_batches_tracked: not integers"),
        ("1.num_batches_tracked", np.asarray(2.0**63), r"1.num_batches_tracked: not integers"),
        # float16's -inf passes a range check whose bound (-2.0**63) is -inf in float16 too
        ("1.num_batches_tracked", np.asarray(-np.inf, dtype=np.float16), r"1.num_batches_tracked: not integers"),
        ("1.num_batches_tracked", np.asarray(2**64 - 1, dtype=np.uint64), r"1.num_batches_tracked: not integers"),
    ],
)
def test_load_state_dict_refuses_values_it_would_change(backend, key, value, match):
    """A cast to the module's dtype must not change what was saved: nothing is loaded then."""
    if getattr(value, "dtype", None) == np.float16 and backend.__name__ == "array_api_strict":
        pytest.skip("the Array API has no float16")
    net = _small_net(0, xp=backend)
    before = {k: to_numpy(v).copy() for k, v in net.state_dict().items()}
    state = {k: to_numpy(v) for k, v in net.state_dict().items()}
    state[key] = value
    with pytest.raises(ValueError, match=match):
        net.load_state_dict(state)
    for name, v in net.state_dict().items():
        np.testing.assert_array_equal(to_numpy(v), before[name], err_msg=name)


def test_load_state_dict_names_every_refused_value_and_casts_the_rest(backend):
    net = _small_net(0, xp=backend)
    state = {k: to_numpy(v) for k, v in net.state_dict().items()}
    bad = {**state, "4.weight": np.full((4, 3), -1e39), "1.num_batches_tracked": np.asarray(2.5)}
    with pytest.raises(ValueError, match=r"refused values for 1.num_batches_tracked: not integers") as info:
        net.load_state_dict(bad)
    assert "; 4.weight: not finite as float32" in str(info.value)  # every refused key, in one message
    # what a cast leaves as it was is loaded
    state["4.weight"] = np.full((4, 3), 0.1)  # float64 into float32: rounded, finite
    state["4.bias"] = np.arange(4, dtype=np.int32)  # integers into a float parameter
    state["1.num_batches_tracked"] = np.asarray(7.0)  # an integral float into the integer buffer
    state["5.num_batches_tracked"] = np.asarray(9, dtype=np.uint8)
    net.load_state_dict(state)
    assert to_numpy(net[4].params["weight"]).dtype == np.float32
    np.testing.assert_array_equal(to_numpy(net[4].params["weight"]), np.full((4, 3), 0.1, dtype=np.float32))
    np.testing.assert_array_equal(to_numpy(net[4].params["bias"]), np.arange(4.0))
    assert int(net[1].buffers["num_batches_tracked"]) == 7 and int(net[5].buffers["num_batches_tracked"]) == 9
    assert to_numpy(net[1].buffers["num_batches_tracked"]).dtype == np.int64


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool", "complex64", np.complex128, np.int16, "float128"])
def test_modules_are_real_floating_point(dtype):
    """An integer dtype rounded every initial weight to 0 and the first forward failed deep
    inside BatchNorm; complex or bool made no more sense."""
    name = np.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"must be real floating point, one of float16, float32, float64; got {name}"):
        L.Conv2d(2, 3, 3, dtype=dtype)
    with pytest.raises(ValueError, match=rf"got {name}"):
        L.ReLU(dtype=dtype)
    net = _small_net(0)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=rf"dtype must be real floating point.*got {name}"):
        net.astype(dtype)
    for key, value in net.state_dict().items():  # nothing was cast
        assert value.dtype == before[key].dtype, key
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    assert all(m.dtype == np.float32 for _, m in net.named_modules())


def test_resnet_astype_integer_is_refused():
    from swav_ref.nn.resnet import resnet_tiny

    net = resnet_tiny(rng=0)
    with pytest.raises(ValueError, match=r"got int32"):
        net.astype("int32")
    net.eval()
    assert net.forward(np.ones((2, 1, 8, 8), dtype=np.float32)).dtype == np.float32


def test_float16_modules_and_dtype_spellings():
    lin = L.Linear(3, 2, dtype="float16")
    assert lin.params["weight"].dtype == np.float16
    assert L.Linear(3, 2).astype(np.float16).params["bias"].dtype == np.float16
    assert L.Linear(3, 2, dtype=np.dtype("float64")).dtype == np.float64
    with pytest.raises(ValueError, match=r"got 'not-a-dtype'"):
        L.Linear(3, 2, dtype="not-a-dtype")
    strict = required.module("array_api_strict")
    with pytest.raises(ValueError, match=r"backend array_api_strict has no float16; use one of float32, float64"):
        lin.to(strict)
    assert lin.xp is np and lin.params["weight"].dtype == np.float16  # nothing moved


def test_grads_none_then_accumulate_then_zero_grad(rng):
    lin = L.Linear(3, 2, dtype="float64")
    assert lin.grads == {"weight": None, "bias": None}
    x = rng.normal(size=(4, 3))
    for _ in range(2):
        lin.forward(x)
        lin.backward(np.ones((4, 2)))
    np.testing.assert_allclose(lin.grads["bias"], [8.0, 8.0])
    lin.zero_grad()
    assert lin.grads["bias"] is None
    lin.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(lin.grads["weight"], np.zeros((2, 3)))


def test_train_eval_recursive_and_names():
    net = _small_net(0)
    net.eval()
    assert all(not m.training for _, m in net.named_modules())
    net.train()
    assert all(m.training for _, m in net.named_modules())
    names = [n for n, _, _ in net.named_parameters()]
    assert names == ["0.weight", "1.weight", "1.bias", "4.weight", "4.bias", "5.weight", "5.bias"]
    assert net.num_parameters() == 54 + 6 + 16 + 8
    assert [type(c).__name__ for c in net.children()][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]


def test_astype_and_to(rng):
    strict = required.module("array_api_strict")
    net = _small_net(0).astype("float64")
    assert all(owner.params[k].dtype == np.float64 for _, owner, k in net.named_parameters())
    assert net[1].buffers["num_batches_tracked"].dtype == np.int64
    x = rng.normal(size=(3, 2, 3, 3))
    net.eval()
    y = net.forward(x)
    net.to(strict)
    y_strict = net.forward(strict.asarray(x))
    np.testing.assert_allclose(to_numpy(y_strict), y, rtol=1e-12)


def test_initialisation_is_seeded_and_documented():
    a, b = L.Conv2d(4, 8, 3, rng=5), L.Conv2d(4, 8, 3, rng=5)
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"])
    std = float(np.std(L.Conv2d(16, 64, 3, rng=0).params["weight"]))  # fan_in 16*9, fan_out 64*9
    assert abs(std - np.sqrt(2.0 / (64 * 9))) < 0.02 * np.sqrt(2.0 / (64 * 9))  # Kaiming fan_out, not fan_in
    lin = L.Linear(100, 50, rng=0)
    assert np.max(np.abs(lin.params["weight"])) <= 0.1 and np.max(np.abs(lin.params["bias"])) <= 0.1
    bn = L.BatchNorm2d(3)
    np.testing.assert_array_equal(bn.params["weight"], np.ones(3))
    np.testing.assert_array_equal(bn.params["bias"], np.zeros(3))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
def test_integer_range_bounds_are_exact_floats(dtype):
    """The bounds that refuse a float buffer value beyond an integer dtype (a GPU's cast
    saturates, so the round trip alone lets 2.0**63 through as int64) are the dtype's
    smallest value and its largest plus one, exactly."""
    low, high = L._integer_range(dtype)
    info = np.iinfo(dtype)
    assert int(low) == info.min and int(high) == info.max + 1
    assert float(int(low)) == low and float(int(high)) == high
