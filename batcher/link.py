"""The wire between an engine process and its front-ends (`batcher.remote`): the
messages, and frames of a 4-byte big-endian length and a pickled list of messages. Each
side gathers what it has to send during one turn of its loop into one frame (one system
call per turn, not one per request): 32 results settled by one batch leave as one frame.
Pickle is safe here because the socket lives in a directory only this user can open,
and both ends are the same program.

Touched only on each process's event-loop thread."""

from __future__ import annotations

import asyncio
import pickle
import struct
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30
"""A frame larger than this is a broken peer, not a message."""

ControlOp = Literal["stats", "reconfigure", "call"]


@dataclass(frozen=True, slots=True)
class Submit:
    """Queue `payloads` (all or none); `timeout_s` from now, on the engine's clock; in
    the bulk lane with `bulk`."""

    call: int
    payloads: Sequence[Any]
    timeout_s: float | None
    bulk: bool = False
    """In the bulk lane (`batcher.lanes`)."""
    tenant: str | None = None
    """Whose items they are, and its weight, for the fair share (`batcher.fairness`)."""
    weight: float = 1.0

    def __reduce__(self) -> tuple[type[Submit], tuple[Any, ...]]:
        return Submit, (self.call, self.payloads, self.timeout_s, self.bulk, self.tenant,
                        self.weight)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Cancel:
    """The caller of `call` went away: its items not yet computed never will be."""

    call: int

    def __reduce__(self) -> tuple[type[Cancel], tuple[Any, ...]]:
        return Cancel, (self.call,)


@dataclass(frozen=True, slots=True)
class Control:
    """Ask the engine process something: `stats`, `reconfigure` (args: the changes), or
    `call` (args: name and its arguments, one of the handlers the server was given)."""

    call: int
    op: ControlOp
    args: Mapping[str, Any] = field(default_factory=dict)

    def __reduce__(self) -> tuple[type[Control], tuple[Any, ...]]:
        return Control, (self.call, self.op, self.args)


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of `call`: its value, or the error its caller raises, with what that
    error's `__cause__` was (`RemoteCause`'s arguments): pickling drops the chain."""

    call: int
    value: Any = None
    error: BaseException | None = None
    cause: tuple[str, str] | None = None

    def __reduce__(self) -> tuple[type[Reply], tuple[Any, ...]]:
        return Reply, (self.call, self.value, self.error, self.cause)


class RemoteCause(Exception):
    """What an error's `__cause__` was in the engine process (the model's own exception,
    for InferenceFailed): its repr, and its traceback as text. Set as the error's
    `__cause__` on the front-end, as ProcessPoolExecutor does, so that a front-end logs
    what a one-process server logs."""

    def __init__(self, summary: str, traceback_text: str) -> None:
        super().__init__(summary, traceback_text)
        self.summary = summary
        self.traceback_text = traceback_text

    def __repr__(self) -> str:
        return self.summary

    def __str__(self) -> str:
        return self.traceback_text


@dataclass(frozen=True, slots=True)
class Notice:
    """News that wants no reply: the engine's state pushed to every front-end, or a
    front-end's own state pushed to the engine."""

    topic: str
    value: Any

    def __reduce__(self) -> tuple[type[Notice], tuple[Any, ...]]:
        return Notice, (self.topic, self.value)


Message = Submit | Cancel | Control | Reply | Notice

_WIRE = """Every type that crosses the socket often (these, `Result`, `Encoded`) pickles
through `__reduce__` as its constructor's arguments: the default for a slotted dataclass
calls `dataclasses.fields` per object, which was most of the engine process's CPU
(`python -m benchmarks.lab.engine_cpu --profile`)."""


class Link:
    """One end of a connection: gathers messages into one frame per loop turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._outbox: list[Message] = []
        self.frames_sent = 0

    def send(self, message: Message) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        if self._writer.is_closing():
            return
        frame = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LENGTH.pack(len(frame)) + frame)
        self.frames_sent += 1

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


async def read_frame(reader: asyncio.StreamReader) -> list[Message] | None:
    """The next frame's messages, or None when the peer closed the connection."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > MAX_FRAME_BYTES:
            raise ConnectionError(f"a frame of {length} bytes; the peer is broken")
        messages: list[Message] = pickle.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    return messages


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError with its message: the reply
    must reach the caller whatever it holds."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    exc.__traceback__ = None
    return exc


def cause_of(exc: BaseException) -> tuple[str, str] | None:
    cause = exc.__cause__
    if cause is None:
        return None
    return repr(cause), "".join(traceback.format_exception(cause))
