"""What every child process of `microbatch serve --workers N` does first, and how it runs
its loop (`server.workers` starts them)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

from server.settings import Settings


def child_setup(settings: Settings) -> None:
    """In a child process: its own process group (Ctrl-C goes to the supervisor only)
    and the server's logging."""
    os.setpgid(0, 0)
    from server import logs

    logs.configure(settings.log_level, settings.log_format)


def run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main()` to completion on uvloop (asyncio's own loop where there is none)."""
    try:
        import uvloop
    except ImportError:  # not on Windows
        asyncio.run(main())
    else:
        uvloop.run(main())
