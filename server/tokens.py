"""JWT bearer tokens (PyJWT): verified, then turned into a principal (`server.tenants`).

HS256 with a shared secret (`--jwt-secret`), or RS256/ES256 with the public keys of a
JWKS (`--jwt-jwks`, a file or an https URL, as identity providers publish them). `exp`
is required; `nbf`, and `iss` and `aud` where set, are checked, each with
`--jwt-leeway-s` of clock skew. The tenant is the claim `--jwt-tenant-claim` (`sub`);
the scopes are `scope` (space-separated, RFC 8693) or `scp` (a list or a string).

The JWKS is cached: a file is read again when it changes (looked at once a second at
most), a URL fetched again every
`refresh_s` and when a token names a key id the set lacks (at most once every
`MIN_REFETCH_S`, so that tokens with made-up key ids cannot make the server hammer the
provider). A failed read or fetch keeps the last good set. Reads and fetches run on a
thread: the event loop never waits on a file's contents or on the network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from server.tenants import Principal, Tenants, file_stamp, valid_scope

logger = logging.getLogger("microbatch.server")

SYMMETRIC = ("HS256",)
ASYMMETRIC = ("RS256", "ES256")
CACHED_TOKENS = 4096
MIN_REFETCH_S = 30.0
FILE_CHECK_S = 1.0
"""How often, at most, a JWKS file's modification time is looked at."""
FETCH_TIMEOUT_S = 5.0


class TokenRefused(Exception):
    """A token that does not verify (401); the message says why, and never quotes it."""


@dataclass(frozen=True, slots=True)
class JwtConfig:
    secret: str | None = None
    jwks: str | None = None
    """A JWKS file's path, or an http(s) URL."""
    issuer: str | None = None
    audience: str | None = None
    tenant_claim: str = "sub"
    leeway_s: float = 30.0
    refresh_s: float = 300.0


def looks_like_jwt(token: bytes) -> bool:
    """Three base64url parts: a JWT, not an API key."""
    return token.count(b".") == 2 and token.startswith(b"eyJ")


