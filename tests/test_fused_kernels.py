"""The fused CUDA kernels (swav_ref.fused) against the plain array code they replace.

Every test runs in two lanes (the ``fused_lane`` fixture): ``numpy-host``, the kernels'
CUDA source compiled as C++ and run on the CPU, on every machine; and ``cupy``, the same
source compiled by NVRTC and run on a GPU (skipped without one; `-k cupy` selects it in
benchmarks/gpu_check.sh). The reference is always the plain code, run with
``fused.disabled()`` on the same arrays.

Without a GPU, two more tests stand in for what only the GPU lane would otherwise catch:
the source compiled by NVRTC (CuPy's compiler, from a pip wheel) with no warning, and the
argument types of each host-lane call held to the compiled kernels' parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from swav_ref import fused
from swav_ref.backend import asarray, to_numpy
from swav_ref.nn import LARS, SGD
from swav_ref.nn import functional as F
from swav_ref.nn.gradcheck import check_gradient_sampled, projected_loss, rel_error
from swav_ref.nn.resnet import ResNet
from swav_ref.swav import sinkhorn_codes

EXPORTED = ["im2col", "col2im", "batchnorm_variance", "batchnorm_scale_shift", "batchnorm_backward_input",
            "batchnorm_running_update", "relu_backward",
            "sgd_update", "lars_update", "shifted_exp", "divide_columns", "divide_rows"]


def _chwn_stored(xp, a_nchw: np.ndarray, dtype="float64"):
    """An (N, C, H, W) array stored as (C, H, W, N), as the network's activations are."""
    t = asarray(np.ascontiguousarray(np.transpose(a_nchw, (1, 2, 3, 0))), xp, dtype)
    return xp.permute_dims(t, (3, 0, 1, 2))


def _close(a, b, tol):
    assert rel_error(a, b) < tol, rel_error(a, b)


@pytest.fixture(params=[32, 64], ids=["i32", "i64"])
def index_bits(request, monkeypatch):
    """Run the kernels with 32-bit indices (the usual case) and with 64-bit ones (arrays of
    2^31 elements and more; forced here by lowering the threshold)."""
    if request.param == 64:
        monkeypatch.setattr(fused, "INT32_LIMIT", 0)
    return request.param


#: How a C parameter of a kernel appears in PTX: pointers and 64-bit integers are ``.u64``.
PTX_TYPE = {"int": (".u32", ".s32"), "long long": (".u64", ".s64"), "float": (".f32",), "double": (".f64",)}


@pytest.fixture(scope="module")
def nvrtc():
    """NVRTC from the ``nvidia-cuda-nvrtc-cu12`` wheel (a dev dependency): skipped without it,
    failed where CI promises it (``SWAV_REF_REQUIRE_NVRTC=1``)."""
    from nvrtc_ptx import load_nvrtc
    from required import skip_or_fail

    library = load_nvrtc()
    if library is None:
        skip_or_fail("NVRTC", "SWAV_REF_REQUIRE_NVRTC", "NVRTC not installed (pip install nvidia-cuda-nvrtc-cu12)")
    return library


