"""Model outputs as they cross to another process (`batcher.remote`).

A model asked for packed outputs (`TextModel.packed_outputs`) gives each embedding as
the bytes of its little-endian float32 values, cut from one host array per batch:
pickled in about a microsecond, where 384 Python floats take about 13. The front-end
turns them back into floats (`unpack_output`), exactly: the values are float32 anyway.
"""

from __future__ import annotations

from array import array
from typing import Any


def unpack_output(value: Any) -> Any:
    """A packed embedding (bytes of float32) as a list of floats; anything else as it is."""
    if isinstance(value, bytes):
        floats = array("f")
        floats.frombytes(value)
        return floats.tolist()
    return value
