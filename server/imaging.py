"""Images off the event loop: each request's images are decoded and run through the
model's image processor (`batcher.models.ImageEncoder.encode_images`) on a small pool
of threads (Pillow and numpy release the GIL while they work), and what it cost is
measured apart from the queue and the forward pass.

Metrics: `microbatch_image_decode_seconds` and `microbatch_image_preprocess_seconds`
(per image), and `microbatch_images_total{model, outcome}`: `ok`, or the kind of
`BadImage` a refused image was (`not_an_image`, `too_many_pixels`, ...). The rate of
`ok` is the images per second the server takes in."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from batcher.models import BadImage, Encoder, ImageLimits, Options, Pixels

IMAGE_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


def default_threads() -> int:
    """Threads that decode images: up to four, never more than the cores this process
    may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


@dataclass(frozen=True, slots=True)
class Decoded:
    """A request's images: each `Pixels`, or the BadImage that says why it was refused."""

    items: list[Pixels | BadImage]

    @property
    def bad(self) -> list[tuple[int, BadImage]]:
        return [(i, item) for i, item in enumerate(self.items) if isinstance(item, BadImage)]

    @property
    def pixels(self) -> list[Pixels]:
        return [item for item in self.items if isinstance(item, Pixels)]


class Imaging:
    """The image threads and their metrics, one per server."""

    def __init__(
        self, registry: CollectorRegistry, limits: ImageLimits, threads: int | None = None
    ) -> None:
        self.limits = limits
        self._threads = threads or default_threads()
        self._pool: ThreadPoolExecutor | None = None
        self.decode_seconds = Histogram(
            "microbatch_image_decode_seconds",
            "Reading one image: base64, the file's decoding, EXIF orientation and RGB, on "
            "the image threads.",
            ["model"], buckets=IMAGE_SECONDS_BUCKETS, registry=registry,
        )  # fmt: skip
        self.preprocess_seconds = Histogram(
            "microbatch_image_preprocess_seconds",
            "The model's image processor (resize, crop, rescale, normalise) for one image, "
            "on the image threads (a request's images run in one call; each gets its share).",
            ["model"], buckets=IMAGE_SECONDS_BUCKETS, registry=registry,
        )  # fmt: skip
        self.images = Counter(
            "microbatch_images",
            "Images received, by outcome: ok, or why one was refused (the kind of bad image).",
            ["model", "outcome"], registry=registry,
        )  # fmt: skip

    async def encode(
        self, model: str, encoder: Encoder, images: Sequence[str | bytes], options: Options
    ) -> Decoded:
        """`encoder.encode_images(images, options)` on an image thread. Raises
        InvalidOption (the same for every image) before any is decoded."""
        encode = getattr(encoder, "encode_images", None)
        assert encode is not None, "the route checks that the model takes images"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="microbatch-images")
        loop = asyncio.get_running_loop()
        items, decode_s, preprocess_s = await loop.run_in_executor(
            self._pool, _timed, encode, images, options, self.limits
        )
        decode = self.decode_seconds.labels(model)
        for seconds in decode_s:
            decode.observe(seconds)
        decoded = Decoded(items)
        good = len(decoded.pixels)
        if good:
            preprocess = self.preprocess_seconds.labels(model)
            for _ in range(good):
                preprocess.observe(preprocess_s / good)
            self.images.labels(model, "ok").inc(good)
        for _, bad in decoded.bad:
            self.images.labels(model, bad.kind).inc()
        return decoded

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)


def _timed(
    encode: object, images: Sequence[str | bytes], options: Options, limits: ImageLimits
) -> tuple[list[Pixels | BadImage], list[float], float]:
    """On an image thread: the items, each image's decoding seconds and the processor's."""
    timings: list[float] = []
    started = time.perf_counter()
    items = encode(images, options, limits, timings)  # type: ignore[operator]
    total = time.perf_counter() - started
    return items, timings, max(0.0, total - sum(timings))
