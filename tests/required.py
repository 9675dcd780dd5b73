"""Tools a test needs that a machine may lack: skipped where they are optional, failed where
CI promises them (``.ci/run`` sets ``SWAV_REF_REQUIRE_MPI``, ``SWAV_REF_REQUIRE_BROWSER``,
``SWAV_REF_REQUIRE_NVRTC``, ``SWAV_REF_REQUIRE_COMPILER`` and ``SWAV_REF_REQUIRE_ORACLES``,
so a missing tool there is an error, not a quiet skip)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def skip_or_fail(tool: str, promised_by: str, reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it when the environment variable
    ``promised_by`` is set."""
    if os.environ.get(promised_by):
        pytest.fail(f"{tool} is required here ({promised_by} is set): {reason}")
    pytest.skip(reason)


def have_compiler() -> bool:
    """Whether a C++ compiler is on the PATH (the fused kernels compiled for the CPU)."""
    from fused_host import find_compiler

    return find_compiler() is not None


def need_compiler() -> None:
    """Skip without a C++ compiler, or fail where CI promises one (``SWAV_REF_REQUIRE_COMPILER``):
    without it the whole host-kernel pass of CI would skip and still pass."""
    if not have_compiler():
        skip_or_fail("a C++ compiler", "SWAV_REF_REQUIRE_COMPILER", "no C++ compiler to build the fused kernels for the CPU")


def module(name: str) -> ModuleType:
    """The module ``name``: a test oracle or tool (PyTorch, POT, array_api_strict, the
    notebook and site builders), skipped where it is not installed, failed where CI promises
    it (``SWAV_REF_REQUIRE_ORACLES``): without it, dozens of oracle checks would skip and the
    run would still look green."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(name, "SWAV_REF_REQUIRE_ORACLES", f"{name} is not installed ({exc})")
