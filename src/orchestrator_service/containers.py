"""The domain: container lifecycle on top of one backend, scoped by tenant.

Holds no state of its own beyond live subscriptions: every answer comes from the
backend, so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import structlog

from orchestrator_service.backends.base import Backend
from orchestrator_service.model import (CREATE_INTERRUPTED, Container, ContainerSpec, Event, EventType, Page, State,
                                        new_container_id, utcnow)
from orchestrator_service.rate import TokenBuckets
from sandhub.pagination import page_size, paginate
from orchestrator_service.selector import Selector, parse_selector
from orchestrator_service.validation import RawCreate, build_spec, check_ttl
from sandhub.config import OrchestratorConfig
from sandhub.container_ids import check_container_id
from sandhub.errors import (BackendUnavailable, ContainerNotFound, ContainerNotRunning, InvalidField, InvalidPageToken,
                            QuotaExceeded, RateLimited)

log = structlog.get_logger("sandhub.orchestrator")

MAX_PAGE_TOKEN = 512
"""Longest page token accepted (ours are under 200 characters): a bigger one
is refused before it is decoded."""
WATCH_QUEUE = 1024
"""Events buffered per watcher; a watcher that falls further behind is closed
(it re-watches with send_initial) rather than growing memory without bound."""


class WatchOverflow(BackendUnavailable):
    """The watcher fell behind and events were dropped: its picture can no
    longer be trusted. UNAVAILABLE (it was INTERNAL): watch again with send_initial."""

    def __init__(self) -> None:
        super().__init__("this watch fell behind and missed events; watch again with send_initial to resync")


@dataclass(frozen=True)
class Synced:
    """Marks the end of a watch's initial listing."""


@dataclass(frozen=True)
class Keepalive:
    pass


WatchItem = Event | Synced | Keepalive


class _Subscription:
    def __init__(self, tenant: str | None, selector: Selector) -> None:
        self.tenant = tenant
        self.selector = selector
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(WATCH_QUEUE)
        self.overflowed = False

    def offer(self, event: Event) -> None:
        c = event.container
        if self.tenant is not None and c.tenant != self.tenant:
            return
        if not self.selector.matches(c.labels):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True


def _interrupted(existing: Container, spec: ContainerSpec) -> bool:
    """True for a create the orchestrator stopped in the middle of (see
    CREATE_INTERRUPTED), retried with the same spec; a retry asking for
    something else gets the FAILED container, as any retry gets what its
    request_id made."""
    return (existing.state is State.FAILED and existing.state_reason == CREATE_INTERRUPTED
            and (existing.image, existing.resources, existing.env, existing.labels, existing.ports, existing.placement)
            == (spec.image, spec.resources, spec.env, spec.labels, spec.ports, spec.placement))


