"""wait_until_running on a backend whose create returns PENDING (as a cluster's does)."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from orchestrator_service.containers import ContainerService
from orchestrator_service.model import Container, ContainerSpec, Event, EventType, State, utcnow
from orchestrator_service.validation import RawCreate
from sandhub.config import OrchestratorConfig


class SlowBackend:
    """Containers start PENDING and turn RUNNING a little later, in any order."""

    name = "slow"

    def __init__(self) -> None:
        self.containers: dict[str, Container] = {}
        self.service: ContainerService | None = None

    def validate_image(self, image: str) -> None:
        pass

    async def list(self) -> list[Container]:
        return list(self.containers.values())

    async def get(self, *, container_id: str) -> Container:
        return self.containers[container_id]

    async def create(self, *, spec: ContainerSpec, container_id: str) -> Container:
        c = Container.from_spec(spec, id=container_id, backend=self.name, now=utcnow())
        self.containers[container_id] = c
        asyncio.get_running_loop().call_later(0.01 + len(self.containers) % 7 * 0.003, self._run, container_id)
        return c

    def _run(self, container_id: str) -> None:
        c = self.containers[container_id].with_state(State.RUNNING)
        self.containers[container_id] = c
        assert self.service is not None
        self.service.notify(Event(EventType.MODIFIED, c))


B = TypeVar("B", bound="SlowBackend")


def wired(backend: B, config: OrchestratorConfig | None = None) -> tuple[ContainerService, B]:
    service = ContainerService(config or OrchestratorConfig(backend="slow"))
    backend.service = service
    service.attach(backend)  # type: ignore[arg-type]
    return service, backend


def raw(**kw: object) -> RawCreate:
    base: dict[str, object] = dict(image="", cpu_millicores=0, memory_mib=0, pids=0, disk_mib=0, open_files=0,
                                   env={}, labels={}, ttl_s=0, ports=(), placement="", request_id="")
    base.update(kw)
    return RawCreate(**base)  # type: ignore[arg-type]


async def test_many_waiters_each_get_their_own_container_running() -> None:
    from dataclasses import replace

    from sandhub.config import Limits

    no_rate = OrchestratorConfig(backend="slow", limits=replace(Limits(), create_rate_per_s=0))  # 500 at once
    service, backend = wired(SlowBackend(), no_rate)
    made = await asyncio.gather(*(service.create(raw(), tenant="t", wait_until_running=True) for _ in range(500)))
    assert all(c.state is State.RUNNING for c in made)
    assert len({c.id for c in made}) == 500
    assert service._settling == {}  # nothing left waiting


async def test_concurrent_creates_cannot_pass_the_tenant_quota_together() -> None:
    from dataclasses import replace

    from sandhub.config import Limits
    from sandhub.errors import QuotaExceeded

    config = OrchestratorConfig(backend="slow", limits=replace(Limits(), max_containers_per_tenant=3))
    service, backend = wired(SlowBackend(), config)
    results = await asyncio.gather(*(service.create(raw(), tenant="t", wait_until_running=True) for _ in range(10)),
                                   return_exceptions=True)
    made = [r for r in results if isinstance(r, Container)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(made) == 3 and len(refused) == 7
    other = await service.create(raw(), tenant="u", wait_until_running=True)  # another tenant's own quota
    assert other.state is State.RUNNING


class HeldBackend(SlowBackend):
    """Containers stay PENDING until release() is called."""

    async def create(self, *, spec: ContainerSpec, container_id: str) -> Container:
        c = Container.from_spec(spec, id=container_id, backend=self.name, now=utcnow())
        self.containers[container_id] = c
        return c

    def release(self) -> None:
        for cid, c in list(self.containers.items()):
            if c.state is State.PENDING:
                self._run(cid)


async def test_a_retry_that_asks_to_wait_waits_even_if_the_first_call_did_not() -> None:
    service, backend = wired(HeldBackend())
    first = await service.create(raw(request_id="r1"), tenant="t", wait_until_running=False)
    assert first.state is State.PENDING
    # A first call that waited and gave up (its caller's deadline) leaves it PENDING too.
    gave_up = asyncio.create_task(service.create(raw(request_id="r2"), tenant="t", wait_until_running=True))
    await asyncio.sleep(0.01)
    gave_up.cancel()
    retries = [asyncio.create_task(service.create(raw(request_id=r), tenant="t", wait_until_running=True))
               for r in ("r1", "r1", "r2")]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in retries)  # waiting, not answering PENDING
    backend.release()
    done = await asyncio.gather(*retries)
    assert [c.state for c in done] == [State.RUNNING] * 3
    assert done[0].id == done[1].id == first.id and done[2].id != first.id
    assert len(backend.containers) == 2  # retries made nothing new
    assert service._settling == {}


async def test_nothing_is_left_waiting_when_the_container_settled_before_anyone_looked() -> None:
    service, backend = wired(HeldBackend())
    first = await service.create(raw(request_id="r1"), tenant="t", wait_until_running=False)
    # It turns RUNNING without an event reaching the service (as a cluster's
    # get can run ahead of its watch): a retry that waits finds it at once.
    backend.containers[first.id] = backend.containers[first.id].with_state(State.RUNNING)
    again = await service.create(raw(request_id="r1"), tenant="t", wait_until_running=True)
    assert again.state is State.RUNNING and service._settling == {}


async def test_a_watch_that_fell_behind_ends_unavailable_not_internal() -> None:
    """It raised a bare exception (INTERNAL); a watcher that missed events is
    told to watch again."""
    import grpc
    import pytest

    from orchestrator_service import containers
    from sandhub.errors import SandhubError

    service, backend = wired(SlowBackend())
    made = await service.create(raw(), tenant="t", wait_until_running=True)
    watch = service.watch(tenant="t", label_selector="", send_initial=False, keepalive_s=5)
    first = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0.01)  # subscribed, waiting for an event
    for _ in range(containers.WATCH_QUEUE + 10):  # nobody reads: the queue overflows
        service.notify(Event(EventType.MODIFIED, made))
    await first
    with pytest.raises(SandhubError) as ended:
        for _ in range(containers.WATCH_QUEUE + 10):
            await watch.__anext__()
    assert ended.value.code == grpc.StatusCode.UNAVAILABLE and ended.value.reason == "BACKEND_UNAVAILABLE"