@pytest.mark.parametrize("options", [
    ["-arch=sm_90", "-ftz=true"],                  # the H200 of benchmarks/gpu_check.sh, as CuPy compiles
    ["-arch=sm_80", "-ftz=true", "--std=c++11"],   # an A100, and the oldest C++ the source claims
    ["-arch=compute_75", "--std=c++17"],           # PTX for any GPU from Turing on
], ids=["sm_90", "sm_80-c++11", "compute_75-c++17"])
def test_every_kernel_compiles_with_nvrtc_and_takes_the_parameters_the_wrappers_pass(nvrtc, options):
    """The source compiled by NVRTC, the compiler CuPy uses, without a GPU: no error, no
    warning, machine code for a real GPU, and every exported kernel's parameters in PTX as
    the C signatures that the host lane checks each call against say (so those checks hold
    the Python wrappers to what the GPU will read)."""
    from fused_host import kernel_signatures
    from nvrtc_ptx import compile_cuda, ptx_entry_parameters

    ptx, log, cubin_bytes = compile_cuda(nvrtc, fused.KERNEL_SOURCE.read_text(), "kernels.cu", options)
    assert log.strip() == "", f"NVRTC warned:\n{log}"
    assert (cubin_bytes > 0) == options[0].startswith("-arch=sm_")
    entries = ptx_entry_parameters(ptx)
    signatures = kernel_signatures()
    assert set(entries) == set(signatures)
    assert {name.rsplit("_", 2)[0] for name in signatures} == set(EXPORTED)
    for name, c_types in signatures.items():
        expected = [(".u64",) if t.endswith("*") else PTX_TYPE[t] for t in c_types]
        assert len(entries[name]) == len(expected), (name, entries[name], c_types)
        for got, allowed, c_type in zip(entries[name], expected, c_types):
            assert got in allowed, f"{name}: PTX has {got} where the source says {c_type}"


def test_the_host_lane_refuses_arguments_a_gpu_would_misread(host_kernel_library):
    """CuPy packs a launch's scalars by their exact type, so an index passed as int64 to an
    ``int`` parameter, or a Python bool, shifts every later argument on a GPU. The host
    launcher refuses what CuPy would misread, naming the kernel and the argument."""
    from fused_host import HostLauncher

    launcher = HostLauncher(host_kernel_library)
    g, y, dx = (np.ones(4, np.float32) for _ in range(3))
    launcher("relu_backward_f32_i32", 4, (g, y, dx, np.int32(4)))  # the right types run
    wrong = {
        "argument 3 \\(int\\): wants np.int32, got int64": (g, y, dx, np.int64(4)),
        "argument 3 \\(int\\): wants np.int32, got int": (g, y, dx, 4),
        "argument 1 \\(float\\*\\): wants a float32 array, got float64": (g, y.astype(np.float64), dx, np.int32(4)),
        "takes 4 arguments, got 3": (g, y, dx),
    }
    for message, args in wrong.items():
        with pytest.raises(TypeError, match="relu_backward_f32_i32 " + message):
            launcher("relu_backward_f32_i32", 4, args)


