"""The one exception type of the data layer.

A `DataError` is a problem with the user's input or output location (a missing
path, zero usable documents, an output directory that holds another run's
dataset). Jobs print its message as one line and exit non-zero; per-document
problems never raise, they become named skips in the manifest.
"""
from __future__ import annotations


class DataError(Exception):
    """Input or output of the data layer is unusable; the message says why and what to do."""


class ManifestError(DataError):
    """A dataset directory has no valid manifest.json."""
