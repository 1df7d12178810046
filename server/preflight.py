"""What `microbatch serve` checks before it loads anything: the mistakes a new user
makes in the first minutes (a mistyped model path, a device this machine lacks, a port
in use) are answered in one line naming the setting, not after a model load and a
traceback."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from server.settings import Settings
from server.tenants import TenantsFile, per_process_problem
from server.tokens import jwks_problem


class PortUnavailable(Exception):
    """The server cannot listen where it was asked to; the message names the flags."""


def listen(host: str, port: int, flag: str = "--port") -> socket.socket:
    """The server's listening socket, bound and listening before anything loads: from
    then on the port is this server's, and a second server started on it a moment later
    is refused at once, not after its model has loaded (0 picks a free port). Raises
    PortUnavailable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
        # Listening now, not when uvicorn starts: two sockets that both allow reusing
        # the address may bind one port as long as neither listens.
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortUnavailable(
                f"{flag} {port}: the port is in use on {host} (0 picks a free one)"
            ) from None
        raise PortUnavailable(
            f"--host {host} {flag} {port}: cannot listen there: {exc.strerror}"
        ) from None
    sock.set_inheritable(True)  # the front-ends of --workers accept on it
    return sock


def grpc_port_problem(settings: Settings) -> str | None:
    """Why `--grpc-port` cannot be served: the HTTP port, 0 where several front-ends
    would each pick their own, or a port something listens on (tried by binding it;
    the gRPC server binds it for good once the app starts)."""
    port = settings.grpc_port
    if port is None:
        return None
    if port == 0:
        if settings.workers > 1:
            return "--grpc-port 0: with --workers every front-end serves gRPC; give a port"
        return None
    if port == settings.port:
        return f"--grpc-port {port}: that is --port; gRPC needs a port of its own"
    try:
        listen(settings.host, port, "--grpc-port").close()
    except PortUnavailable as exc:
        return str(exc)
    return None


def problems(settings: Settings) -> list[str]:
    """Every reason the server cannot start with `settings`, found without loading the
    model (the port is `listen`'s). With `--workers N` the devices are checked by the
    engine process (`device_problems`), so that the supervisor never imports torch."""
    found = []
    if settings.workers > 1 and settings.rate_limit_rps is not None:
        found.append(
            "--rate-limit-rps counts per process: with --workers it would let each client "
            "through N times the rate; use one of them"
        )
    if settings.workers > 1 and len(settings.model_specs()) > 1:
        found.append(
            "--workers serves one model: several models are served in one process "
            "(drop --workers, or run one server per model)"
        )
    if (problem := grpc_port_problem(settings)) is not None:
        found.append(problem)
    if settings.jwt_jwks is not None and (problem := jwks_problem(settings.jwt_jwks)):
        found.append(problem)
    if settings.tenants_file is not None:
        try:
            parsed = TenantsFile.read(settings.tenants_file)
        except ValueError as exc:
            found.append(str(exc))
        else:
            if (problem := per_process_problem(parsed, settings.workers)) is not None:
                found.append(f"--tenants-file: {problem}")
    if settings.devices is not None and settings.device != "auto":
        found.append("--devices replaces --device: give one of them")
    if settings.workers == 1:
        found += device_problems(settings)
        if not found and (problem := memory_problem(settings)) is not None:
            found.append(problem)
    from batcher.models import source_problem

    for spec in settings.model_specs():
        if (problem := source_problem(spec.source)) is not None:
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


def memory_problem(
    settings: Settings, memory: Callable[[str], int | None] | None = None
) -> str | None:
    """Why the models do not fit their devices, in one line naming each model's share;
    None when they fit or cannot be sized (a hub id, a device of unknown size). Each
    model's footprint is its weights at the served precision plus the activations of
    its largest batch (`batcher.models.sizing`); every model has a replica on every
    device. `memory(device)` is the device's bytes (default: what it has)."""
    from batcher.models import GiB, device_memory, footprint, resolve_device

    memory = memory if memory is not None else device_memory
    specs = settings.model_specs()
    for device in dict.fromkeys(settings.device_list()):
        resolved = resolve_device(device)
        have = memory(resolved)
        if have is None:
            continue
        sized = []
        for spec in specs:
            options = settings.load_options(resolved, spec)
            found = footprint(options, settings.max_batch_size, resolved)
            if found is not None:
                sized.append((spec.name or spec.source or "the built-in model", found))
        need = sum(f.total_bytes for _, f in sized)
        if need > have:
            parts = "; ".join(f"{name} {f.describe()}" for name, f in sized)
            return (
                f"--model: the models need {need / GiB:.2f} GiB on {resolved}, which has "
                f"{have / GiB:.2f} GiB: {parts}; lower --max-batch-size or --max-tokens, or "
                f"serve fewer models"
            )
    return None
