"""The `microbatch` command."""

from __future__ import annotations

import difflib
import signal
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_settings import CliApp, CliSettingsSource

if TYPE_CHECKING:
    from server.settings import Settings

USAGE = """usage: microbatch COMMAND [options]

commands:
  serve     start the inference server (microbatch serve --help lists every setting)
  log       what the prediction log says: requests, p50/p99, errors per version and hour
  key       make an API key for a tenant, and its entry for the tenants file
  version   print microbatch's version (also: microbatch --version)
  bench     load a running server: throughput and latency per load (closed or open loop)
  sweep     try batching settings live on a server and pick the best for a p99 target
  plot      throughput-vs-latency curves from bench/sweep JSON files
  soak      an adversarial run (valid, malformed, hang-ups, an overload burst): nothing lost
"""


def package_version() -> str:
    try:
        return version("microbatch")
    except PackageNotFoundError:
        return "0+unknown"


def _add_argument(parser: Any, *names: str, **kwargs: Any) -> Any:
    """Every `serve` flag as pydantic-settings builds it, with its help made plainer: no
    "(default: null)" where the description says what unset means, and secrets shown as
    KEY rather than their type."""
    help_text = kwargs.get("help")
    if isinstance(help_text, str):
        kwargs["help"] = help_text.replace(" (default: null)", "")
    if kwargs.get("metavar") == "SecretStr":
        kwargs["metavar"] = "KEY"
    return parser.add_argument(*names, **kwargs)


def _unknown_flag(argv: list[str], settings_cls: Any) -> str | None:
    """A one-line answer to a mistyped flag, with the closest real ones."""
    known = {"--help", "-h"}
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        known.add(flag)
        if field.annotation is bool:
            known.add("--no-" + name.replace("_", "-"))
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-") and flag not in known and not _is_number(flag):
            close = difflib.get_close_matches(flag, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            return f"microbatch serve: unknown option {flag}{hint} (--help lists them all)"
    return None


def _joined(flag: str, argv: list[str]) -> list[str]:
    """`argv` with every `flag VALUE` (or `flag=VALUE`) given as one `flag V1,V2,...`,
    where the first was: a repeated flag whose setting is a list (`--model a=x --model
    b=y`), whatever the pydantic-settings release makes of repeats."""
    values: list[str] = []
    rest: list[str] = []
    at: int | None = None
    args = iter(argv)
    for arg in args:
        if arg == flag or arg.startswith(flag + "="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            at = len(rest) if at is None else at
            values.append(value)
        else:
            rest.append(arg)
    if at is None:
        return argv
    return [*rest[:at], flag, ",".join(values), *rest[at:]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class UnknownFlag(ValueError):
    """A flag `microbatch serve` does not have; the message suggests the nearest."""


def parse_serve_args(argv: list[str]) -> Settings:
    """The settings `microbatch serve ARGV` runs with: flags over MICROBATCH_* variables
    over defaults. Raises UnknownFlag, or pydantic's ValidationError."""
    from server.settings import Settings

    unknown = _unknown_flag(argv, Settings)
    if unknown is not None:
        raise UnknownFlag(unknown)
    source: CliSettingsSource[Settings] = CliSettingsSource(
        Settings, add_argument_method=_add_argument
    )
    return CliApp.run(Settings, cli_args=_joined("--model", argv), cli_settings_source=source)


def serve(argv: list[str]) -> int:
    """Parse settings (flags over MICROBATCH_* variables over defaults) and run uvicorn
    with uvloop (where installed) and httptools until SIGINT/SIGTERM, then drain (see
    server.draining)."""
    try:
        settings = parse_serve_args(argv)
    except UnknownFlag as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValidationError as exc:
        for error in exc.errors():
            if not error["loc"]:  # a check across settings: its message names them
                message = str(error["msg"]).removeprefix("Value error, ")
                print(f"microbatch serve: {message}", file=sys.stderr)
                continue
            name = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-")
            print(f"microbatch serve: {name}: {error['msg']}", file=sys.stderr)
        return 2

    from server import logs, preflight

    log_config = logs.configure(settings.log_level, settings.log_format)
    try:
        sock = preflight.listen(settings.host, settings.port)  # first: the cheapest check
    except preflight.PortUnavailable as exc:
        print(f"microbatch serve: {exc}", file=sys.stderr)
        return 2
    found = preflight.problems(settings)
    for problem in found:
        print(f"microbatch serve: {problem}", file=sys.stderr)
    if found:
        sock.close()
        return 2
    if settings.workers > 1:
        from server.workers import supervise

        return supervise(settings, sock)

    from batcher.models import disable_progress_bars
    from server.app import create_app
    from server.draining import DrainingServer

    disable_progress_bars()
    app = create_app(settings)
    server = DrainingServer(
        app,
        host=settings.host,
        port=settings.port,
        loop="auto",  # uvloop where it is installed (not on Windows)
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
    server.run(sockets=[sock])
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


TOOL_EXTRA = "bench"
"""The extra that installs what TOOLS import (aiohttp, tqdm, matplotlib)."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in ("version", "--version", "-V"):
        print(f"microbatch {package_version()}")
        return 0
    if command == "serve":
        return serve(rest)
    if command == "log":
        from server import log_report

        return log_report.main(rest)
    if command == "key":
        from server.tenants import key_main

        return key_main(rest)
    tool = TOOLS.get(command)
    if tool is not None:
        try:
            return tool(rest)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] in ("benchmarks", "batcher", "server"):
                raise
            print(
                f"microbatch {command} needs the {TOOL_EXTRA} extra ({exc.name} is missing): "
                f"pip install 'microbatch[{TOOL_EXTRA}]'",
                file=sys.stderr,
            )
            return 2
    commands = ["serve", "log", "key", "version", *TOOLS]
    close = difflib.get_close_matches(command, commands, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    print(f"microbatch: unknown command {command!r}{hint} (microbatch --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
