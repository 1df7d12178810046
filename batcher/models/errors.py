"""Why a model cannot be served."""

from __future__ import annotations


class ModelLoadError(Exception):
    """The model could not be found or does not suit the task; the message says why."""
