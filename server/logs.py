"""Logging setup: plain text, or one JSON object per line carrying the request id."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

from server.middleware import REQUEST_ID

LOGGER_NAMES = {"uvicorn.error": "uvicorn"}
"""Loggers shown under a plainer name: uvicorn logs its server's life as `uvicorn.error`."""


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request) to every record, and `where`: ` [id]`
    inside a request, nothing outside one."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id = REQUEST_ID.get()
        record.where = f" [{request_id}]" if request_id else ""
        record.name = LOGGER_NAMES.get(record.name, record.name)
        return True


STARTUP_ERRORS = (".ModelLoadError", ".UnsupportedModel")
"""Exceptions that mean "this model cannot be served", whose traceback says nothing more."""


class StartupFailureFilter(logging.Filter):
    """Below debug level, a model that fails to load at startup is logged as its one-line
    reason, not as the traceback uvicorn attaches (`--log-level debug` keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info:
            from batcher.models import ModelLoadError, UnsupportedModel

            exc = record.exc_info[1]
            if isinstance(exc, ModelLoadError | UnsupportedModel):
                record.msg, record.args = "cannot start: %s", (exc,)
                record.exc_info = record.exc_text = None
            return True
        # Starlette hands a failed lifespan to uvicorn as the traceback's text.
        message = record.getMessage()
        if message.startswith("Traceback"):
            for line in reversed(message.splitlines()):
                kind, _, reason = line.partition(": ")
                if kind.endswith(STARTUP_ERRORS) and reason:
                    record.msg, record.args = "cannot start: %s", (reason,)
                    break
        return True


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id"}`, plus `exception` when
    there is one (logs are for operators; responses never carry a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: Literal["text", "json"]) -> dict[str, object]:
    """Configure the root logger; returns uvicorn's `log_config` to match."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if level.lower() != "debug":
        handler.addFilter(StartupFailureFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return uvicorn_log_config()


def uvicorn_log_config() -> dict[str, object]:
    """uvicorn's `log_config`: its loggers propagate to the root handler (`configure`)
    instead of their own."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