@pytest.mark.parametrize(
    "n, c, h, w, k, stride, pad",
    [(2, 3, 5, 6, 3, 1, 1), (3, 2, 7, 7, 3, 2, 1), (2, 4, 8, 8, 1, 2, 0), (2, 3, 9, 7, 7, 2, 3),
     (1, 2, 4, 4, 3, 1, 0), (2, 2, 6, 5, 2, 3, 2)],
)
def test_im2col_and_col2im_match_the_plain_code(fused_lane, index_bits, n, c, h, w, k, stride, pad, rng):
    xp, calls = fused_lane
    x = _chwn_stored(xp, rng.normal(size=(n, c, h, w)))
    x_nchw_dense = asarray(rng.normal(size=(n, c, h, w)), xp, "float64")  # a layout the kernel must copy first
    for inp in (x, x_nchw_dense):
        cols = F.im2col(inp, (k, k), stride, pad)
        with fused.disabled():
            expected = F.im2col(inp, (k, k), stride, pad)
        np.testing.assert_array_equal(to_numpy(cols), to_numpy(expected))  # pure copies: exact
    suffix = "i32" if index_bits == 32 else "i64"
    assert f"im2col_f64_{suffix}" in calls

    dcols = asarray(rng.normal(size=tuple(cols.shape)), xp, "float64")
    dx = F.col2im(dcols, (n, c, h, w), (k, k), stride, pad)
    with fused.disabled():
        expected = F.col2im(dcols, (n, c, h, w), (k, k), stride, pad)
    assert tuple(dx.shape) == (n, c, h, w)
    _close(dx, expected, 1e-14)  # sums in another order
    assert f"col2im_f64_{suffix}" in calls
    # the adjoint identity <im2col(x), dcols> = <x, col2im(dcols)>, kernels on both sides
    lhs = float(xp.sum(F.im2col(x, (k, k), stride, pad) * dcols))
    rhs = float(xp.sum(x * dx))
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-13), ("float32", 1e-5)])
@pytest.mark.parametrize("mode", ["train", "eval", "synced"])
def test_batchnorm_forward_and_backward_match_the_plain_code(fused_lane, dtype, tol, mode, rng):
    xp, calls = fused_lane
    x = _chwn_stored(xp, rng.normal(1.0, 2.0, size=(4, 3, 5, 6)), dtype)
    weight = asarray(rng.uniform(0.5, 1.5, 3), xp, dtype)
    bias = asarray(rng.normal(size=3), xp, dtype)
    running = dict(running_mean=asarray(rng.normal(size=3), xp, dtype), running_var=asarray(rng.uniform(1, 2, 3), xp, dtype))
    kwargs = {"train": {}, "eval": dict(training=False, **running), "synced": dict(allreduce=lambda a: a * 1)}[mode]
    g = _chwn_stored(xp, rng.normal(size=(4, 3, 5, 6)), dtype)

    out, cache = F.batchnorm_forward(x, weight, bias, **kwargs)
    grads = F.batchnorm_backward(g, cache)
    with fused.disabled():
        ref_out, ref_cache = F.batchnorm_forward(x, weight, bias, **kwargs)
        ref_grads = F.batchnorm_backward(g, ref_cache)
    _close(out, ref_out, tol)
    for got, want in zip(grads, ref_grads):
        _close(got, want, tol)
    for got, want in ((cache.mean, ref_cache.mean), (cache.var, ref_cache.var), (cache.invstd, ref_cache.invstd)):
        _close(got, want, tol)
    suffix = ("f64" if dtype == "float64" else "f32") + "_i32"
    assert "batchnorm_scale_shift_" + suffix in calls
    assert any(name.startswith("batchnorm_backward_input") for name in calls) == (mode != "eval")
    # the variance kernel and the running update: local training only (under sync-BN the
    # count is an all-reduced array, which the plain code divides by on the device)
    assert ("batchnorm_variance_" + suffix in calls) == (mode == "train")
    if mode != "eval":
        new_stats = F.batchnorm_update_running(running["running_mean"], running["running_var"], cache, momentum=0.3)
        with fused.disabled():
            ref_stats = F.batchnorm_update_running(running["running_mean"], running["running_var"], ref_cache,
                                                   momentum=0.3)
        for got, want in zip(new_stats, ref_stats):
            _close(got, want, tol)
        assert ("batchnorm_running_update_" + suffix in calls) == (mode == "train")


@pytest.mark.parametrize("stored", ["rows_of_samples", "rows_of_channels"])
def test_batchnorm_of_features_agrees_whichever_path_its_layout_takes(fused_lane, stored, rng):
    """(N, C) features are a transposed view as channel rows. Whether the centred rows come
    out C-contiguous, so that the scale-and-shift kernel takes them, is the backend's
    choice of layout for ``rows - mean``: NumPy keeps the transposed order (the plain code
    runs), CuPy 14 writes C order (the kernel runs; seen on the H200 run of 2026-11-29,
    which failed the assertion this test used to make). Features stored channel by channel
    (a transposed (C, N) array) take the kernel on every backend. Either way the answer
    and the gradient are those of the plain code, and the per-channel vector kernel applies."""
    xp, calls = fused_lane
    if stored == "rows_of_samples":
        x = asarray(rng.normal(size=(8, 5)), xp, "float64")
    else:
        x = xp.permute_dims(asarray(rng.normal(size=(5, 8)), xp, "float64"), (1, 0))
    w, b = asarray(rng.uniform(0.5, 1.5, 5), xp, "float64"), asarray(rng.normal(size=5), xp, "float64")
    g = asarray(rng.normal(size=(8, 5)), xp, "float64")
    out, cache = F.batchnorm_forward(x, w, b)
    dx, dw, db = F.batchnorm_backward(g, cache)
    assert "batchnorm_variance_f64_i32" in calls
    centred_is_dense = fused.is_dense(F._channel_rows(x) - xp.reshape(xp.mean(x, axis=0), (5, 1)))
    assert any(name.startswith("batchnorm_scale_shift") for name in calls) == centred_is_dense
    if stored == "rows_of_channels":
        assert centred_is_dense  # the kernel's layout already: it runs on every backend
    ref = (to_numpy(x) - to_numpy(x).mean(0)) / np.sqrt(to_numpy(x).var(0) + 1e-5) * to_numpy(w) + to_numpy(b)
    _close(out, ref, 1e-12)
    with fused.disabled():
        plain_out, plain_cache = F.batchnorm_forward(x, w, b)
        plain_grads = F.batchnorm_backward(g, plain_cache)
    _close(out, plain_out, 1e-12)
    for got, want in zip((dx, dw, db), plain_grads):
        _close(got, want, 1e-12)


