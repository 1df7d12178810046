"""How the load generator talks HTTP. Real runs use aiohttp: at 64 concurrent connections
httpx's pool fell to about 90 requests/s against a server that aiohttp drove at about
3,900 on the same machine. Tests use httpx over an in-process ASGI app (virtual time)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import aiohttp
import httpx


class Transport(Protocol):
    """One pool of connections to one server. Errors come back as data, never raised."""

    async def post(self, path: str, body: dict[str, Any]) -> str:
        """POST JSON; the status code as text, or the exception's name when there was none."""
        ...

    async def get(self, path: str) -> tuple[int, str]:
        """GET; (status, body text), or (0, '') when the request failed."""
        ...

    async def patch(self, path: str, body: dict[str, Any]) -> tuple[int, str]: ...


TransportFactory = Callable[[int], AbstractAsyncContextManager[Transport]]
"""`factory(connections)` opens a transport with a pool of that many connections."""


class AiohttpTransport:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def post(self, path: str, body: dict[str, Any]) -> str:
        try:
            async with self._session.post(path, json=body) as response:
                await response.read()
                return str(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__

    async def get(self, path: str) -> tuple[int, str]:
        return await self._request("GET", path, None)

    async def patch(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        return await self._request("PATCH", path, body)

    async def _request(self, method: str, path: str, body: Any) -> tuple[int, str]:
        try:
            async with self._session.request(method, path, json=body) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0, ""


FRESH = {"Cache-Control": "no-cache"}
"""Sent with every request: the load tools measure computing, not a server's result
cache (their texts repeat), so they ask for fresh answers."""


def aiohttp_transports(url: str, timeout_s: float = 120) -> TransportFactory:
    @asynccontextmanager
    async def open_transport(connections: int) -> AsyncIterator[Transport]:
        connector = aiohttp.TCPConnector(limit=connections)
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(
            url, connector=connector, timeout=timeout, headers=FRESH
        ) as session:
            yield AiohttpTransport(session)

    return open_transport


class HttpxTransport:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def post(self, path: str, body: dict[str, Any]) -> str:
        try:
            return str((await self._client.post(path, json=body)).status_code)
        except httpx.HTTPError as exc:
            return type(exc).__name__

    async def get(self, path: str) -> tuple[int, str]:
        try:
            response = await self._client.get(path)
        except httpx.HTTPError:
            return 0, ""
        return response.status_code, response.text

    async def patch(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        try:
            response = await self._client.patch(path, json=body)
        except httpx.HTTPError:
            return 0, ""
        return response.status_code, response.text


def asgi_transports(app: Any) -> TransportFactory:
    """Transports into an ASGI app in this process (no sockets): for tests."""

    @asynccontextmanager
    async def open_transport(connections: int) -> AsyncIterator[Transport]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=FRESH
        ) as client:
            yield HttpxTransport(client)

    return open_transport
