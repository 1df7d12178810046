"""Tenants and their keys: who a caller is, what it may call, and its limits and weight.

The tenants file (`--tenants-file`, TOML) names them:

    [defaults]                 # every tenant's, unless its own section says otherwise
    requests_per_s = 50
    [tenants.acme]
    weight = 3                 # its share of the device while tenants compete
    daily_items = 1_000_000
    [[keys]]
    sha256 = "<hex digest of the key>"   # or key = "<the key>"
    tenant = "acme"
    scopes = ["predict"]       # predict, predict:MODEL, admin

It is read again when it changes (its modification time, looked at no more than once a
second, or SIGHUP): a key removed from it is refused from the next request on, with no
restart. A file that no longer parses keeps the last good one in force, with an error
logged. Keys are held as SHA-256 digests and looked up by digest, so a key's own bytes
are never compared, kept or logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from batcher import Lane, Owner
from server.specs import MODEL_NAME

logger = logging.getLogger("microbatch.server")

PREDICT, ADMIN = "predict", "admin"
SCOPE_HELP = "predict (every model), predict:MODEL (one model) or admin"
RELOAD_CHECK_S = 1.0
"""How often, at most, the tenants file's modification time is looked at."""


def valid_scope(scope: str) -> bool:
    if scope in (PREDICT, ADMIN):
        return True
    prefix, _, model = scope.partition(":")
    return prefix == PREDICT and MODEL_NAME.fullmatch(model) is not None


class TenantLimits(BaseModel):
    """A tenant's limits and weight; a limit left out is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, gt=0, description="Its share of the device while tenants compete.")
    requests_per_s: float | None = Field(None, gt=0, description="Requests a second.")
    burst: int | None = Field(None, ge=1, description="Requests at once; default: a second's.")
    tokens_per_s: float | None = Field(None, gt=0, description="Input tokens a second.")
    token_burst: int | None = Field(
        None, ge=1, description="Tokens at once; default: a second's (at least 512)."
    )
    max_concurrent: int | None = Field(None, ge=1, description="Inputs queued or computing.")
    daily_items: int | None = Field(None, ge=1, description="Inputs a UTC day.")
    lane: Lane = Field(
        "interactive",
        description="Its requests' lane. `bulk`: behind every tenant's interactive requests "
        "(its X-Priority cannot lift them), with the bulk lane's share kept and its batches "
        "cut short while interactive requests flow: for batch jobs.",
    )

    def over(self, defaults: TenantLimits) -> TenantLimits:
        """These limits, with the ones this section leaves out taken from `defaults`."""
        return defaults.model_copy(update=self.model_dump(exclude_unset=True))


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: SecretStr | None = Field(None, description="The key itself (or give `sha256`).")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="The key's SHA-256, in hex, so that the file holds no key "
        "(`printf %s KEY | sha256sum`).",
    )
    tenant: str = Field(min_length=1, max_length=128, description="Whose key it is.")
    scopes: tuple[str, ...] = Field((PREDICT,), description=f"What it may call: {SCOPE_HELP}.")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give each key as `key` or as `sha256`, one of them")
        for scope in self.scopes:
            if not valid_scope(scope):
                raise ValueError(f"scope {scope!r} is not one of {SCOPE_HELP}")
        return self

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.key is not None  # the validator's rule
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: TenantLimits = TenantLimits()
    tenants: dict[str, TenantLimits] = {}
    keys: tuple[KeyEntry, ...] = ()

    @classmethod
    def read(cls, path: Path) -> TenantsFile:
        """Raises ValueError naming the file and what is wrong in it."""
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except OSError as exc:
            raise ValueError(f"--tenants-file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--tenants-file {path}: not TOML: {exc}") from None
        except ValidationError as exc:
            where = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"--tenants-file {path}: {where}") from None

    def has_limits(self) -> bool:
        """Whether any tenant has a rate, concurrency or quota limit."""
        sections = [self.defaults, *self.tenants.values()]
        kept = {"weight", "lane"}  # the engine's, not a count of this process
        return any(s.model_dump(exclude=kept, exclude_none=True) for s in sections)


def per_process_problem(parsed: TenantsFile, workers: int) -> str | None:
    """Why `parsed` cannot be used with `workers` front-ends, or None."""
    if workers > 1 and parsed.has_limits():
        return ("tenants' rate, concurrency and quota limits count per process: with "
                "--workers they would let each tenant through N times; leave them out "
                "or serve without --workers")  # fmt: skip
    return None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: its tenant, what it may call, its limits, and an id
    that names its credential without revealing it (the route key, and logs)."""

    tenant: str
    scopes: frozenset[str]
    credential: str
    limits: TenantLimits
    shares: bool = True
    """Whether its inputs carry its owner to the engine (the fair share, the queue's
    reserve): not for `--api-keys` keys, which behave as before tenants."""

    @property
    def owner(self) -> Owner | None:
        return Owner(self.tenant, self.limits.weight) if self.shares else None

    def may_predict(self, model: str | None = None) -> bool:
        """May call the predict routes: of `model`, or (None) of some model."""
        if PREDICT in self.scopes:
            return True
        if model is None:
            return any(s.startswith(PREDICT + ":") for s in self.scopes)
        return f"{PREDICT}:{model}" in self.scopes

    def may_admin(self) -> bool:
        return ADMIN in self.scopes


