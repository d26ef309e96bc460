"""The per-tenant container quota and create rate of ContainerService, on fake
backends (the hostile-tenant module runs the same against real servers)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest
from google.rpc import error_details_pb2

from orchestrator_service.containers import ContainerService
from orchestrator_service.model import Container, ContainerSpec, State, utcnow
from orchestrator_service.rate import TokenBuckets
from sandhub.config import Limits, OrchestratorConfig
from sandhub.errors import QuotaExceeded, RateLimited
from sandhub.rpc import error_status
from tests.unit.test_create_wait import SlowBackend, raw, wired


def config(**limits: object) -> OrchestratorConfig:
    return OrchestratorConfig(backend="slow", limits=replace(Limits(), **limits))  # type: ignore[arg-type]


class RecordsThenStarts(SlowBackend):
    """Like the local backend: the container is listed PENDING as soon as
    create begins, and create returns only once it runs."""

    async def create(self, *, spec: ContainerSpec, container_id: str) -> Container:
        self.containers[container_id] = Container.from_spec(spec, id=container_id, backend=self.name, now=utcnow())
        await asyncio.sleep(0.3)  # far longer than the test's steps, however slow the machine
        c = self.containers[container_id] = self.containers[container_id].with_state(State.RUNNING)
        return c


class FailsToStart(SlowBackend):
    """Every create ends FAILED (an image that can't start, a host out of addresses)."""

    async def create(self, *, spec: ContainerSpec, container_id: str) -> Container:
        c = Container.from_spec(spec, id=container_id, backend=self.name, now=utcnow())
        c = self.containers[container_id] = c.with_state(State.FAILED, reason="StartFailed", message="no")
        return c

    async def delete(self, *, container_id: str, grace_period_s: float, reason: str) -> Container:
        c = self.containers[container_id] = self.containers[container_id].with_state(State.TERMINATED, reason=reason)
        return c


async def test_a_container_being_started_counts_once() -> None:
    service, backend = wired(RecordsThenStarts(), config(max_containers_per_tenant=3))
    tasks = []
    for _ in range(3):  # each starts while the earlier ones are listed PENDING and still being created
        tasks.append(asyncio.ensure_future(service.create(raw(), tenant="t", wait_until_running=False)))
        await asyncio.sleep(0.002)
    assert all(c.state is State.PENDING for c in backend.containers.values()) and len(backend.containers) == 3
    made = await asyncio.gather(*tasks)
    assert [c.state for c in made] == [State.RUNNING] * 3  # all three fit: none counted twice
    with pytest.raises(QuotaExceeded):
        await service.create(raw(), tenant="t", wait_until_running=False)
    assert service._starting == {}


async def test_failed_creates_count_until_deleted() -> None:
    service, backend = wired(FailsToStart(), config(max_containers_per_tenant=3))
    results = [await service.create(raw(), tenant="t", wait_until_running=True) for _ in range(3)]
    assert all(c.state is State.FAILED for c in results)
    for _ in range(5):
        with pytest.raises(QuotaExceeded) as e:
            await service.create(raw(), tenant="t", wait_until_running=True)
        assert e.value.metadata["limit"] == "max_containers_per_tenant"
    held = [c for c in backend.containers.values() if c.tenant == "t"]
    assert len(held) == 3  # the limit held although every create failed
    other = await service.create(raw(), tenant="u", wait_until_running=True)  # another tenant's own quota
    assert other.tenant == "u"
    await service.delete(results[0].id, tenant="t", grace_period_s=0)  # deleting a failed one frees its place
    await service.create(raw(), tenant="t", wait_until_running=True)


async def test_terminating_containers_count() -> None:
    service, backend = wired(RecordsThenStarts(), config(max_containers_per_tenant=2))
    first = await service.create(raw(), tenant="t", wait_until_running=False)
    await service.create(raw(), tenant="t", wait_until_running=False)
    backend.containers[first.id] = first.with_state(State.TERMINATING)  # its resources are not gone yet
    with pytest.raises(QuotaExceeded):
        await service.create(raw(), tenant="t", wait_until_running=False)
    backend.containers[first.id] = first.with_state(State.TERMINATED)
    await service.create(raw(), tenant="t", wait_until_running=False)


async def test_create_rate_is_per_tenant_with_retry_advice() -> None:
    service, backend = wired(SlowBackend(), config(create_rate_per_s=1.0, create_burst=5))
    for _ in range(5):
        await service.create(raw(), tenant="t", wait_until_running=False)
    with pytest.raises(RateLimited) as e:
        await service.create(raw(), tenant="t", wait_until_running=False)
    err = e.value
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "RATE_LIMITED"
    assert err.metadata["limit"] == "create_rate_per_s"
    assert 0 < float(err.metadata["retry_after_s"]) <= 1.0
    assert len(backend.containers) == 5  # refused before anything was made
    await service.create(raw(), tenant="u", wait_until_running=False)  # another tenant's own bucket
    # A retry of a create that was made (same request id) is not a new create.
    made = await service.create(raw(request_id="r"), tenant="v", wait_until_running=False)
    for _ in range(10):
        assert (await service.create(raw(request_id="r"), tenant="v", wait_until_running=False)).id == made.id
    # On the wire: ErrorInfo plus the standard RetryInfo.
    status = error_status(err)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    from google.rpc import status_pb2

    retry = [d for d in status_pb2.Status.FromString(details).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry) == 1
    info = error_details_pb2.RetryInfo()
    retry[0].Unpack(info)
    assert 0 < info.retry_delay.ToTimedelta().total_seconds() <= 1.0


def test_token_buckets() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0] * 3
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # keys are independent
    now[0] = 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") == pytest.approx(0.5)
    now[0] = 100.0  # refills up to the burst, not beyond
    assert [buckets.take("a") for _ in range(3)] == [0.0] * 3 and buckets.take("a") > 0
    assert TokenBuckets(rate_per_s=0, burst=1).take("x") == 0.0  # 0: no limit
    with pytest.raises(ValueError):
        TokenBuckets(rate_per_s=-1, burst=1)


def test_idle_buckets_are_forgotten() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate_per_s=1.0, burst=1, clock=lambda: now[0])
    for i in range(5000):
        buckets.take(f"t{i}")
        now[0] += 0.01
    assert len(buckets) <= 1024 + 200  # full (idle) ones are dropped as new keys come
