"""Every model one process serves, on the engine side: their hosts (`server.host`), the
device scheduler they share, and loading and unloading versions while the server runs
(`POST` and `DELETE /admin/models`, through `server.runtime.ModelLoader`).

Only this side imports torch and transformers (through `batcher.models`)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry

from batcher import DeviceScheduler
from batcher.models import (
    GiB,
    footprint,
    free_memory,
    give_back_memory,
    memory_in_use,
    resolve_device,
)
from server.client import EngineClient
from server.host import EngineHost, LocalClient, ServedModel
from server.served import Freed, spec_of
from server.settings import Settings
from server.specs import ModelSpec

logger = logging.getLogger("microbatch.server")


class Fleet:
    """The engine hosts of this process, one per served version. While there are
    several, their engines share the devices through one `DeviceScheduler`; a lone
    engine runs without one (and so keeps preparing its next batch while one runs)."""

    def __init__(
        self, settings: Settings, registry: CollectorRegistry, latencies: deque[float]
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._latencies = latencies
        self._scheduler: DeviceScheduler | None = None
        self._warm_lock = asyncio.Lock()
        """Held while a model warms: warm-ups take turns, torch.compile is not made for
        parallel tracing."""
        self.hosts: list[EngineHost] = []

    async def start(
        self, model: ServedModel | Sequence[ServedModel] | Mapping[str, ServedModel] | None = None
    ) -> dict[str, LocalClient]:
        """Every model `settings` names (or `model`: one, its replicas, or several by
        served key, `NAME@VERSION`), loaded one after the other, each warming in turn in
        the background. By served key, the default first ("" for a lone model served
        under its own name). A failed load closes those loaded before it."""
        specs = self.settings.model_specs()
        if isinstance(model, Mapping):
            return await self._start_all({key: spec_of(key) for key in model}, model)
        if model is not None or len(specs) == 1:
            host = await EngineHost.load(self.settings, self.registry, model, self._latencies,
                                         spec=specs[0], warm_lock=self._warm_lock)  # fmt: skip
            self.hosts.append(host)
            return {specs[0].key: LocalClient(host)}
        return await self._start_all({spec.key: spec for spec in specs})

    async def _start_all(
        self, specs: Mapping[str, ModelSpec], models: Mapping[str, ServedModel] | None = None
    ) -> dict[str, LocalClient]:
        self._scheduler = DeviceScheduler(len(self.settings.device_list()))
        clients: dict[str, LocalClient] = {}
        try:
            for key, spec in specs.items():
                given = None if models is None else models[key]
                clients[key] = await self.load(spec, given)
        except BaseException:
            for client in clients.values():
                await client.aclose()
            raise
        return clients

    async def load(self, spec: ModelSpec, model: ServedModel | None = None) -> LocalClient:
        """Load `spec` and start warming it. From a second engine on, they all share the
        devices. Raises ValueError when it does not fit the memory its devices have
        free now, and what a load raises (ModelLoadError, ValueError)."""
        if (
            model is None
            and self.hosts
            and (problem := await asyncio.to_thread(self._memory_problem, spec))
        ):
            raise ValueError(problem)
        if self.hosts and self._scheduler is None:
            self._scheduler = DeviceScheduler(len(self.settings.device_list()))
            for host in self.hosts:
                host.share = self._scheduler.join(host.name)
                host.engine.join(host.share)
        share = self._scheduler.join(spec.key) if self._scheduler is not None else None
        # Request latencies are the server's (the middleware does not know the model):
        # the first model's timeline shows them.
        latencies = self._latencies if not self.hosts else None
        host = await EngineHost.load(self.settings, self.registry, model, latencies,
                                     spec=spec, share=share, warm_lock=self._warm_lock)  # fmt: skip
        self.hosts.append(host)
        return LocalClient(host)

    def _memory_problem(self, spec: ModelSpec) -> str | None:
        """Why `spec` would not fit on its devices beside what they hold now (its
        weights at the served precision plus one largest batch's activations, as the
        start-up check sizes it); None when it fits or cannot be sized."""
        settings = self.settings
        for device in dict.fromkeys(settings.device_list()):
            resolved = resolve_device(device)
            have = free_memory(resolved)
            options = settings.load_options(resolved, spec)
            found = footprint(options, settings.max_batch_size, resolved)
            if have is not None and found is not None and found.total_bytes > have:
                return (
                    f"{spec.key} needs {found.describe()} on {resolved}, which has "
                    f"{have / GiB:.2f} GiB free; unload a version first"
                )
        return None

    async def unload(self, client: EngineClient) -> Freed:
        """Drain `client`'s queue (every admitted item is answered), stop its device
        threads, remove its metrics, and free its memory: the figure is measured before
        and after. The last other engine then runs without the scheduler again."""
        assert isinstance(client, LocalClient)
        host = client.host
        devices = host.devices()
        before, measure = memory_in_use(devices)
        await host.aclose()
        host.engine.metrics.forget()
        self.hosts.remove(host)
        if self._scheduler is not None and host.share is not None:
            self._scheduler.leave(host.share)
        if len(self.hosts) == 1 and self._scheduler is not None:
            last = self.hosts[0]
            last.engine.join(None)
            last.share = None
            self._scheduler = None
        del client, host
        give_back_memory(devices)
        after, _ = memory_in_use(devices)
        freed = Freed(max(0, before - after), measure)
        logger.info("unloaded: %.1f MiB freed (%s)", freed.bytes / 2**20, measure)
        return freed
