"""The versions a server serves, by model, and which one answers: the traffic split
and shadow shares of `server.routing` applied to the versions ready now; versions
loaded (`add`) and unloaded (`remove`) while the server runs.

This module imports neither torch nor transformers, nor does anything it imports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter

from batcher.models import ImageLimits
from server.cache import ResultCache
from server.client import EngineClient
from server.errors import UnknownModel
from server.imaging import Imaging
from server.routing import Route, RoutePatch, pick, point, shadows, shares
from server.served import Freed, ModelLoader, Served, spec_of
from server.settings import Settings
from server.specs import ModelSpec

logger = logging.getLogger("microbatch.server")


class Versions:
    """Every served version, by key and by model, with each model's route."""

    def __init__(
        self,
        settings: Settings,
        clients: Mapping[str, EngineClient],
        registry: CollectorRegistry,
        cache: ResultCache | None,
        loader: ModelLoader | None,
    ) -> None:
        if not clients:
            raise ValueError("a runtime needs at least one model")
        self._settings = settings
        self._cache = cache
        self.loader = loader
        specs = {spec.key: spec for spec in settings.model_specs()}
        limits = ImageLimits(max_bytes=settings.max_image_bytes,
                             max_pixels=settings.max_image_pixels,
                             url_prefixes=settings.image_url_prefixes())  # fmt: skip
        self.imaging = Imaging(registry, limits, settings.image_threads or None)
        """Decodes requests' images off the loop, for every version."""
        self.models: dict[str, Served] = {
            key: Served(specs.get(key) or spec_of(key), c, settings, cache, imaging=self.imaging)
            for key, c in clients.items()
        }
        """By key (`NAME@VERSION`, or the name of an unversioned model), the default
        first. A lone model handed in unnamed is found by whatever name its encoder has,
        or by none."""
        self._versions: dict[str, dict[str, Served]] = {}
        for served in self.models.values():
            self._versions.setdefault(served.name, {})[served.version] = served
        self._default_name = next(iter(self.models.values())).name
        self.routes: dict[str, Route] = {}
        """Each model's split over its versions, where one was set (`--route`, `PATCH
        /admin/routes`); otherwise its first version takes all of its traffic."""
        self._loads: set[asyncio.Task[None]] = set()
        self.routed = Counter(
            "microbatch_routed_requests",
            "Requests each version answered, by the traffic split or pinned (NAME@VERSION).",
            ["model", "version"],
            registry=registry,
        )
        self._routed: dict[str, Counter] = {}
        """Each version's child of `routed`, looked up once (`labels` takes a lock and
        builds its key)."""
        if settings.route is not None:
            self.set_routes(settings.routes())

    @property
    def default(self) -> Served:
        """The version that answers a request naming no model, by the default model's
        route (its first ready version with the most weight)."""
        return self._primary(self._default_name)

    def _primary(self, name: str) -> Served:
        versions = self._versions[name]
        if len(versions) == 1:  # the common case, on every request's admission check
            return next(iter(versions.values()))
        route = self.route_of(name)
        ready = [v for v, w in sorted(route.weights, key=lambda vw: -vw[1])
                 if w > 0 and v in versions and versions[v].serving]  # fmt: skip
        if ready:
            return versions[ready[0]]
        return next(iter(versions.values()))

    def shares(self, name: str) -> dict[str, float]:
        """Each version's share of the model's requests now (the primary takes all
        while no weighted version is ready)."""
        versions = self._versions[name]
        found = shares(self.route_of(name), {v for v, s in versions.items() if s.serving})
        return found or {self._primary(name).version: 1.0}

    def route_of(self, name: str) -> Route:
        """A model's route: the one set, or all to its first version."""
        route = self.routes.get(name)
        if route is not None:
            return route
        return Route(((next(iter(self._versions[name])), 1),))

    def _group(self, name: str) -> tuple[str, str | None]:
        """The model (and version, for `NAME@VERSION`) a requested name means. Raises
        UnknownModel."""
        group, at, version = name.partition("@")
        if group not in self._versions:
            if len(self._versions) == 1:
                # One model answers to any name its clients know it by (OpenAI clients
                # always send one); several are told apart by their served names.
                group = self._default_name
            else:
                found = [s.name for s in self.models.values() if self._encoder_name(s) == group]
                if not found:
                    raise UnknownModel(name, self.names())
                group = found[0]
        if at and version not in self._versions[group]:
            raise UnknownModel(name, self.names())
        return group, version if at else None

    def model(self, name: str | None) -> Served:
        """The version an operator's `?model=` means: `NAME@VERSION`, or the model's
        primary version (None or "": the default model's). Raises UnknownModel."""
        if not name:
            return self.default
        group, version = self._group(name)
        return self._versions[group][version] if version else self._primary(group)

    def route(self, name: str | None, key: Callable[[], str | None]) -> tuple[Served, list[Served]]:
        """The version that answers a request naming `name` (None: the default model),
        by its route and the request's route key (`key()`, read only where a split
        needs it), and the versions it is mirrored to. Raises UnknownModel."""
        group, version = self._group(name) if name else (self._default_name, None)
        versions = self._versions[group]
        if version is not None:
            served = versions[version]
            self._count(served)
            return served, []
        if len(versions) == 1 and group not in self.routes:
            served = next(iter(versions.values()))
            self._count(served)
            return served, []
        route = self.route_of(group)
        ready = {v for v, s in versions.items() if s.serving}
        chosen = pick(route, ready, point(group, key()))
        served = versions[chosen] if chosen is not None else self._primary(group)
        self._count(served)
        if not route.shadow:
            return served, []
        mirrored = shadows(route, served.version, ready, random.random())
        return served, [versions[v] for v in mirrored]

    def _count(self, served: Served) -> None:
        child = self._routed.get(served.key)
        if child is None:
            child = self._routed[served.key] = self.routed.labels(served.name, served.version)
        child.inc()

    def set_routes(self, patches: Mapping[str, RoutePatch]) -> None:
        """Apply `PATCH /admin/routes` (or `--route`): every model and version must be
        served (or loading). Raises UnknownModel for a model, ValueError for a version;
        nothing changes unless all of it is valid."""
        changed = {}
        for name, patch in patches.items():
            if name not in self._versions:
                raise UnknownModel(name, self.names())
            route = patch.applied_to(self.route_of(name))
            unknown = sorted(route.versions() - set(self._versions[name]))
            if unknown:
                known = ", ".join(self._versions[name])
                raise ValueError(
                    f"{name}: no version {unknown[0]!r} is served or loading; versions: {known}"
                )
            changed[name] = route
        self.routes.update(changed)

    def names(self) -> list[str]:
        """Every served version's name, the default first: its key, or for a lone
        unnamed model, its encoder's name."""
        return [served.key or self._encoder_name(served) or "" for served in self.models.values()]

    @staticmethod
    def _encoder_name(served: Served) -> str | None:
        try:
            return served.encoder.name
        except Exception:  # a front-end still waiting for the engine process, or loading
            return None

    # -- live loading --------------------------------------------------------------------

    def add(self, spec: ModelSpec) -> Served:
        """Start loading `spec` in the background (state `loading`, then `warming`, then
        `ready`). Raises ValueError when its key is served already or the server cannot
        load models live (front-ends of `--workers N`)."""
        if self.loader is None:
            raise ValueError(
                "this server loads no models while it runs: with --workers N the engine "
                "process holds them; start it with every version (--model NAME@VERSION=PATH)"
            )
        if spec.key in self.models:
            raise ValueError(f"{spec.key} is served already; unload it first")
        served = Served(spec, None, self._settings, self._cache, live=True, imaging=self.imaging)
        self.models[spec.key] = served
        self._versions.setdefault(served.name, {})[served.version] = served
        task = asyncio.create_task(self._load(served), name=f"microbatch-load-{spec.key}")
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return served

    async def _load(self, served: Served) -> None:
        assert self.loader is not None
        try:
            client = await self.loader.load(served.spec)
        except Exception as exc:
            logger.warning("loading %s failed: %s: %s", served.key, type(exc).__name__, exc)
            served.error = f"{type(exc).__name__}: {exc}"
            return
        if self.models.get(served.key) is not served:  # unloaded while it loaded
            await self.loader.unload(client)
            return
        served.attach(client)
        logger.info("loaded %s; warming up", served.key)

    def removal_problem(self, served: Served) -> str | None:
        """Why `served` cannot be unloaded now; None when it can."""
        route = self.route_of(served.name)
        if not route.takes_traffic(served.version):
            return None
        rest = route.without(served.version)
        versions = self._versions[served.name]
        if any(w > 0 and versions[v].serving for v, w in rest.weights):
            return None
        return (
            f"{served.key} is the last version of {served.name!r} that takes traffic; "
            f"route its traffic to another ready version first (PATCH /admin/routes)"
        )

    async def remove(self, served: Served) -> Freed | None:
        """Stop routing to `served`, drain its queue, stop it and free its memory
        (None: it had not finished loading). Check `removal_problem` first."""
        assert self.loader is not None
        del self.models[served.key]
        versions = self._versions[served.name]
        del versions[served.version]
        self._routed.pop(served.key, None)
        with contextlib.suppress(KeyError):
            self.routed.remove(served.name, served.version)
        if served.name in self.routes:
            self.routes[served.name] = self.routes[served.name].without(served.version)
        if not served.loaded:
            await served.aclose()
            return None
        # No request chooses it now; those that had (tokenizing, say) finish first, so
        # that none meets a closed engine. Then its queue drains.
        if not await served.idle(self._settings.drain_timeout_s):
            logger.warning("unloading %s: %d requests still under way after %gs",
                           served.key, served.calls, self._settings.drain_timeout_s)  # fmt: skip
        await served.aclose()
        logger.info("unloading %s: draining its queue", served.key)
        return await self.loader.unload(served.detach())

    async def cancel_loads(self) -> None:
        """Stop the loads under way (the server is stopping)."""
        for task in list(self._loads):
            task.cancel()
        await asyncio.gather(*self._loads, return_exceptions=True)
