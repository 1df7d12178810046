"""One version of a model as the HTTP side serves it (`Served`), and the interface of
what loads versions while the server runs (`ModelLoader`, `server.fleet.Fleet` on the
engine side).

This module imports neither torch nor transformers, nor does anything it imports."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from batcher.models import Encoded, Encoder, Options, TruncationDirection
from server.cache import CachedEngine, ResultCache
from server.client import EngineClient, EngineHandle, EngineReport
from server.errors import NotReady
from server.imaging import Decoded, Imaging
from server.settings import Settings
from server.shared_cache import SharedCache
from server.specs import ModelSpec
from server.tokenizing import FRONT_END_INLINE_CHARS, INLINE_CHARS, Tokenizer

ServedState = Literal["loading", "warming", "ready", "draining", "failed"]
"""A version's state: `loading` while its weights load (`POST /admin/models`)."""


@dataclass(frozen=True, slots=True)
class Freed:
    """What unloading a version gave back: `bytes` by `measure`, the CUDA allocator's
    figure (`cuda allocated`) on a GPU, the process's resident set (`resident set`) on
    a CPU, whose allocator may keep some of it."""

    bytes: int
    measure: str


class ModelLoader(Protocol):
    """Loads and unloads versions while the server runs (`server.fleet.Fleet`)."""

    async def load(self, spec: ModelSpec) -> EngineClient:
        """Load `spec` (off the loop) and start warming it; raises what a load raises."""
        ...

    async def unload(self, client: EngineClient) -> Freed:
        """Drain `client`'s queue, stop it and free its memory."""
        ...