class ContainerService:
    def __init__(self, config: OrchestratorConfig) -> None:
        self._config = config
        self._limits = config.limits
        self._subs: dict[str | None, set[_Subscription]] = {}
        """Live watches by tenant (None: the operator's, which see every
        tenant): an event visits only its own tenant's watches, so another
        tenant's many watches cost it nothing (and the Watch budget bounds a
        tenant's own)."""
        self._settling: dict[str, asyncio.Future[Container]] = {}
        """Containers a create call waits on (wait_until_running), by id."""
        self._starting: dict[str, set[str]] = {}
        """Ids of the creates in progress, per tenant (for the quota). A backend
        may list such a container already (PENDING) or not yet: counted as a
        set with what it lists, each is counted once either way."""
        self._create_rate = TokenBuckets(rate_per_s=self._limits.create_rate_per_s, burst=self._limits.create_burst)
        self._create_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.backend: Backend | None = None

    # -- wiring ---------------------------------------------------------------

    def attach(self, backend: Backend) -> None:
        self.backend = backend

    def notify(self, event: Event) -> None:
        """Backends call this after every change."""
        for key in (event.container.tenant, None):
            for sub in self._subs.get(key, ()):
                sub.offer(event)
        settled = self._settling.get(event.container.id)
        if settled is not None and event.container.state is not State.PENDING:
            if not settled.done():
                settled.set_result(event.container)
            del self._settling[event.container.id]

    @property
    def _backend(self) -> Backend:
        assert self.backend is not None, "ContainerService.attach() was not called"
        return self.backend

    async def start(self) -> None:
        await self._backend.start()
        self._reaper = asyncio.create_task(self._reap_forever(), name="reaper")

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for subs in self._subs.values():
            for sub in subs:
                sub.queue.put_nowait(None) if not sub.queue.full() else None
        await self._backend.close()

    # -- lifecycle --------------------------------------------------------------

    async def create(self, raw: RawCreate, *, tenant: str, wait_until_running: bool) -> Container:
        spec = build_spec(
            raw,
            tenant=tenant,
            limits=self._limits,
            placements=self._config.placements,
            default_image=self._default_image(),
        )
        self._backend.validate_image(spec.image)
        lock_key = (tenant, spec.request_id)
        lock = self._create_locks.setdefault(lock_key, asyncio.Lock()) if spec.request_id else None
        async with lock or contextlib.nullcontext():
            try:
                existing = await self._by_request_id(tenant, spec.request_id)
                if existing is not None and _interrupted(existing, spec):
                    # The orchestrator stopped mid-create and cleaned it up on
                    # restart: this retry starts it again, as a new container
                    # (a FAILED one never comes back; its record goes).
                    await self._backend.forget(container_id=existing.id)
                    log.info("container.create_restarted", container_id=existing.id, tenant=tenant,
                             request_id=spec.request_id)
                    existing = None
                if existing is not None:
                    # A retry: the first call may have given up (or not waited)
                    # while it was PENDING; this one waits if it asked to.
                    if wait_until_running and existing.state is State.PENDING:
                        return await self._wait_settled(existing.id)
                    return existing
                self._take_create_token(tenant)
                held = await self._held(tenant)
                # Creates still on their way count too (checked and counted with no
                # await in between): otherwise concurrent creates all pass the check.
                starting = self._starting.setdefault(tenant, set())
                count = len(held) + sum(1 for cid in starting if cid not in held)
                if count >= self._limits.max_containers_per_tenant:
                    if not starting:
                        del self._starting[tenant]
                    raise QuotaExceeded(
                        f"tenant already holds {count} containers (failed ones count until deleted), "
                        f"the most it may; delete some first",
                        limit="max_containers_per_tenant",
                    )
                container_id = new_container_id()
                starting.add(container_id)
                if wait_until_running:
                    self._settle_future(container_id)  # before create: the backend may settle it meanwhile
                try:
                    # Shielded: a caller that gives up mid-create must not leave
                    # a half-made container; it finishes, and a retry with the
                    # same request_id finds it.
                    container = await asyncio.shield(
                        asyncio.ensure_future(self._backend.create(spec=spec, container_id=container_id))
                    )
                    log.info("container.created", container_id=container.id, tenant=tenant,
                             backend=container.backend, image=spec.image, state=container.state.value)
                    if wait_until_running and container.state is State.PENDING:
                        container = await self._wait_settled(container.id)
                finally:
                    self._settling.pop(container_id, None)
                    starting.discard(container_id)
                    if not starting and self._starting.get(tenant) is starting:
                        del self._starting[tenant]
                return container
            finally:
                if lock is not None:
                    self._create_locks.pop(lock_key, None)

    def _take_create_token(self, tenant: str) -> None:
        wait_s = self._create_rate.take(tenant)
        if wait_s > 0:
            raise RateLimited(
                f"creating containers faster than {self._limits.create_rate_per_s:g} a second "
                f"(after a burst of {self._limits.create_burst}); retry in {wait_s:.2f}s",
                limit="create_rate_per_s",
                retry_after_s=wait_s,
            )

    async def _held(self, tenant: str) -> set[str]:
        """Ids of the tenant's containers that count toward its quota: all but
        TERMINATED ones (TERMINATING holds its resources until they are gone; a
        FAILED one may still hold a pod or task, and is cleared by a delete or
        when its tombstone expires)."""
        return {c.id for c in await self._backend.list() if c.tenant == tenant and c.state is not State.TERMINATED}

    def _default_image(self) -> str:
        return self._config.local.default_image if self._config.backend == "local" else ""

    async def _by_request_id(self, tenant: str, request_id: str) -> Container | None:
        if not request_id:
            return None
        for c in await self._backend.list():
            if c.tenant == tenant and c.request_id == request_id:
                return c
        return None

    def _settle_future(self, container_id: str) -> asyncio.Future[Container]:
        """The future notify resolves when the container leaves PENDING (and
        then forgets); one per container, shared by everyone waiting on it."""
        settled = self._settling.get(container_id)
        if settled is None or settled.done():
            settled = self._settling[container_id] = asyncio.get_running_loop().create_future()
        return settled

    async def _wait_settled(self, container_id: str) -> Container:
        """Waits until the container leaves PENDING (one future per container,
        resolved by notify: no queue to overflow however many wait)."""
        settled = self._settle_future(container_id)
        # The backend may have finished before we looked: check once, then wait.
        try:
            current = await self._backend.get(container_id=container_id)
        except Exception as e:  # gone: so it is for anyone waiting with us
            self._settle(container_id, settled, error=e)
            raise
        if current.state is not State.PENDING:
            # Settled before we looked (or before its event came): so it is
            # for anyone waiting with us, and notify may never resolve it.
            self._settle(container_id, settled, result=current)
            return current
        # Shielded: one waiter giving up must not cancel the others' future.
        return await asyncio.shield(settled)

    def _settle(self, container_id: str, settled: asyncio.Future[Container], *,
                result: Container | None = None, error: Exception | None = None) -> None:
        if not settled.done():
            if error is not None:
                settled.set_exception(error)
                settled.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            else:
                assert result is not None
                settled.set_result(result)
        if self._settling.get(container_id) is settled:
            del self._settling[container_id]

    async def get(self, container_id: str, *, tenant: str | None) -> Container:
        check_container_id(container_id)
        container = await self._backend.get(container_id=container_id)
        if tenant is not None and container.tenant != tenant:
            raise ContainerNotFound(container_id)
        return container

    async def agent_endpoint(self, container_id: str, *, tenant: str | None) -> tuple[Container, str]:
        """The container and its agent's gRPC target; RUNNING containers only
        (ContainerNotRunning otherwise), NotSupported from a backend without one."""
        container = await self.get(container_id, tenant=tenant)
        if container.state is not State.RUNNING:
            raise ContainerNotRunning(container_id, container.state.value)
        return container, self._backend.agent_target(container)

    @property
    def backend_name(self) -> str:
        return self._backend.name

    async def list(
        self, *, tenant: str | None, label_selector: str, state: State | None, size: int, token: str
    ) -> Page:
        selector = parse_selector(label_selector)
        n = page_size(size)
        if len(token) > MAX_PAGE_TOKEN:
            raise InvalidPageToken()
        query = f"{tenant}|{label_selector}|{state.value if state else ''}"
        wanted = [
            c
            for c in await self._backend.list()
            if (tenant is None or c.tenant == tenant)
            and (c.state is state if state else c.state is not State.TERMINATED)
            and selector.matches(c.labels)
        ]
        items, next_token = paginate(
            wanted, key=lambda c: (c.create_time.isoformat(), c.id), size=n, token=token, query=query
        )
        return Page(containers=items, next_page_token=next_token)

    async def delete(self, container_id: str, *, tenant: str | None, grace_period_s: float, reason: str = "Deleted") -> Container:
        await self.get(container_id, tenant=tenant)
        if grace_period_s < 0 or grace_period_s > 300:
            raise InvalidField("grace_period", "must be between 0 and 300 seconds")
        container = await self._backend.delete(container_id=container_id, grace_period_s=grace_period_s, reason=reason)
        log.info("container.deleted", container_id=container_id, tenant=container.tenant, reason=reason)
        return container

    async def extend(self, container_id: str, *, tenant: str | None, extend_by_s: float) -> Container:
        container = await self.get(container_id, tenant=tenant)
        by = check_ttl("extend_by", extend_by_s, self._limits, default=None)
        if not container.state.alive:
            raise ContainerNotRunning(container_id, container.state.value)
        now = utcnow()
        new_expiry = max(container.expire_time, now) + timedelta(seconds=by)
        if new_expiry - now > timedelta(seconds=self._limits.max_ttl_s):
            raise InvalidField(
                "extend_by",
                f"the container would live {(new_expiry - now).total_seconds():.0f}s from now, "
                f"over the maximum of {self._limits.max_ttl_s:g}s",
            )
        return await self._backend.set_expiry(container_id=container_id, expire_time=new_expiry)

    async def watch(self, *, tenant: str | None, label_selector: str, send_initial: bool, keepalive_s: float = 15.0) -> AsyncIterator[WatchItem]:
        selector = parse_selector(label_selector)
        sub = _Subscription(tenant, selector)
        self._subs.setdefault(tenant, set()).add(sub)  # subscribe first so nothing between list and live is lost
        try:
            if send_initial:
                for c in sorted(await self._backend.list(), key=lambda c: (c.create_time, c.id)):
                    if (tenant is None or c.tenant == tenant) and selector.matches(c.labels) and c.state is not State.TERMINATED:
                        yield Event(EventType.ADDED, c)
                yield Synced()
            while True:
                try:
                    event = await asyncio.wait_for(sub.queue.get(), keepalive_s)
                except TimeoutError:
                    yield Keepalive()
                    continue
                if event is None:
                    return
                yield event
                if sub.overflowed and sub.queue.empty():
                    raise WatchOverflow()
        finally:
            subs = self._subs.get(tenant, set())
            subs.discard(sub)
            if not subs:
                self._subs.pop(tenant, None)

    # -- expiry -------------------------------------------------------------------

    async def reap_once(self) -> int:
        """Deletes expired containers and forgets old tombstones; returns how
        many it deleted. One container that can't be deleted or forgotten
        now is logged and tried again next round; it never holds up the rest."""
        now = utcnow()
        tombstone = timedelta(seconds=self._config.tombstone_s)
        reaped = 0
        for c in await self._backend.list():
            try:
                if c.state.alive and c.expire_time <= now:
                    await self._backend.delete(container_id=c.id, grace_period_s=0, reason="Expired")
                    reaped += 1
                    log.info("container.expired", container_id=c.id, tenant=c.tenant)
                elif c.state in (State.TERMINATED, State.FAILED) and c.end_time and c.end_time + tombstone <= now:
                    await self._backend.forget(container_id=c.id)
            except ContainerNotFound:
                pass
            except Exception:  # e.g. a full state disk or a bug: the next container still goes
                log.exception("reaper.container_failed", container_id=c.id, state=c.state.value)
        return reaped

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.reap_interval_s)
            try:
                await self.reap_once()
            except Exception:
                log.exception("reaper.failed")
