"""Shared fixtures: the ``backend`` fixture runs a test once per array library.

- ``numpy``: always.
- ``array_api_strict``: the standard and nothing else; proves the numerical core has no
  NumPy-only call that would break on CuPy.
- ``cupy``: when CuPy imports and sees a GPU; otherwise the test is skipped (not failed).

Select one lane with ``-k numpy``, ``-k array_api_strict`` or ``-k cupy``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import required
from hypothesis import settings

from swav_ref.backend import BackendUnavailableError, get_backend

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile("ci")

ALL_BACKENDS = ["numpy", "array_api_strict", "cupy"]


def load_backend(name: str):
    """The namespace ``name``, or a pytest skip saying why it is unavailable."""
    if name == "array_api_strict":
        required.module("array_api_strict")
    try:
        return get_backend(name)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """An array namespace: numpy, array_api_strict, or cupy (skipped without a GPU)."""
    return load_backend(request.param)


@pytest.fixture(params=["numpy", "cupy"])
def gpu_or_numpy(request):
    """numpy and cupy only, for code (training, data on the host) that array_api_strict
    cannot run because it needs NumPy interop."""
    return load_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def host_kernels_everywhere(request):
    """With ``SWAV_REF_HOST_KERNELS=1`` in the environment, every NumPy computation of the
    whole suite goes through the fused CUDA kernels compiled for the CPU (the CuPy code
    path, rehearsed without a GPU): ``SWAV_REF_HOST_KERNELS=1 python -m pytest``."""
    if os.environ.get("SWAV_REF_HOST_KERNELS") != "1":
        yield
        return
    from fused_host import HostLauncher

    from swav_ref import fused

    with fused.launcher_registered("numpy", HostLauncher(request.getfixturevalue("host_kernel_library"))):
        yield


@pytest.fixture(scope="session")
def host_kernel_library(tmp_path_factory):
    """The fused CUDA kernels compiled for the CPU (tests/fused_host.py), or a skip."""
    from fused_host import compile_host_library

    library = compile_host_library(tmp_path_factory.mktemp("fused"))
    if library is None:
        required.need_compiler()  # skips or fails: there is no compiler
        pytest.fail("a C++ compiler is on the PATH but could not build the fused kernels")
    return library


@pytest.fixture(params=["numpy-host", "cupy"])
def fused_lane(request):
    """A lane whose arrays go through the fused kernels: NumPy with the kernels compiled
    for the CPU, or CuPy with them compiled by NVRTC (skipped without a GPU). Yields
    ``(xp, calls)``: ``calls`` lists the kernels launched during the test."""
    from fused_host import HostLauncher, RecordingLauncher

    from swav_ref import fused

    if request.param == "cupy":
        xp = load_backend("cupy")
        base = fused._launcher_for(xp)
    else:
        xp = np
        base = HostLauncher(request.getfixturevalue("host_kernel_library"))
    name = "cupy" if request.param == "cupy" else "numpy"
    recorder = RecordingLauncher(base)
    with fused.launcher_registered(name, recorder):  # NumPy's is the session's under SWAV_REF_HOST_KERNELS=1
        yield xp, recorder.calls


@pytest.fixture(scope="module")
def tiny():
    """``(train, test)``: 160 training and 40 test digits, 5 steps of 32 per epoch (the data
    of ``small_runs.small_config``)."""
    from swav_ref.data.datasets import load_digits_dataset, split_dataset

    full = load_digits_dataset()
    return split_dataset(full.subset(np.arange(200)), test_fraction=0.2, seed=0)


@pytest.fixture
def single_process(monkeypatch):
    """One process whatever runs the tests (mpiexec, a Slurm job): the launchers'
    variables are removed, so the command line's user errors print one line instead of
    going to the MPI abort hook."""
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
                 "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