class Served:
    """One version of a model as the HTTP side serves it: its engine client (None while
    it loads), encoder and tokenizer, and its namespace in the shared cache."""

    def __init__(
        self,
        spec: ModelSpec,
        client: EngineClient | None,
        settings: Settings,
        cache: ResultCache | None,
        *,
        live: bool = False,
        imaging: Imaging | None = None,
    ) -> None:
        self.name = spec.name or ""
        """The model's served name ("" for a lone model served under its own)."""
        self.version = spec.served_version
        self.key = spec.key
        """`NAME@VERSION`, or the name alone for a model given no version."""
        self.spec = spec
        self._client = client
        self._settings = settings
        self._cache = cache
        self._joined = not live
        """Counts in the server's status (`joined`): from the start, unless loaded by
        `POST /admin/models` (`live`), then once ready."""
        self.error: str | None = None
        """Why its live load failed."""
        self.calls = 0
        """Requests under way that chose this version (`enter`, `leave`)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._tokenizer: Tokenizer | None = None
        self._imaging = imaging
        self._shared: SharedCache | None = None

    @property
    def client(self) -> EngineClient:
        if self._client is None:
            raise NotReady(f"the model {self.key} is still loading; retry when it is ready")
        return self._client

    @property
    def loaded(self) -> bool:
        return self._client is not None

    def attach(self, client: EngineClient) -> None:
        self._client = client

    def detach(self) -> EngineClient:
        """Hand over the engine client, to unload it: nothing here keeps its model alive."""
        client = self.client
        self._client = None
        self.error = "unloaded"
        return client

    def enter(self) -> None:
        """A request chose this version (`server.calls.Call`); `leave` when it is done."""
        self.calls += 1
        self._idle.clear()

    def leave(self) -> None:
        self.calls -= 1
        if self.calls == 0:
            self._idle.set()

    async def idle(self, timeout_s: float) -> bool:
        """Wait until no request that chose this version is still under way (False if
        `timeout_s` passed first): an unload lets them finish before it drains."""
        if self.calls == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def joined(self) -> bool:
        """Counts in the server's status: started with it, or loaded since and ready once."""
        if not self._joined and self._client is not None and self._client.status == "ready":
            self._joined = True
        return self._joined

    @property
    def state(self) -> ServedState:
        if self._client is None:
            return "failed" if self.error is not None else "loading"
        return self._client.status

    @property
    def serving(self) -> bool:
        """Ready to take requests."""
        return self._client is not None and self._client.status == "ready"

    @property
    def encoder(self) -> Encoder:
        """Its encoder: its name, task, labels and token limit, and how inputs become
        token ids. Raises EngineClosed (503) while a front-end waits for it."""
        return self.client.encoder

    @property
    def tokenizer(self) -> Tokenizer:
        """Tokenizes the requests' texts off the loop, in batches (`server.tokenizing`).
        A front-end tokenizes short texts on its loop always: its parallelism is the
        processes, a core each."""
        if self._tokenizer is None:
            if self.client.front_end:
                self._tokenizer = Tokenizer(
                    self.encoder, inline_chars=FRONT_END_INLINE_CHARS, gather_short=False
                )
            else:
                self._tokenizer = Tokenizer(self.encoder, inline_chars=INLINE_CHARS)
        return self._tokenizer

    @property
    def engine(self) -> EngineHandle:
        return self.client.engine

    def engine_for(self, *, cached: bool) -> EngineHandle:
        """The engine as a prediction sees it: behind the result cache when there is one
        (`cached=False`: a request that asked for a fresh answer skips its lookups)."""
        cache = self._cache
        if cache is None:
            return self.client.engine
        return CachedEngine(self.client.engine, cache, self._shared_cache(), read=cached,
                            model=self.key)  # fmt: skip

    def _shared_cache(self) -> SharedCache | None:
        """The Redis tier, made at the first prediction: its keys name the model, its
        version and its precision, known once the engine side is ready."""
        url = self._settings.cache_url
        if url is None or self._cache is None:
            return None
        if self._shared is None:
            dtype = self.describe().get("dtype", "")
            version = "" if self.spec.version is None else f"@{self.version}"
            namespace = f"microbatch:1:{self.encoder.name}{version}:{dtype}:"
            self._shared = SharedCache(
                url, namespace, self._settings.cache_ttl_s,
                self._cache.shared_hits, self._cache.shared_errors,
            )  # fmt: skip
        return self._shared

    def report(self) -> EngineReport | None:
        return self._client.report() if self._client is not None else None

    def describe(self) -> dict[str, object]:
        """The model, as the process that runs it describes it."""
        report = self.report()
        return dict(report.description) if report is not None else {}

    async def encode(
        self,
        inputs: Sequence[str | list[int]],
        pairs: Sequence[str] | None,
        options: Options,
        direction: TruncationDirection,
    ) -> list[Encoded]:
        """Texts and token-id sequences, in order, as this version tokenizes them: the
        texts in one call to its tokenizer (off the loop, batched with other requests),
        the ids in one to its encoder. `pairs` go with texts only. Raises InvalidOption."""
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        if len(texts) == len(inputs):
            return await self.tokenizer.encode([t for _, t in texts], pairs, options, direction)
        out: list[Encoded | None] = [None] * len(inputs)
        if texts:
            encoded = await self.tokenizer.encode([t for _, t in texts], None, options, direction)
            for (i, _), item in zip(texts, encoded, strict=True):
                out[i] = item
        ids = [(i, x) for i, x in enumerate(inputs) if not isinstance(x, str)]
        encoded = self.encoder.encode_ids([x for _, x in ids], options)
        for (i, _), item in zip(ids, encoded, strict=True):
            out[i] = item
        return [item for item in out if item is not None]

    @property
    def takes_images(self) -> bool:
        """Whether its model reads images (an image classifier, CLIP, SigLIP)."""
        return hasattr(self.encoder, "encode_images")

    async def encode_images(self, images: Sequence[str | bytes], options: Options) -> Decoded:
        """Each image as this version's `Pixels`, or why it was refused; off the loop
        (`server.imaging`). Raises InvalidOption."""
        if self._imaging is None:
            raise RuntimeError("this version was made without the image threads; this is a bug")
        return await self._imaging.encode(self.key or self.encoder.name, self.encoder, images,
                                          options)  # fmt: skip

    async def aclose(self) -> None:
        if self._tokenizer is not None:
            await self._tokenizer.aclose()
        if self._shared is not None:
            await self._shared.aclose()


def spec_of(key: str) -> ModelSpec:
    """The spec a served key stands for, where settings do not name it (models handed in)."""
    name, at, version = key.partition("@")
    return ModelSpec(name or None, None, version if at else None)
