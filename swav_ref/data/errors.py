"""The error every data loader raises for bad data on disk, and the integer test that the
data modules share for sizes and counts."""

from __future__ import annotations

import numpy as np

__all__ = ["DatasetError", "is_integer"]


class DatasetError(ValueError):
    """A data set on disk is missing, truncated or malformed; the message names the file."""


def is_integer(value) -> bool:
    """A Python or NumPy integer, but not a ``bool``: ``True`` as a size or count is a
    mistake, not 1, and ``2.5`` or ``2.0`` would only fail later, deep inside NumPy."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
