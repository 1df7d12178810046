"""One request's way through the served versions: the version that answers it and those
it is mirrored to (`server.versions`), and what it asked, kept on `request.state.call`
from the moment a route picks the version (`server.routes.parsing.serving`) to its
reply, where the shadows (`server.shadow`) and the prediction log (`server.prediction_log`)
take it over. A call counts as under way on its version until `release` (by the request
middleware, once the request is over), so that unloading the version waits for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from batcher.models import Chunks, Encoded, Options, Output, TruncationDirection
from server.served import Served

Input = str | list[int] | bytes
"""A text, or a sequence of token ids (OpenAI's and TEI's `input`), or an image (base64, a
data URI, or an uploaded file's bytes) when `Call.images`."""


@dataclass(slots=True)
class Call:
    served: Served
    """The version that answers."""
    request_id: str = ""
    route: str = ""
    """The request's path."""
    shadows: list[Served] = field(default_factory=list)
    """The versions the request is mirrored to, answering no one."""
    inputs: Sequence[Input] = ()
    pairs: Sequence[str] | None = None
    """Each input's second text (a cross-encoder's document), or None."""
    options: Options | None = None
    direction: TruncationDirection = "right"
    items: Sequence[Encoded] = ()
    """The inputs as the answering version tokenized them."""
    tenant: str | None = None
    """Whose request it is (`server.tenants`); None on a server without tenants."""
    chunks: dict[int, Chunks] = field(default_factory=dict)
    """Inputs over the window computed as windows (`server.routes.chunking`), by index:
    `items` holds their combined form, the engine receives the windows."""
    images: bool = False
    """The inputs are images (`server.routes.encoding.encode_images`)."""
    computed: list[Output] | None = None
    """The answers, where the front-end computed them without the engine (the queries of
    an inference-free sparse model)."""
    _released: bool = False

    def __post_init__(self) -> None:
        self.served.enter()

    def release(self) -> None:
        """The request is done (answered, failed or gone): its version may unload.
        Once; later calls do nothing."""
        if not self._released:
            self._released = True
            self.served.leave()

    def record(
        self,
        inputs: Sequence[Input],
        pairs: Sequence[str] | None,
        options: Options,
        direction: TruncationDirection,
        items: Sequence[Encoded],
    ) -> None:
        """What the request asked, once its inputs are tokenized."""
        self.inputs, self.pairs, self.options = inputs, pairs, options
        self.direction, self.items = direction, items
