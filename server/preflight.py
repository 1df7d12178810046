"""What `microbatch serve` checks before it loads anything: the mistakes a new user
makes in the first minutes (a mistyped model path, a device this machine lacks, a port
in use) are answered in one line naming the setting, not after a model load and a
traceback."""

from __future__ import annotations

import errno
import socket

from server.settings import Settings


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on `host:port`; None if it can (0: any port)."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"--port {port}: the port is in use on {host} (0 picks a free one)"
            return f"--host {host} --port {port}: cannot listen there: {exc.strerror}"
    return None


def problems(settings: Settings) -> list[str]:
    """Every reason the server cannot start with `settings`, found without loading the
    model. Checks the port first: it is the cheapest, and needs no torch. With
    `--workers N` the devices are checked by the engine process (`device_problems`), so
    that the supervisor never imports torch."""
    found = []
    if (problem := port_problem(settings.host, settings.port)) is not None:
        found.append(problem)
    if settings.workers > 1 and settings.rate_limit_rps is not None:
        found.append(
            "--rate-limit-rps counts per process: with --workers it would let each client "
            "through N times the rate; use one of them"
        )
    if settings.devices is not None and settings.device != "auto":
        found.append("--devices replaces --device: give one of them")
    if settings.workers == 1:
        found += device_problems(settings)
    from batcher.models import source_problem

    if (problem := source_problem(settings.model)) is not None:
        found.append(f"--model: {problem}")
    return found


def device_problems(settings: Settings) -> list[str]:
    """Why the devices `settings` names cannot be used on this machine (imports torch,
    unless every device is `auto`)."""
    try:
        devices = settings.device_list()
    except ValueError as exc:
        return [str(exc)]
    flag = "--device" if settings.devices is None else "--devices"
    found = []
    for device in dict.fromkeys(devices):
        if device == "auto":
            continue
        from batcher.models import device_problem

        if (problem := device_problem(device)) is not None:
            found.append(f"{flag} {problem}")
    return found
