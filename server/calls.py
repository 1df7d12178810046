"""One request's way through the served versions: the version that answers it and those
it is mirrored to (`server.versions`), kept on `request.state.call` from the moment a
route picks the version (`server.routes.parsing.serving`) to its reply."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.served import Served


@dataclass(slots=True)
class Call:
    served: Served
    """The version that answers."""
    shadows: list[Served] = field(default_factory=list)
    """The versions the request is mirrored to, answering no one."""
