"""Tools a test needs that a machine may lack: skipped where they are optional, failed where
CI promises them (``.ci/run`` sets ``SWAV_REF_REQUIRE_MPI``, ``SWAV_REF_REQUIRE_BROWSER`` and
``SWAV_REF_REQUIRE_NVRTC``, so a missing tool there is an error, not a quiet skip)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def skip_or_fail(tool: str, promised_by: str, reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it when the environment variable
    ``promised_by`` is set."""
    if os.environ.get(promised_by):
        pytest.fail(f"{tool} is required here ({promised_by} is set): {reason}")
    pytest.skip(reason)
