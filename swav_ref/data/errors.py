"""The error every data loader raises for bad data on disk."""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A data set on disk is missing, truncated or malformed; the message names the file."""
