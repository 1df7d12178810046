"""The engine across processes: an `EngineServer` serves one engine on a Unix socket;
each front-end process holds a `RemoteEngine`, whose `submit_many` behaves as the
engine's own: the same errors (QueueFull, DeadlineExceeded, EngineClosed, ...), the same
deadlines, and a caller that goes away cancels its items before they are computed.

The engine batches the items of every connected front-end together, so batches stay as
deep as with one process, and the queue and its bound are the engine's one queue.

Beside calls and their replies, either side may push a `Notice` that wants no reply:
`EngineServer.broadcast` sends one to every front-end (the engine's state, as it
changes), `RemoteEngine.notify` one to the engine (a front-end's own state). The wire
itself is `batcher.link`.

Touched only on each process's event-loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from batcher.engine import Engine
from batcher.errors import EngineClosed
from batcher.fairness import Owner
from batcher.items import Lane, Result
from batcher.link import (
    Cancel,
    Control,
    ControlOp,
    Link,
    Message,
    Notice,
    RemoteCause,
    Reply,
    Submit,
    cause_of,
    portable,
    read_frame,
)

InT = TypeVar("InT")
OutT = TypeVar("OutT")

logger = logging.getLogger("batcher.remote")


def socket_dir() -> str:
    """A new directory only this user can open, for the engine's socket."""
    return tempfile.mkdtemp(prefix="microbatch-")


Handler = Callable[..., Awaitable[Any]]


class EngineServer(Generic[InT, OutT]):
    """Serves `engine` on the Unix socket `path` to any number of front-ends.

    `reconfigure(changes)` applies a change of limits (the server's, which may warm new
    shapes first; default: `engine.reconfigure`); `handlers` are named coroutines a
    front-end may `call` (the model's description, the metrics text); `notices` are
    named functions called with the value of each `Notice` a front-end pushes. A
    front-end whose connection drops has its queued items cancelled, as a client that
    hangs up does.
    """

    def __init__(
        self,
        engine: Engine[InT, OutT],
        path: str,
        *,
        reconfigure: Callable[[Mapping[str, object]], Awaitable[object]] | None = None,
        handlers: Mapping[str, Handler] | None = None,
        notices: Mapping[str, Callable[[Any], None]] | None = None,
    ) -> None:
        self.engine = engine
        self.path = path
        self._reconfigure = reconfigure
        self._handlers = dict(handlers or {})
        self._notices = dict(notices or {})
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], Link] = {}
        self.connected = 0
        """Front-ends connected now."""

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)

    def broadcast(self, topic: str, value: Any) -> None:
        """Push `Notice(topic, value)` to every connected front-end (one pickle each,
        in the frame of this loop turn)."""
        for link in self._connections.values():
            link.send(Notice(topic, value))

    async def aclose(self) -> None:
        """Stop accepting connections and close those open (their callers get
        EngineClosed). Drain the engine first to answer everything admitted."""
        if self._server is not None:
            self._server.close()
        for link in self._connections.values():
            link.close()  # its reader sees the end, and the connection's task ends
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        link = Link(writer)
        self._connections[task] = link
        self.connected += 1
        calls: dict[int, asyncio.Task[None]] = {}
        try:
            while (messages := await read_frame(reader)) is not None:
                for message in messages:
                    if isinstance(message, Submit):
                        work = self._submit(message)
                        calls[message.call] = self._start(message.call, work, link, calls)
                    elif isinstance(message, Cancel):
                        running = calls.get(message.call)
                        if running is not None:
                            running.cancel()
                    elif isinstance(message, Control):
                        work = self._control(message)
                        calls[message.call] = self._start(message.call, work, link, calls)
                    elif isinstance(message, Notice):
                        hear = self._notices.get(message.topic)
                        if hear is not None:
                            hear(message.value)
                await link.drain()  # back-pressure: a slow reader slows its own writes
        finally:
            # The front-end went away (or we are closing): nobody waits for these.
            for running in calls.values():
                running.cancel()
            await asyncio.gather(*calls.values(), return_exceptions=True)
            self.connected -= 1
            self._connections.pop(task, None)
            link.close()

    def _start(
        self, call: int, work: Awaitable[Any], link: Link, calls: dict[int, asyncio.Task[None]]
    ) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._answer(call, work, link, calls))

    async def _answer(
        self, call: int, work: Awaitable[Any], link: Link, calls: dict[int, asyncio.Task[None]]
    ) -> None:
        """Await `work` and send its value or its error as `call`'s reply."""
        try:
            value = await work
        except asyncio.CancelledError:
            raise  # the caller went away: it waits for no reply
        except Exception as exc:
            link.send(Reply(call, error=portable(exc), cause=cause_of(exc)))
        else:
            link.send(Reply(call, value))
        finally:
            calls.pop(call, None)

    async def _submit(self, message: Submit) -> list[Result[OutT]]:
        engine = self.engine
        deadline = None if message.timeout_s is None else engine.clock() + message.timeout_s
        lane: Lane = "bulk" if message.bulk else "interactive"
        owner = None if message.tenant is None else Owner(message.tenant, message.weight)
        return await engine.submit_many(message.payloads, deadline=deadline, lane=lane, owner=owner)

    async def _control(self, message: Control) -> Any:
        if message.op == "stats":
            return self.engine.stats()
        if message.op == "reconfigure":
            if self._reconfigure is not None:
                await self._reconfigure(dict(message.args))
            else:
                self.engine.reconfigure(**message.args)
            return self.engine.stats()
        name = message.args["name"]
        handler = self._handlers.get(name)
        if handler is None:
            raise ValueError(f"the engine process has no handler {name!r}")
        return await handler(*message.args.get("args", ()))