def new_key(tenant: str, scopes: list[str]) -> tuple[str, str]:
    """A fresh random API key, and its `[[keys]]` entry for the tenants file (its digest,
    not the key). Raises ValueError for a bad tenant or scope."""
    import secrets

    key = "mb_" + secrets.token_urlsafe(32)
    entry = KeyEntry(key=SecretStr(key), tenant=tenant, scopes=tuple(scopes))
    listed = ", ".join(f'"{scope}"' for scope in entry.scopes)
    toml = (f'[[keys]]\nsha256 = "{entry.digest().hex()}"\ntenant = "{entry.tenant}"\n'
            f"scopes = [{listed}]\n")  # fmt: skip
    return key, toml


def key_main(argv: list[str]) -> int:
    """`microbatch key`: print a new API key and its entry for the tenants file."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="microbatch key",
        description="Make a new API key for a tenant: prints the key (give it to the "
        "tenant; it is not kept anywhere) and the [[keys]] entry to add to the tenants "
        "file, which holds only the key's SHA-256.",
    )
    parser.add_argument("--tenant", required=True, help="whose key it is")
    scopes = f"what it may call (repeat the flag): {SCOPE_HELP}; default: predict"
    parser.add_argument("--scope", action="append", dest="scopes", default=None, help=scopes)
    args = parser.parse_args(argv)
    try:
        key, entry = new_key(args.tenant, args.scopes or [PREDICT])
    except ValidationError as exc:
        print(f"microbatch key: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    print(f"# the key, for the tenant (not kept anywhere): {key}")
    print(entry, end="")
    return 0


def credential_id(kind: str, secret: bytes) -> str:
    """A short, stable name of a credential that cannot be turned back into it."""
    return f"{kind}:{hashlib.sha256(secret).hexdigest()[:16]}"


class Tenants:
    """The tenants file as in force now (or none), and the keys of `--api-keys`, which
    act as keys of their own tenant, each named by its id, with the `predict` scope."""

    def __init__(
        self,
        path: Path | None,
        api_keys: frozenset[str] = frozenset(),
        *,
        clock: Callable[[], float] = time.monotonic,
        check: Callable[[TenantsFile], str | None] = lambda _: None,
    ) -> None:
        self.path = path
        self._clock = clock
        self._check = check
        """A reason a file cannot be used here (e.g. limits with --workers), or None."""
        self._legacy = {
            hashlib.sha256(k.encode()).digest(): credential_id("key", k.encode()) for k in api_keys
        }
        self._file = TenantsFile()
        self._keys: dict[bytes, KeyEntry] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self.reloads = 0
        if path is not None:
            self._use(TenantsFile.read(path), self._stat())

    @property
    def file(self) -> TenantsFile:
        return self._file

    @property
    def keys_required(self) -> bool:
        """Whether the client routes need a key: some are configured, or a tenants file
        is (whose last key removed closes the server, not opens it)."""
        return bool(self._legacy or self._keys or self.path is not None)

    def limits(self, tenant: str) -> TenantLimits:
        own = self._file.tenants.get(tenant)
        return self._file.defaults if own is None else own.over(self._file.defaults)

    def by_key(self, token: bytes) -> Principal | None:
        """The principal of API key `token`, or None for a key not configured."""
        digest = hashlib.sha256(token).digest()
        entry = self._keys.get(digest)
        if entry is not None:
            scopes = frozenset(entry.scopes)
            return Principal(
                entry.tenant, scopes, credential_id("key", token), self.limits(entry.tenant)
            )
        legacy = self._legacy.get(digest)
        if legacy is not None:  # as before tenants: no share of its own in the engine
            return Principal(legacy, frozenset({PREDICT}), legacy, self.limits(legacy), False)
        return None

    def refresh(self) -> None:
        """Read the file again if it changed since it was last read (looked at once a
        `RELOAD_CHECK_S` at most)."""
        now = self._clock()
        if self.path is None or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        stamp = self._stat()
        if stamp != self._stamp:
            self.reload(stamp)

    def reload(self, stamp: tuple[int, int] | None = None) -> bool:
        """Read the file again now (SIGHUP). A file that does not parse, or cannot be
        used here, leaves the one in force, with an error logged. Returns whether the
        new one is in force."""
        if self.path is None:
            return False
        stamp = self._stat() if stamp is None else stamp
        try:
            self._use(TenantsFile.read(self.path), stamp)
        except ValueError as exc:
            self._stamp = stamp  # logged once per change, not once a second
            logger.error("%s; the tenants file in force stays", exc)
            return False
        logger.info("tenants file %s read: %d tenants, %d keys", self.path,
                    len(self._file.tenants), len(self._keys))  # fmt: skip
        return True

    def _use(self, parsed: TenantsFile, stamp: tuple[int, int] | None) -> None:
        problem = self._check(parsed)
        if problem is not None:
            raise ValueError(f"--tenants-file {self.path}: {problem}")
        self._file, self._stamp = parsed, stamp
        self._keys = {entry.digest(): entry for entry in parsed.keys}
        self.reloads += 1

    def _stat(self) -> tuple[int, int] | None:
        assert self.path is not None
        return file_stamp(self.path)


def file_stamp(path: str | Path) -> tuple[int, int] | None:
    """A file's modification time and size (None if it is gone): what tells a change."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size