@pytest.mark.parametrize("layout", ["chwn", "nchw"])
def test_relu_and_residual_add_keep_the_layout_and_match(fused_lane, layout, rng):
    xp, calls = fused_lane
    make = (lambda a: _chwn_stored(xp, a)) if layout == "chwn" else (lambda a: asarray(a, xp, "float64"))
    a, b, g = (make(rng.normal(size=(3, 4, 5, 2))) for _ in range(3))
    s, _ = F.add_forward(a, b)
    y, cache = F.relu_forward(s)
    dx = F.relu_backward(g, cache)
    np.testing.assert_array_equal(to_numpy(y), np.maximum(to_numpy(a) + to_numpy(b), 0))
    np.testing.assert_array_equal(to_numpy(dx), to_numpy(g) * (to_numpy(y) > 0))
    assert "relu_backward_f64_i32" in calls
    if layout == "chwn":  # the activations' storage order survives, so the next conv need not copy
        assert fused.is_dense(xp.permute_dims(y, (1, 2, 3, 0)))
        assert fused.is_dense(xp.permute_dims(dx, (1, 2, 3, 0)))


@pytest.mark.parametrize("optimiser", ["sgd", "sgd-no-momentum", "lars"])
def test_optimiser_updates_match_the_plain_code(fused_lane, optimiser, rng):
    """Three steps with weight decay, a frozen parameter (gradient None) and, for LARS, a
    parameter of norm zero (LARC leaves its gradient unscaled)."""
    xp, calls = fused_lane

    def make_model():
        net = ResNet(1, widths=(2,), blocks=(1,), rng=5, xp=xp, dtype="float64")
        return net

    models = [make_model(), make_model()]
    for net in models:
        first = next(iter(net.named_parameters()))
        first[1].params[first[2]][...] = 0.0  # a parameter with norm 0
    opts = []
    for net in models:
        if optimiser == "lars":
            opts.append(LARS(net, momentum=0.9, weight_decay=1e-2))
        else:
            opts.append(SGD(net, momentum=0.0 if optimiser == "sgd-no-momentum" else 0.9, weight_decay=1e-2))
    names = [name for name, _, _ in models[0].named_parameters()]

    def as_gradient(a):
        """On the device; a 4-d one as a non-contiguous view, as conv2d_backward returns."""
        if a is None:
            return None
        if a.ndim != 4:
            return asarray(a, xp, "float64")
        return xp.permute_dims(asarray(np.ascontiguousarray(a.transpose(1, 0, 2, 3)), xp, "float64"), (1, 0, 2, 3))

    kernel = "lars_update" if optimiser == "lars" else "sgd_update"
    for step in range(3):
        grads = {name: rng.normal(size=tuple(owner.params[key].shape)) for name, owner, key in models[0].named_parameters()}
        grads[names[-1]] = None  # frozen: skipped entirely
        for i, (net, opt) in enumerate(zip(models, opts)):
            for name, owner, key in net.named_parameters():
                owner.grads[key] = as_gradient(grads[name])
            if i == 0:
                launched = len(calls)
                opt.step(0.1)
                # every parameter with a gradient, views included, is one fused update
                assert sum(name.startswith(kernel) for name in calls[launched:]) == len(names) - 1
            else:
                with fused.disabled():
                    opt.step(0.1)
    for (name, a, ka), (_, b, kb) in zip(models[0].named_parameters(), models[1].named_parameters()):
        _close(a.params[ka], b.params[kb], 1e-13)
    assert sorted(opts[0].momentum_buffers) == sorted(opts[1].momentum_buffers)
    for name in opts[0].momentum_buffers:
        _close(opts[0].momentum_buffers[name], opts[1].momentum_buffers[name], 1e-13)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-13), ("float32", 1e-5)])
