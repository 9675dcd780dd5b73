import numpy as np
import pytest

import required

from swav_ref import backend as B


def test_namespace_roundtrip(backend):
    x = B.asarray(np.arange(6.0).reshape(2, 3), backend)
    assert B.array_namespace(x) is backend
    np.testing.assert_array_equal(B.to_numpy(x), np.arange(6.0).reshape(2, 3))


def test_mixed_namespaces_refused():
    strict = required.module("array_api_strict")
    with pytest.raises(TypeError, match="different libraries"):
        B.array_namespace(np.zeros(2), strict.zeros(2))


def test_namespace_lookup_by_type_gives_the_same_answers_every_time():
    """The namespace is remembered per array type: asking again (the cached path) must give
    what the first look gave, for subclasses and scalars too, and non-arrays stay refused."""

    class Sub(np.ndarray):
        pass

    sub = np.zeros(3).view(Sub)
    for _ in range(2):  # the first call learns the type, the second reads it back
        assert B.array_namespace(sub) is np
        assert B.array_namespace(np.float32(1.0), 2, None, True) is np
        assert B.array_namespace() is np
        with pytest.raises(TypeError, match="not an array: str"):
            B.array_namespace(np.zeros(1), "x")
    strict = required.module("array_api_strict")
    for _ in range(2):
        assert B.array_namespace(3.0, strict.zeros(2)) is strict
        with pytest.raises(TypeError, match="different libraries"):
            B.array_namespace(strict.zeros(2), sub)


def test_logsumexp_matches_scipy(backend):
    from scipy.special import logsumexp as ref

    a = np.random.default_rng(1).normal(size=(4, 5)) * 300.0  # overflows a naive exp
    x = B.asarray(a, backend)
    for axis in (0, 1, None):
        got = B.to_numpy(B.logsumexp(x, axis=axis))
        np.testing.assert_allclose(got, ref(a, axis=axis), rtol=1e-12)
    neg_inf = B.asarray(np.full((2, 3), -np.inf), backend)
    assert np.all(B.to_numpy(B.logsumexp(neg_inf, axis=1)) == -np.inf)


def test_logsumexp_of_special_values_matches_scipy(backend):
    """NaN stays NaN (it once came out as -inf), +inf gives +inf, all -inf gives -inf."""
    from scipy.special import logsumexp as ref

    inf, nan = np.inf, np.nan
    rows = np.array([[nan, 1.0, 2.0], [inf, 1.0, -inf], [-inf, -inf, -inf], [nan, -inf, -inf],
                     [inf, nan, 0.0], [0.0, 1.0, 2.0]])
    with np.errstate(all="ignore"):  # SciPy's own exp(inf - inf) warns
        expected = ref(rows, axis=1)
    got = B.to_numpy(B.logsumexp(B.asarray(rows, backend), axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-14)  # NaN matches NaN, inf inf


def test_random_same_numbers_on_every_backend(backend):
    a = B.to_numpy(B.Random(7, backend).normal((3, 4)))
    b = B.to_numpy(B.Random(7, np).normal((3, 4)))
    np.testing.assert_array_equal(a, b)


def test_random_state_roundtrip():
    import json

    r = B.Random(3)
    r.uniform((5,))
    state = json.loads(json.dumps(r.get_state()))
    first = r.uniform((4,))
    r.set_state(state)
    np.testing.assert_array_equal(first, r.uniform((4,)))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend") as info:
        B.get_backend("torch")
    for name in ("numpy", "cupy", "array_api_strict"):  # every name get_backend accepts
        assert repr(name) in str(info.value)


def test_cupy_error_names_the_cause(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(B.BackendUnavailableError, match="not installed.*gpu extra") as raised:
        B.get_backend("cupy")
    # a command that works: swav_ref is installed from its checkout, not from an index
    assert 'pip install -e ".[gpu]"' in str(raised.value) and "swav_ref[gpu]" not in str(raised.value)


def test_cupy_without_gpu_names_the_cause(monkeypatch):
    import sys
    import types

    def fail():
        raise RuntimeError("cudaErrorInsufficientDriver")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=fail))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(B.BackendUnavailableError, match="sees no usable GPU"):
        B.get_backend("cupy")


def test_default_tol():
    assert B.default_tol(np.float64) == 1e-9
    assert B.default_tol(np.float32) == 1e-5


def test_tf32_is_a_cupy_setting():
    from swav_ref.backend import set_tf32
    from swav_ref.train import TrainConfig

    set_tf32(np, True)  # a no-op on the CPU, never an error
    with pytest.raises(ValueError, match="cupy backend only"):
        TrainConfig(tf32=True)


def test_tf32_switch_reaches_cublas_cupy():
    try:
        cp = B.get_backend("cupy")
    except B.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    from cupy._core import _routines_linalg as linalg

    from swav_ref.backend import set_tf32

    try:
        set_tf32(cp, True)
        assert linalg.get_compute_type(cp.float32) == 7
        a = cp.asarray(np.random.default_rng(0).normal(size=(256, 256)), dtype=cp.float32)
        tf32_error = float(cp.max(cp.abs(a @ a - (a.astype(cp.float64) @ a.astype(cp.float64)))))
    finally:
        set_tf32(cp, False)
    assert linalg.get_compute_type(cp.float32) == 1
    exact_error = float(cp.max(cp.abs(a @ a - (a.astype(cp.float64) @ a.astype(cp.float64)))))
    assert exact_error < tf32_error  # TF32 products are visibly coarser


class _FakeCupy:
    """Just enough of CuPy's device API (``cuda.runtime.getDeviceCount``,
    ``cuda.Device(i).use()``) to see which GPU a process would choose."""

    __name__ = "cupy"

    def __init__(self, n_devices: int, current: int = 0):
        used = self.used = []

        class Device:
            def __init__(self, number=None):
                self.number = self.id = current if number is None else number

            def use(self):
                used.append(self.number)

        runtime = type("runtime", (), {"getDeviceCount": staticmethod(lambda: n_devices)})
        self.cuda = type("cuda", (), {"runtime": runtime, "Device": Device})


def test_each_local_rank_takes_its_own_gpu():
    """Under MPI, ranks 0..3 of a 4-GPU machine take GPUs 0..3 (not all GPU 0); a launcher
    that gives each rank one visible GPU leaves each rank device 0, silently; a process
    alone keeps the device its user chose; more ranks than GPUs wrap around, with a warning
    from the first local rank only."""
    import warnings

    assert B.use_device_for_local_rank(np, 3, 4) is None  # the CPU has no device to choose
    for local_rank in range(4):
        fake = _FakeCupy(4)
        assert B.use_device_for_local_rank(fake, local_rank, 4) == local_rank
        assert fake.used == [local_rank]
    alone = _FakeCupy(4, current=2)
    assert B.use_device_for_local_rank(alone, 0, 1) == 2 and alone.used == []
    with pytest.warns(RuntimeWarning, match="6 processes share the 4 GPUs"):
        assert B.use_device_for_local_rank(_FakeCupy(4), 0, 6) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.use_device_for_local_rank(_FakeCupy(4), 5, 6) == 1  # the warning came from rank 0
        for local_rank in range(4):  # Slurm --gpus-per-task=1: each rank sees its own GPU as 0
            one_visible = _FakeCupy(1)
            assert B.use_device_for_local_rank(one_visible, local_rank, 4) == 0 and one_visible.used == [0]