class RemoteEngine(Generic[InT, OutT]):
    """A front-end's handle on the engine of another process (`EngineServer`).

    `submit_many` and `submit` behave as `Engine`'s; deadlines are absolute times on
    this process's `clock`, sent as time left. Lost connection: every waiting caller
    gets EngineClosed, and `connected` turns False (the front-end's health fails).
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] | None = None,
        unpack: Callable[[Any], OutT] | None = None,
        on_notice: Callable[[str, Any], None] | None = None,
    ) -> None:
        """`unpack` turns each output as it crossed the socket into what callers get
        (see `batcher.models.wire`: models in an engine process pack embeddings);
        `on_notice(topic, value)` hears each `Notice` the engine pushes."""
        self.path = path
        self._unpack = unpack
        self._on_notice = on_notice
        self._clock = clock
        self._link: Link | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._next_call = 0
        self._submitting = 0
        self._idle: asyncio.Event | None = None
        self._closing = False
        self.connected = False

    def clock(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.path)
        self._link = Link(writer)
        self.connected = True
        self._reader_task = asyncio.create_task(self._read(reader), name="microbatch-remote")

    async def aclose(self) -> None:
        self._closing = True
        if self._link is not None:
            self._link.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._lost("the front-end closed its connection to the engine")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (messages := await read_frame(reader)) is not None:
                for reply in messages:
                    if isinstance(reply, Notice):
                        if self._on_notice is not None:
                            self._on_notice(reply.topic, reply.value)
                        continue
                    assert isinstance(reply, Reply), "the engine sends replies and notices"
                    future = self._waiting.pop(reply.call, None)
                    if future is None or future.done():
                        continue  # its caller went away
                    if reply.error is not None:
                        if reply.cause is not None:
                            reply.error.__cause__ = RemoteCause(*reply.cause)
                        future.set_exception(reply.error)
                    else:
                        future.set_result(reply.value)
        finally:
            self._lost("the connection to the engine process was lost")

    def fail_waiting(self, why: str) -> None:
        """Fail every call still waiting with EngineClosed(`why`) (a drain that ran out of
        time answers them, as the engine's own drain does)."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(EngineClosed(why))

    def _lost(self, why: str) -> None:
        if self.connected and not self._closing:
            logger.error("%s; failing %d waiting calls", why, len(self._waiting))
        self.connected = False
        self.fail_waiting(why)

    def _call(self, make: Callable[[int], Message]) -> tuple[int, asyncio.Future[Any]]:
        if not self.connected or self._link is None:
            raise EngineClosed("not connected to the engine process")
        self._next_call += 1
        call = self._next_call
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call] = future
        self._link.send(make(call))
        return call, future

    async def submit_many(
        self, payloads: Sequence[InT], *, deadline: float | None = None,
        lane: Lane = "interactive", owner: Owner | None = None,
    ) -> list[Result[OutT]]:  # fmt: skip
        """As `Engine.submit_many`, in the engine process."""
        timeout_s = None if deadline is None else max(0.0, deadline - self.clock())
        bulk = lane == "bulk"
        tenant, weight = (None, 1.0) if owner is None else (owner.tenant, owner.weight)
        call, future = self._call(
            lambda c: Submit(c, list(payloads), timeout_s, bulk, tenant, weight)
        )
        self._submitting += 1
        if self._idle is not None:
            self._idle.clear()
        try:
            results: list[Result[Any]] = await future
        except asyncio.CancelledError:
            if self._waiting.pop(call, None) is not None and self._link is not None:
                self._link.send(Cancel(call))
            raise
        finally:
            self._submitting -= 1
            if self._submitting == 0 and self._idle is not None:
                self._idle.set()
        unpack = self._unpack
        if unpack is None:
            return results
        return [
            Result(
                unpack(r.value),
                r.queue_time_s,
                r.inference_time_s,
                r.batch_size,
                batch=r.batch,
                device_s=r.device_s,
            )
            for r in results
        ]

    async def submit(
        self, payload: InT, *, deadline: float | None = None, lane: Lane = "interactive",
        owner: Owner | None = None,
    ) -> Result[OutT]:  # fmt: skip
        [result] = await self.submit_many([payload], deadline=deadline, lane=lane, owner=owner)
        return result

    @property
    def submitting(self) -> int:
        """Submits waiting for their results now."""
        return self._submitting

    async def idle(self) -> None:
        """Return once no submit waits for its results (at once if none does)."""
        if self._submitting == 0:
            return
        if self._idle is None:
            self._idle = asyncio.Event()
        await self._idle.wait()

    def notify(self, topic: str, value: Any) -> None:
        """Push `Notice(topic, value)` to the engine process; nothing if not connected."""
        if self.connected and self._link is not None:
            self._link.send(Notice(topic, value))

    async def control(self, op: ControlOp, *, timeout_s: float | None = None, **args: Any) -> Any:
        """`stats`, `reconfigure` (changes as keywords; returns the new stats), or
        `call` (name=..., args=(...)) in the engine process. Raises TimeoutError after
        `timeout_s`."""
        call, future = self._call(lambda c: Control(c, op, args))
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._waiting.pop(call, None)

    @property
    def frames_sent(self) -> int:
        return 0 if self._link is None else self._link.frames_sent