def test_sum_of_squares_for_lars(fused_lane, dtype, tol, rng):
    """LARS's two reductions per parameter: one CuPy reduction kernel each on the GPU, the
    plain sum elsewhere; a 1-element array of the input's dtype either way."""
    xp, _ = fused_lane
    for shape in ((64, 3, 3, 3), (10,), (1,)):
        host = rng.normal(size=shape)
        total = fused.sum_of_squares(asarray(host, xp, dtype))
        assert total.dtype == xp.float32 if dtype == "float32" else total.dtype == xp.float64
        assert total.size == 1 and fused.is_dense(total)
        _close(xp.reshape(total, (1,)), np.array([np.sum(host * host)]), tol)


@pytest.mark.parametrize("dtype, epsilon, tol", [("float64", 0.05, 1e-13), ("float32", 0.05, 1e-5),
                                                 ("float32", 0.01, 1e-5)])
@pytest.mark.parametrize("distributed", [False, True])
def test_sinkhorn_codes_match_the_plain_code(fused_lane, dtype, epsilon, tol, distributed, rng):
    xp, calls = fused_lane
    z = rng.normal(size=(64, 8))
    c = rng.normal(size=(12, 8))
    scores = asarray((z / np.linalg.norm(z, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T, xp, dtype)
    hooks = dict(allreduce=lambda a: a * 1, allreduce_max=lambda a: a * 1) if distributed else {}
    codes = sinkhorn_codes(scores, epsilon=epsilon, **hooks)
    with fused.disabled():
        expected = sinkhorn_codes(scores, epsilon=epsilon, **hooks)
    assert codes.dtype == scores.dtype
    _close(codes, expected, tol)
    assert any(name.startswith("shifted_exp") for name in calls)
    assert any(name.startswith("divide_rows") for name in calls)


def test_a_whole_network_through_the_kernels_passes_the_gradient_check(fused_lane, rng):
    """Forward and backward of a small ResNet (stride-2 projection, odd sizes) with every
    fused kernel in the loop: the same gradients as the plain code, and central differences."""
    xp, calls = fused_lane
    net = ResNet(2, widths=(3, 4), blocks=(1, 1), rng=3, xp=xp, dtype="float64")
    x = asarray(rng.normal(size=(3, 2, 5, 7)), xp, "float64")
    r = asarray(rng.normal(size=(3, 4)), xp, "float64")
    net.forward(x)
    dx = net.backward(r)
    grads = {name: owner.grads[key] for name, owner, key in net.named_parameters()}
    with fused.disabled():
        net.zero_grad()
        net.forward(x)
        ref_dx = net.backward(r)
        for name, owner, key in net.named_parameters():
            _close(grads[name], owner.grads[key], 1e-12)
    _close(dx, ref_dx, 1e-12)
    for kernel in ("im2col", "col2im", "batchnorm_scale_shift", "batchnorm_backward_input", "relu_backward"):
        assert any(name.startswith(kernel) for name in calls), kernel
    f = projected_loss(net, x, r)
    assert check_gradient_sampled(f, x, dx, samples=10) < 1e-6
    for name, owner, key in net.named_parameters():
        assert check_gradient_sampled(f, owner.params[key], grads[name], samples=6, seed=len(name)) < 1e-6, name


def test_unsupported_inputs_are_refused_with_the_reason(fused_lane):
    xp, _ = fused_lane
    a = xp.ones((4, 6), dtype=xp.float64)
    with pytest.raises(ValueError, match="C-contiguous"):
        fused.relu_backward(xp.permute_dims(a, (1, 0)), xp.permute_dims(a, (1, 0)) * 1)
    with pytest.raises(ValueError, match="shapes differ"):
        fused.relu_backward(a, xp.ones((6, 4), dtype=xp.float64))
    with pytest.raises(TypeError, match="all arrays must be float64, got one of float32"):
        fused.relu_backward(a, xp.ones((4, 6), dtype=xp.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        fused.relu_backward(xp.ones((3,), dtype=xp.int32), xp.ones((3,), dtype=xp.int32))
    assert not fused.applies(xp, xp.int64)


def test_plain_numpy_never_uses_the_kernels():
    """Without a registered launcher (every normal NumPy run) nothing is fused."""
    if os.environ.get("SWAV_REF_HOST_KERNELS") == "1":
        pytest.skip("the whole suite runs through the host-compiled kernels")
    assert not fused.applies(np, np.float32)


def test_the_environment_switch_turns_the_kernels_off():
    code = "from swav_ref import fused; print(fused.enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SWAV_REF_FUSED": "0"})
    assert out.stdout.strip() == "False"
    with fused.disabled():
        assert not fused.enabled()
    assert fused.enabled()


def test_the_index_type_covers_the_largest_array_a_kernel_touches(fused_lane, monkeypatch, rng):
    """col2im writes (C, H, W, N) but reads kh * kw times as much: with an output under the
    32-bit limit and columns over it, the 64-bit kernel must run (else the index overflows)."""
    xp, calls = fused_lane
    n, c, h, w = 2, 3, 6, 6
    dcols = asarray(rng.normal(size=(c * 9, h * w * n)), xp, "float64")
    monkeypatch.setattr(fused, "INT32_LIMIT", n * c * h * w + 1)
    dx = F.col2im(dcols, (n, c, h, w), (3, 3), 1, 1)
    assert calls[-1] == "col2im_f64_i64"
    x = _chwn_stored(xp, rng.normal(size=(n, c, h, w)))
    F.im2col(x, (1, 1), 2, 0)  # a strided 1x1: reads 4 times what it writes
    monkeypatch.setattr(fused, "INT32_LIMIT", x.size - 1)
    F.im2col(x, (1, 1), 2, 0)
    assert calls[-2:] == ["im2col_f64_i32", "im2col_f64_i64"]
    with fused.disabled():
        _close(dx, F.col2im(dcols, (n, c, h, w), (3, 3), 1, 1), 1e-14)


def test_mixed_dtypes_take_the_plain_path(fused_lane, rng):
    """The functional API may be handed float64 running statistics with float32 data: the
    kernels (which read raw memory) are skipped and the plain code promotes, as NumPy does."""
    xp, calls = fused_lane
    x = _chwn_stored(xp, rng.normal(size=(2, 3, 4, 4)), "float32")
    w, b = asarray(np.ones(3), xp, "float32"), asarray(np.zeros(3), xp, "float32")
    mean, var = asarray(np.zeros(3), xp, "float64"), asarray(np.ones(3), xp, "float64")
    out, _ = F.batchnorm_forward(x, w, b, mean, var, training=False)
    assert not any(name.startswith("batchnorm") for name in calls)
    _close(out, to_numpy(x) / np.sqrt(1 + 1e-5), 1e-6)
    g = asarray(rng.normal(size=(2, 3, 4, 4)), xp, "float64")
    dx = F.relu_backward(g, xp.permute_dims(xp.ones((3, 4, 4, 2), dtype=xp.float32), (3, 0, 1, 2)))
    assert not any(name.startswith("relu") for name in calls)
    np.testing.assert_array_equal(to_numpy(dx), to_numpy(g))
