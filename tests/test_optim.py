"""SGD, LARS and the warm-up + cosine schedule, against PyTorch and the official recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest

import required

from swav_ref.backend import asarray, to_numpy
from swav_ref.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from swav_ref.nn import layers as L
from swav_ref.nn.optim import HAS_BUFFER_KEY, LARS, SGD, warmup_cosine_schedule


def _model(xp=np):
    return L.Sequential(L.Linear(4, 3, rng=0, xp=xp, dtype="float64"), L.BatchNorm1d(3, xp=xp, dtype="float64"))


def _set_grads(model, grads):
    for name, owner, key in model.named_parameters():
        g = grads[name]
        owner.grads[key] = None if g is None else asarray(g, owner.xp, "float64")


def _random_grads(model, rng, step):
    return {name: rng.normal(size=owner.params[key].shape) * (step + 1) for name, owner, key in model.named_parameters()}


def _params(model):
    return {name: to_numpy(owner.params[key]).copy() for name, owner, key in model.named_parameters()}


def test_sgd_matches_torch(backend, rng):
    torch = required.module("torch")
    model = _model(backend)
    start = _params(model)
    tparams = {n: torch.tensor(v, requires_grad=True) for n, v in start.items()}
    topt = torch.optim.SGD(list(tparams.values()), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = SGD(model, momentum=0.9, weight_decay=1e-2)
    for step, lr in enumerate([0.1, 0.05, 0.2]):
        grads = _random_grads(model, rng, step)
        _set_grads(model, grads)
        opt.step(lr)
        for group in topt.param_groups:
            group["lr"] = lr
        for n, t in tparams.items():
            t.grad = torch.tensor(grads[n])
        topt.step()
    for name, value in _params(model).items():
        np.testing.assert_allclose(value, tparams[name].detach().numpy(), rtol=1e-12, atol=1e-14)


def _torch_larc_step(torch, tparams, topt, lr, weight_decay, trust=0.001, eps=1e-8):
    """The LARC wrapper's step, as in NVIDIA apex (clip=False), around a torch SGD whose
    weight decay LARC moves into the scaled gradient."""
    with torch.no_grad():
        for p in tparams.values():
            if p.grad is None:
                continue
            p_norm, g_norm = torch.norm(p.data), torch.norm(p.grad.data)
            if p_norm != 0 and g_norm != 0:
                adaptive_lr = trust * p_norm / (g_norm + p_norm * weight_decay + eps)
                p.grad.data += weight_decay * p.data
                p.grad.data *= adaptive_lr
    for group in topt.param_groups:
        group["lr"], group["weight_decay"] = lr, 0.0
    topt.step()


def test_lars_matches_torch_larc(backend, rng):
    torch = required.module("torch")
    model = _model(backend)
    start = _params(model)
    start["1.bias"] = np.zeros(3)  # |p| = 0: LARC leaves the gradient alone
    model[1].params["bias"] = asarray(np.zeros(3), backend, "float64")
    tparams = {n: torch.tensor(v, requires_grad=True) for n, v in start.items()}
    topt = torch.optim.SGD(list(tparams.values()), lr=0.1, momentum=0.9)
    wd = 1e-3
    opt = LARS(model, momentum=0.9, weight_decay=wd)
    for step, lr in enumerate([0.5, 1.0, 2.0]):
        grads = _random_grads(model, rng, step)
        if step == 1:
            grads["0.bias"] = np.zeros(3)  # |g| = 0: no decay, no scaling, as LARC
        if step == 2:
            grads["1.weight"] = None  # skipped entirely (frozen)
        _set_grads(model, grads)
        opt.step(lr)
        for n, t in tparams.items():
            t.grad = None if grads[n] is None else torch.tensor(grads[n])
        _torch_larc_step(torch, tparams, topt, lr, wd)
    for name, value in _params(model).items():
        np.testing.assert_allclose(value, tparams[name].detach().numpy(), rtol=1e-12, atol=1e-15, err_msg=name)
    for name, value in _params(model).items():  # every parameter moved, so the comparison means something
        assert np.max(np.abs(value - start[name])) > 1e-5, name


def test_lars_first_step_by_hand(rng):
    """One LARS step from zero momentum, from its formula alone (no PyTorch): for each
    parameter, alpha = eta |p| / (|g| + wd |p| + eps), p -= lr * alpha * (g + wd p); a
    parameter or gradient of norm 0 (here BatchNorm's bias, which starts at 0) takes p -= lr g."""
    model = _model()
    start = _params(model)
    grads = _random_grads(model, rng, 0)
    _set_grads(model, grads)
    wd, eta, eps, lr = 1e-2, 1e-3, 1e-8, 0.5
    LARS(model, momentum=0.9, weight_decay=wd, trust_coefficient=eta, eps=eps).step(lr)
    for name, p in start.items():
        g = grads[name]
        if np.linalg.norm(p) == 0 or np.linalg.norm(g) == 0:
            expected = p - lr * g
        else:
            alpha = eta * np.linalg.norm(p) / (np.linalg.norm(g) + wd * np.linalg.norm(p) + eps)
            expected = p - lr * alpha * (g + wd * p)
        np.testing.assert_allclose(_params(model)[name], expected, rtol=1e-12, err_msg=name)


def test_lars_defaults_are_swavs(rng):
    """LARS() is LARS(momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001, eps=1e-8),
    the official recipe's values, as documented; two steps bring momentum into play."""
    default, explicit = _model(), _model()
    opts = [LARS(default), LARS(explicit, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001, eps=1e-8)]
    for step in range(2):
        grads = _random_grads(default, rng, step)
        for model, opt in zip((default, explicit), opts):
            _set_grads(model, grads)
            opt.step(0.5)
    for name, value in _params(explicit).items():
        np.testing.assert_array_equal(_params(default)[name], value, err_msg=name)


def test_sgd_leaves_the_gradient_untouched(backend, rng):
    """The first momentum buffer is a copy of the gradient: sharing it, the next step's
    in-place momentum update wrote into the module's gradient (and moved p by the wrong step)."""
    model = _model(backend)
    start = _params(model)
    grads = _random_grads(model, rng, 0)
    _set_grads(model, grads)  # on NumPy, the module may hold these very arrays
    expected = {name: g.copy() for name, g in grads.items()}
    opt = SGD(model, momentum=0.9)
    opt.step(0.1)
    opt.step(0.1)  # the same gradients again: buffer g, then 0.9 g + g
    for name, owner, key in model.named_parameters():
        np.testing.assert_array_equal(to_numpy(owner.grads[key]), expected[name], err_msg=name)
        np.testing.assert_allclose(_params(model)[name], start[name] - 0.29 * expected[name], rtol=1e-12,
                                   err_msg=name)


def test_optimizer_state_is_copied_both_ways(backend, rng):
    """state_dict is a snapshot (a checkpoint written after the next step must not change),
    and load_state_dict does not adopt the caller's arrays (its later steps wrote into them)."""
    _, opt = _stepped(backend, rng, frozen=())
    state = opt.state_dict()
    snapshot = {k: to_numpy(v).copy() for k, v in state.items()}
    opt.step(0.1)
    for name, value in snapshot.items():
        np.testing.assert_array_equal(to_numpy(state[name]), value, err_msg=name)
    model, other = _stepped(backend, rng, frozen=())
    loaded = {k: asarray(v.copy(), backend) for k, v in snapshot.items()}
    other.load_state_dict(loaded)
    other.step(0.1)
    for name, value in snapshot.items():
        np.testing.assert_array_equal(to_numpy(loaded[name]), value, err_msg=name)


def test_none_grad_skips_weight_decay_and_momentum(backend, rng):
    model = _model(backend)
    opt = SGD(model, momentum=0.9, weight_decay=0.1)
    _set_grads(model, _random_grads(model, rng, 0))
    opt.step(0.1)
    frozen_before, bias_before = _params(model)["0.weight"], _params(model)["0.bias"]
    buffer_before = to_numpy(opt.momentum_buffers["0.weight"]).copy()
    grads = _random_grads(model, rng, 1)
    grads["0.weight"] = None
    _set_grads(model, grads)
    opt.step(0.1)
    np.testing.assert_array_equal(_params(model)["0.weight"], frozen_before)
    np.testing.assert_array_equal(to_numpy(opt.momentum_buffers["0.weight"]), buffer_before)
    assert np.max(np.abs(_params(model)["0.bias"] - bias_before)) > 1e-3  # the others moved


@pytest.mark.parametrize("make", [lambda m: SGD(m, 0.9, 1e-4), lambda m: LARS(m, 0.9, 1e-6)])
def test_optimizer_state_dict_resumes_exactly(make, rng):
    grads = [_random_grads(_model(), rng, s) for s in range(4)]
    straight = _model()
    opt = make(straight)
    for g in grads:
        _set_grads(straight, g)
        opt.step(0.3)

    first = _model()
    opt1 = make(first)
    for g in grads[:2]:
        _set_grads(first, g)
        opt1.step(0.3)
    state = {k: np.array(v) for k, v in opt1.state_dict().items()}  # through host arrays
    resumed = _model()
    resumed.load_state_dict(first.state_dict())
    opt2 = make(resumed)
    opt2.load_state_dict(state)
    for g in grads[2:]:
        _set_grads(resumed, g)
        opt2.step(0.3)
    for name, value in _params(straight).items():
        np.testing.assert_array_equal(_params(resumed)[name], value, err_msg=name)


def test_optimizer_state_errors():
    opt = SGD(_model())
    with pytest.raises(ValueError, match=r"unknown parameters: \['nope'\]"):
        opt.load_state_dict({"nope": np.zeros(3)})
    with pytest.raises(ValueError, match="0.bias"):
        opt.load_state_dict({"0.bias": np.zeros(4)})
    with pytest.raises(ValueError, match="momentum"):
        SGD(_model(), momentum=-0.1)


def _stepped(backend, rng, frozen=("0.weight",), momentum=0.9):
    """An optimiser after one step in which ``frozen`` had no gradient (no buffer yet)."""
    model = _model(backend)
    opt = SGD(model, momentum=momentum)
    grads = _random_grads(model, rng, 0)
    grads.update({name: None for name in frozen})
    _set_grads(model, grads)
    opt.step(0.1)
    return model, opt


@pytest.mark.parametrize("when", ["fresh", "one parameter frozen", "momentum 0"])
def test_state_dict_flags_which_buffers_exist_and_loads_through_a_checkpoint(backend, rng, tmp_path, when):
    """A buffer is legitimately absent before a parameter's first update (a fresh
    optimiser, SwAV's frozen prototypes) or always (momentum 0): the flags say which, and
    every such state comes back exactly through a checkpoint file."""
    if when == "fresh":
        model = _model(backend)
        opt = SGD(model)
    else:
        model, opt = _stepped(backend, rng, momentum=0.0 if when == "momentum 0" else 0.9)
    expected = {"fresh": [], "one parameter frozen": ["0.bias", "1.bias", "1.weight"], "momentum 0": []}[when]
    state = opt.state_dict()
    assert sorted(set(state) - {HAS_BUFFER_KEY}) == expected
    names = [name for name, _, _ in model.named_parameters()]
    assert to_numpy(state[HAS_BUFFER_KEY]).tolist() == [name in expected for name in names]
    save_checkpoint(tmp_path / "c.npz", {f"optim.{k}": v for k, v in state.items()})
    arrays, _ = load_checkpoint(tmp_path / "c.npz")
    other = SGD(model)
    other.load_state_dict({k[6:]: v for k, v in arrays.items()})
    assert sorted(other.momentum_buffers) == expected
    for name in expected:
        np.testing.assert_array_equal(to_numpy(other.momentum_buffers[name]), to_numpy(state[name]))


def test_state_without_flags_still_loads(rng):
    """State saved before the flags existed: a lost buffer cannot be told from one never
    made there, but everything else is checked."""
    _, opt = _stepped(np, rng)
    state = {k: v for k, v in opt.state_dict().items() if k != HAS_BUFFER_KEY}
    SGD(_model()).load_state_dict(state)
    with pytest.raises(CheckpointError, match="1.bias.*NaN"):
        SGD(_model()).load_state_dict({**state, "1.bias": np.full(3, np.nan)})


def _bad_state(state, fault):
    state = dict(state)
    if fault == "missing":
        del state["1.weight"]
    elif fault == "unexpected":
        state["0.weight"] = np.zeros((3, 4))  # frozen: the flags say it has no buffer
    elif fault == "shape":
        state["1.weight"] = np.zeros(4)
    elif fault == "int32":
        state["1.weight"] = np.ones(3, dtype=np.int32)
    elif fault == "nan":
        state["1.weight"] = np.array([0.1, np.nan, 0.2])
    elif fault == "inf":
        state["1.weight"] = np.array([0.1, -np.inf, 0.2])
    elif fault == "flags":
        state[HAS_BUFFER_KEY] = np.ones(4)
    return state


@pytest.mark.parametrize("fault, match", [
    ("missing", r"missing buffers \['1.weight'\]"),
    ("unexpected", r"buffers \['0.weight'\] that .* says were never made"),
    ("shape", r"1.weight: shape \(4,\), the parameter is \(3,\)"),
    ("int32", "1.weight: dtype int32, not a floating dtype"),
    ("nan", r"buffers \['1.weight'\] hold NaN or infinity"),
    ("inf", r"buffers \['1.weight'\] hold NaN or infinity"),
    ("flags", "must be a bool array of shape \\(4,\\)"),
])
def test_load_refuses_state_that_would_not_resume_exactly(backend, rng, fault, match):
    """Each used to load: a lost buffer restarted that parameter's momentum, an integer
    array was cast, a NaN surfaced later as a "divergence" blamed on the learning rate."""
    _, source = _stepped(backend, rng)
    state = {k: to_numpy(v) for k, v in source.state_dict().items()}  # as a checkpoint holds them
    model, opt = _stepped(backend, rng)
    before = {k: to_numpy(v).copy() for k, v in opt.momentum_buffers.items()}
    with pytest.raises(CheckpointError, match=match):
        opt.load_state_dict(_bad_state(state, fault))
    assert sorted(opt.momentum_buffers) == sorted(before)  # nothing was loaded
    for name, value in before.items():
        np.testing.assert_array_equal(to_numpy(opt.momentum_buffers[name]), value)


def test_load_refuses_a_float64_buffer_too_large_for_float32(backend, rng):
    model = _model(backend).astype("float32")
    opt = SGD(model)
    state = {"0.bias": np.array([1e300, 0.0, 0.0]), HAS_BUFFER_KEY: np.array([False, True, False, False])}
    with pytest.raises(CheckpointError, match=r"\['0.bias'\] hold NaN or infinity \(or values too large"):
        opt.load_state_dict(state)
    opt.load_state_dict({**state, "0.bias": np.array([1.5, 0.0, 0.0])})  # other floats are cast
    assert opt.momentum_buffers["0.bias"].dtype == backend.float32


@pytest.mark.parametrize("make", [lambda m, h: SGD(m, momentum=h(0.9), weight_decay=h(1e-2)),
                                  lambda m, h: LARS(m, h(0.9), h(1e-6), h(0.001), h(1e-8))])
def test_numpy_scalar_hyperparameters_keep_float32_state(backend, make, rng):
    """NumPy 2 promotes ``float32 array * np.float64(0.9)`` to float64, so a hyperparameter
    given as a NumPy scalar would make the momentum buffers float64 for good (and
    array_api_strict refuses the product): they are taken as Python floats on the way in."""
    model = _model(backend).astype("float32")
    opt = make(model, np.float64)
    for step in range(2):
        for name, owner, key in model.named_parameters():
            owner.grads[key] = asarray(rng.normal(size=owner.params[key].shape), backend, "float32")
        opt.step(np.float64(0.1))
    for name, owner, key in model.named_parameters():
        assert owner.params[key].dtype == backend.float32, name
        assert opt.momentum_buffers[name].dtype == backend.float32, name


def test_hyperparameters_must_be_finite_real_numbers():
    opt = SGD(_model())
    with pytest.raises(ValueError, match=r"lr must be a finite real number, got array\(0\.1\)"):
        opt.step(np.asarray(0.1))  # a 0-d array: on CuPy, reading it would sync every step
    with pytest.raises(ValueError, match="lr must be a finite real number, got nan"):
        opt.step(float("nan"))
    with pytest.raises(ValueError, match="momentum must be a finite real number, got nan"):
        SGD(_model(), momentum=float("nan"))
    with pytest.raises(ValueError, match="trust_coefficient must be a finite real number, got '0.001'"):
        LARS(_model(), trust_coefficient="0.001")
    with pytest.raises(ValueError, match="LARS needs trust_coefficient > 0 and eps >= 0, got 0.001, -1"):
        LARS(_model(), eps=-1)


def _official_schedule(base_lr, final_lr, start_warmup, warmup_steps, total_steps):
    """The schedule as main_swav.py builds it (an array over all iterations)."""
    warmup = np.linspace(start_warmup, base_lr, warmup_steps)
    iters = np.arange(total_steps - warmup_steps)
    cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("warmup_steps, start_warmup", [(0, 0.0), (1, 0.0), (10, 0.0), (7, 0.3)])
def test_warmup_cosine_matches_official_swav(warmup_steps, start_warmup):
    total, base, final = 50, 4.8, 0.0048
    expected = _official_schedule(base, final, start_warmup, warmup_steps, total)
    ours = [warmup_cosine_schedule(s, total, base, final, warmup_steps, start_warmup) for s in range(total)]
    assert all(isinstance(v, float) for v in ours)
    np.testing.assert_allclose(ours, expected, rtol=1e-13)
    assert math.isclose(ours[-1], final + 0.5 * (base - final) * (1 + math.cos(math.pi * (total - warmup_steps - 1) / (total - warmup_steps))))


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="step 10 outside"):
        warmup_cosine_schedule(10, 10, 1.0)
    with pytest.raises(ValueError, match="warmup_steps 11"):
        warmup_cosine_schedule(0, 10, 1.0, warmup_steps=11)