class Jwks:
    """The public keys of a JWKS file or URL, by key id, as last read."""

    def __init__(
        self, source: str, refresh_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.source = source
        self.remote = source.startswith(("http://", "https://"))
        self.refresh_s = refresh_s
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._read_at = float("-inf")
        self._stamp: tuple[int, int] | None = None
        self._reading: asyncio.Task[None] | None = None
        self.generation = 0
        """How many sets have been read: tokens verified against an older one are checked
        again."""

    async def load(self) -> None:
        """Read the set now; raises ValueError when it cannot be read or holds no key."""
        self._use(await asyncio.to_thread(self._fetch))

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key named `kid` (the only key, for a token that names none)."""
        missing = kid not in self._keys and (kid is not None or not self._keys)
        await self.fresh(missing)
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        found = self._keys.get(kid)
        if found is None:
            named = f"no key {str(kid)[:64]!r} in the JWKS"
            raise TokenRefused(named if kid else "token names no key id")
        return found

    async def fresh(self, missing: bool = False) -> None:
        """Read the set again where it may have changed: a file once a second (a look at
        its time; a read only if it changed); a URL every `refresh_s` in the background,
        or at once for a key id it lacks (`missing`), once every `MIN_REFETCH_S`."""
        age = self._clock() - self._read_at
        if not self.remote and age >= FILE_CHECK_S:
            await self._refresh()
        elif missing and age >= MIN_REFETCH_S:
            await self._refresh()  # a key rotated in: this token waits for the new set
        elif age >= self.refresh_s:
            self._refresh()  # the others are served from the set in force meanwhile

    def _refresh(self) -> asyncio.Future[None]:
        """The read under way, or a new one: one at a time, however many requests find
        the set stale. Awaiting it does not cancel it."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._read())
        return asyncio.shield(self._reading)

    async def _read(self) -> None:
        self._read_at = self._clock()
        if not self.remote:
            stamp = file_stamp(self.source)
            if stamp == self._stamp and self._keys:
                return
            self._stamp = stamp
        try:
            self._use(await asyncio.to_thread(self._fetch))
        except ValueError as exc:
            logger.error("%s; the keys read before stay in force", exc)

    def _fetch(self) -> Mapping[str, Any]:
        try:
            if self.remote:
                opener = urllib.request.build_opener(_NoDowngrade)
                with opener.open(self.source, timeout=FETCH_TIMEOUT_S) as reply:
                    return dict(json.loads(reply.read()))
            return dict(json.loads(Path(self.source).read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--jwt-jwks {self.source}: cannot read it: {exc}") from None

    def _use(self, data: Mapping[str, Any]) -> None:
        if data.get("keys") == []:  # every key withdrawn: every token refused
            keys = []
        else:
            try:
                keys = jwt.PyJWKSet.from_dict(dict(data)).keys
            except jwt.PyJWTError as exc:
                raise ValueError(f"--jwt-jwks {self.source}: {exc}") from None
        self._keys = {key.key_id: key for key in keys}
        self._read_at = self._clock()
        self.generation += 1


@dataclass(frozen=True, slots=True)
class _Verified:
    tenant: str
    scopes: frozenset[str]
    expires: float
    """Wall time after which the token is refused (its `exp` plus the leeway)."""
    keys: int
    """The JWKS generation it was checked against."""


class Verifier:
    """Checks a JWT and names its principal. A client sends the same token until it
    expires, so a verified token is remembered (at most `CACHED_TOKENS`, by its bytes)
    until its `exp`, or until the JWKS changes: a check costs a dictionary lookup, not
    a signature (benchmarks/lab/tenants.py measures both)."""

    def __init__(self, config: JwtConfig, tenants: Tenants) -> None:
        self.config = config
        self.tenants = tenants
        self.jwks = None if config.jwks is None else Jwks(config.jwks, config.refresh_s)
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()

    async def principal(self, token: bytes) -> Principal:
        """Raises TokenRefused with the reason."""
        known = self._verified.get(token)
        if known is not None and time.time() < known.expires:
            if self.jwks is not None:
                await self.jwks.fresh()
            if known.keys == self._generation():
                return self._principal(known.tenant, known.scopes)
        claims = await self._claims(token.decode("ascii", "replace"))
        tenant = claims.get(self.config.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise TokenRefused(f"token has no {self.config.tenant_claim!r} claim naming its tenant")
        scopes = _scopes(claims)
        expires = float(claims["exp"]) + self.config.leeway_s
        self._verified[token] = _Verified(tenant, scopes, expires, self._generation())
        if len(self._verified) > CACHED_TOKENS:
            self._verified.popitem(last=False)
        return self._principal(tenant, scopes)

    def _generation(self) -> int:
        return 0 if self.jwks is None else self.jwks.generation

    def _principal(self, tenant: str, scopes: frozenset[str]) -> Principal:
        # The limits as the tenants file says now, not when the token was first seen.
        return Principal(tenant, scopes, f"jwt:{tenant}", self.tenants.limits(tenant))

    async def _claims(self, token: str) -> dict[str, Any]:
        config = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("malformed token") from None
        algorithm = header.get("alg")
        key: Any
        if algorithm in SYMMETRIC and config.secret is not None:
            key = config.secret
        elif algorithm in ASYMMETRIC and self.jwks is not None:
            key = (await self.jwks.key(header.get("kid"))).key
        else:
            accepted = (SYMMETRIC if config.secret else ()) + (ASYMMETRIC if self.jwks else ())
            raise TokenRefused(
                f"algorithm {algorithm!r} not accepted; accepted: {', '.join(accepted)}"
            )
        required = (
            ["exp"]
            + ["iss"] * (config.issuer is not None)
            + ["aud"] * (config.audience is not None)
        )
        try:
            return dict(
                jwt.decode(
                    token, key, algorithms=[algorithm], issuer=config.issuer,
                    audience=config.audience, leeway=config.leeway_s,
                    options={"require": required, "verify_aud": config.audience is not None},
                )
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise TokenRefused("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("token not valid yet (nbf)") from None
        except jwt.InvalidIssuerError:
            raise TokenRefused("token from the wrong issuer (iss)") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused("token for another audience (aud)") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise TokenRefused(f"invalid token: {type(exc).__name__}") from None
        except (TypeError, ValueError):  # the header's alg against a key of another type
            raise TokenRefused(
                f"the key {header.get('kid')!s:.64} is not a {algorithm} key"
            ) from None


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    raw = claims.get("scope", claims.get("scp", ""))
    words = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return frozenset(w for w in words if isinstance(w, str) and valid_scope(w))


def jwks_problem(source: str) -> str | None:
    """Why a JWKS URL cannot be trusted (plain http beyond this machine: anyone on the
    way could swap the keys), or None."""
    parsed = urllib.parse.urlsplit(source)
    if parsed.scheme == "http" and not _loopback(parsed.hostname):
        return f"--jwt-jwks {source}: fetch the keys over https (http only from this machine)"
    return None


def _loopback(host: str | None) -> bool:
    return host in ("localhost", "::1") or (host or "").startswith("127.")


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follows a JWKS URL's redirect only to a URL as trusted (`jwks_problem`)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:  # fmt: skip
        if jwks_problem(newurl) is not None:
            raise OSError(f"refused a redirect to {newurl}: not https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)
