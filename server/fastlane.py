"""The inference routes without FastAPI's routing layers.

A POST to `/predict`, `/v1/embeddings`, `/embed` and the other inference routes is
answered by calling the route's function directly, innermost of our middleware. Those
functions take only the request and read their body themselves (`server.routes.parsing`),
so FastAPI has nothing to solve for them; what it would add per request is its router's
walk over every route, the request-response wrapper with its exit stacks, and Starlette's
exception middleware: a third of a front-end's CPU per request with a model that costs
nothing (benchmarks/results/overhead-cpu-2core-2026-12-02-fast-lane.md).

What the routes rely on stays where it was: ids, timing, size and type checks, CORS, keys
and the early 429 are the middleware outside this one, and an exception the route raises
goes to the same handler FastAPI would pick (`server.errors`), by the exception's class
hierarchy. Everything else (other methods, other paths, a trailing slash) goes through
FastAPI as before, and the routes stay registered there for the OpenAPI schema; a POST
under the fixed start of a lane route with parameters (`/v2/models/`) that matches none
of them goes to FastAPI's router from the lane, past FastAPI's outer layers.

`LaneApp` is the other half: the app's entrance hands those requests to the outermost of
our middleware directly, past FastAPI's and Starlette's outer layers, which have nothing
to do for them.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


def direct_routes(routes: Iterable[Any]) -> dict[str, APIRoute]:
    """The POST routes whose function takes only the request: the ones this lane can
    call without FastAPI solving anything for them (a path's parameters, such as the
    Open Inference Protocol's model name, are matched here as Starlette matches them)."""
    direct = {}
    for route in routes:
        if not isinstance(route, APIRoute) or route.methods != {"POST"}:
            continue
        parameters = list(inspect.signature(route.endpoint).parameters.values())
        if len(parameters) == 1 and parameters[0].annotation in (Request, "Request"):
            direct[route.path] = route
    return direct


class FastLane:
    """Pure ASGI: answers a POST to one of `routes` by awaiting its function, turning an
    exception into a reply through `handlers` (the app's `exception_handlers`, read at
    each call, so handlers registered later count); passes everything else to `app`.
    An exception without a handler propagates, as through FastAPI."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, APIRoute],
        handlers: Mapping[Any, Callable[..., Any]],
    ) -> None:
        self.app = app
        self.routes = {path: r for path, r in routes.items() if "{" not in path}
        self.templated = [r for path, r in routes.items() if "{" in path]
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.get(scope["path"])
            if route is None and self.templated:
                route = self._templated(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # as Starlette's router sets it: the duration metric's label
        scope["endpoint"] = route.endpoint
        request = Request(scope, receive, send)
        endpoint: Endpoint = route.endpoint
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _templated(self, scope: Scope) -> APIRoute | None:
        """The route of a path with parameters, which it sets as `path_params`."""
        for route in self.templated:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope["path_params"] = child["path_params"]
                return route
        return None

    def _handler(self, exc: Exception) -> Handler | None:
        """The handler of the nearest class in `exc`'s hierarchy, as Starlette looks it
        up."""
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None


class LaneApp(FastAPI):
    """FastAPI whose entrance hands a request for the lane (a POST to one of the paths
    given to `add_fast_lane`, or under the fixed start of one with parameters) to the
    outermost of the app's own middleware, as if FastAPI had passed it there. What that
    skips per request: `FastAPI.__call__`'s checks (its telemetry switch reads
    `os.environ`), Starlette's `ServerErrorMiddleware` and its wrapper of every `send`,
    and FastAPI's body-limit and exception-telemetry layers; 6 % of a front-end's CPU with
    a model that costs nothing.

    What they did for these requests, the app's middleware does already: our outermost
    (`RequestContextMiddleware`) answers an unhandled exception with a 500 of its own, and
    limits bodies. FastAPI's own OpenTelemetry instrumentation does not see lane requests.
    Everything else (other requests, lifespan, an app with a `root_path` or without a
    lane) takes FastAPI's way.

    The entrance is the very instance Starlette builds of the outermost middleware: while
    the stack is built, that middleware's class is wrapped by a factory that keeps what
    it makes."""

    _entrance: ASGIApp | None = None
    _lane_paths: frozenset[str] = frozenset()
    _lane_prefixes: tuple[str, ...] = ()

    def add_fast_lane(self, routes: Mapping[str, APIRoute]) -> None:
        """Add `FastLane` for `routes` as the innermost middleware added so far (add it
        before the others), with this app's exception handlers."""
        self.add_middleware(FastLane, routes=routes, handlers=self.exception_handlers)
        self._lane_paths = frozenset(p for p in routes if "{" not in p)
        prefixes = {p.split("{", 1)[0] for p in routes if "{" in p}
        if any(len(prefix) < 2 for prefix in prefixes):  # "/" would take every POST
            raise ValueError(f"a lane route with parameters needs a fixed start: {prefixes}")
        self._lane_prefixes = tuple(prefixes)

    def build_middleware_stack(self) -> ASGIApp:
        self._entrance = None
        if self.root_path or not self._lane_paths or not self.user_middleware:
            return super().build_middleware_stack()
        outermost = self.user_middleware[0]

        def build(app: ASGIApp, *args: Any, **kwargs: Any) -> ASGIApp:
            self._entrance = outermost.cls(app, *args, **kwargs)
            return self._entrance

        self.user_middleware[0] = Middleware(build, *outermost.args, **outermost.kwargs)
        try:
            return super().build_middleware_stack()
        finally:
            self.user_middleware[0] = outermost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        door = self._entrance
        if (
            door is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and (scope["path"] in self._lane_paths or scope["path"].startswith(self._lane_prefixes))
        ):
            scope["app"] = self  # as Starlette sets it: `request.app`
            await door(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
