"""Long inputs, opt in (`batcher.models.chunking`): with `"chunking": "mean"` (or the
server's `--chunking mean`), a text over the model's window is not cut but computed as
windows, each one item of the micro-batch, and answered as their combination. Texts
within the window, and inputs given as token ids, are computed as always."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import cast

from fastapi.exceptions import RequestValidationError

from batcher import Result
from batcher.models import Encoded, Encoder, Options, Output, combine, finish
from server.calls import Call, Input
from server.runtime import Runtime
from server.schemas import OutputOptions


def chunks_long_inputs(body: OutputOptions, runtime: Runtime, model: Encoder) -> bool:
    """Whether this request computes texts over the window as windows: it asks for
    chunking (or the server does, and the request does not ask to cut). 422 for a
    request that asks for chunking where it cannot apply."""
    if body.chunking == "mean":
        for reason, wrong in (
            (f"chunking applies to embedding models; this is a {model.task} model",
             model.task != "embed"),
            ("chunking computes inputs whole: it cannot go with truncate: true",
             body.truncate is True),
            ("chunking combines pooled vectors, not token vectors", body.token_embeddings),
        ):  # fmt: skip
            if wrong:
                raise RequestValidationError(
                    [{"loc": ("body", "chunking"), "msg": reason, "type": "value_error"}]
                )
        return True
    mode = body.chunking or runtime.settings.chunking
    return (
        mode == "mean"
        and model.task == "embed"
        and body.truncate is not True
        and (not body.token_embeddings)
    )


async def chunk_long_inputs(
    call: Call, model: Encoder, inputs: Sequence[Input], items: list[Encoded], options: Options
) -> list[Encoded]:
    """`items` with each text over the window replaced by the combination to come: its
    windows go on `call.chunks`, and its item holds every window's tokens (what the
    request computes) with the request's output options. Tokenized off the loop."""
    long = [i for i, item in enumerate(items) if item.truncated and isinstance(inputs[i], str)]
    if not long:
        return items
    texts = [inputs[i] for i in long]
    chunked = await asyncio.to_thread(lambda: [model.chunk(str(t), options) for t in texts])
    out = list(items)
    for i, chunks in zip(long, chunked, strict=True):
        call.chunks[i] = chunks
        ids = [t for window in chunks.windows for t in window.ids]
        type_ids = None if items[i].type_ids is None else [0] * len(ids)
        out[i] = replace(items[i], ids=ids, truncated=False, type_ids=type_ids)
    return out


def expand(call: Call, items: Sequence[Encoded]) -> tuple[list[Encoded], list[int]]:
    """What the engine computes for `items`: each chunked input's windows in its place;
    and where each input's outputs start."""
    flat: list[Encoded] = []
    starts = []
    for i, item in enumerate(items):
        starts.append(len(flat))
        chunks = call.chunks.get(i)
        flat.extend(chunks.windows if chunks is not None else [item])
    return flat, starts


def combined(
    call: Call, items: Sequence[Encoded], starts: list[int], results: list[Result[Output]]
) -> list[Result[Output]]:
    """One result per input: a chunked input's windows combined (their token-weighted
    mean, then the request's cut and normalisation), with its windows' times."""
    out = []
    for i, item in enumerate(items):
        chunks = call.chunks.get(i)
        if chunks is None:
            out.append(results[starts[i]])
            continue
        parts = results[starts[i] : starts[i] + len(chunks.windows)]
        mean = combine(cast("list[list[float]]", [p.value for p in parts]), chunks.weights)
        vector = finish(mean[None, :], item.dimensions, item.normalize)[0].tolist()
        out.append(Result(
            vector,
            queue_time_s=max(p.queue_time_s for p in parts),
            inference_time_s=sum(p.inference_time_s for p in parts),
            batch_size=parts[0].batch_size,
            cached=all(p.cached for p in parts),
            batch=parts[-1].batch,
            device_s=sum(p.device_s for p in parts),
        ))  # fmt: skip
    return out
