"""The `microbatch` command."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from pydantic import ValidationError
from pydantic_settings import CliApp

USAGE = """usage: microbatch COMMAND [options]

commands:
  serve     start the inference server (microbatch serve --help lists every setting)
  bench     load a running server: throughput and latency per load (closed or open loop)
  sweep     try batching settings live on a server and pick the best for a p99 target
  plot      throughput-vs-latency curves from bench/sweep JSON files
  soak      an adversarial run (valid, malformed, hang-ups, an overload burst): nothing lost
"""


def serve(argv: list[str]) -> int:
    """Parse settings (flags over MICROBATCH_* variables over defaults) and run uvicorn
    with uvloop and httptools until SIGINT/SIGTERM, then drain (see server.draining)."""
    from server.settings import Settings

    try:
        settings = CliApp.run(Settings, cli_args=argv)
    except ValidationError as exc:
        for error in exc.errors():
            name = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-")
            print(f"microbatch serve: {name}: {error['msg']}", file=sys.stderr)
        return 2

    from batcher.models import disable_progress_bars
    from server import logs
    from server.app import create_app
    from server.draining import DrainingServer

    log_config = logs.configure(settings.log_level, settings.log_format)
    disable_progress_bars()
    app = create_app(settings)
    server = DrainingServer(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=log_config,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 1,
        timeout_keep_alive=settings.keep_alive_s,
    )
    # uvicorn re-raises the signal it caught once it has shut down; after a clean drain
    # SIGTERM should end the process with status 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1


def _bench(argv: list[str]) -> int:
    from benchmarks import bench

    return bench.main(argv)


def _sweep(argv: list[str]) -> int:
    from benchmarks import sweep

    return sweep.main(argv)


def _plot(argv: list[str]) -> int:
    from benchmarks import plot

    return plot.main(argv)


def _soak(argv: list[str]) -> int:
    from benchmarks import soak

    return soak.main(argv)


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "bench": _bench,
    "sweep": _sweep,
    "plot": _plot,
    "soak": _soak,
}
"""The load-testing tools of `benchmarks/` (the `bench` extra), imported when called so
that `microbatch serve` loads none of them."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        return serve(rest)
    tool = TOOLS.get(command)
    if tool is not None:
        return tool(rest)
    print(f"microbatch: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
