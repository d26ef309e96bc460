"""Per-tenant budgets: what one tenant may hold at once, and a fair turn at
the server for everyone.

``TenantBudget`` counts one resource (open calls, Watch streams, buffered
bytes) per tenant and in total; what would pass either cap is refused at once
with RESOURCE_EXHAUSTED (QUOTA_EXCEEDED, metadata "limit" naming the config
field) rather than queued. ``FairGate`` lets a few short calls run at once and
admits the waiting ones by tenant in turn, so a tenant with many calls waiting
gets no more turns than one with a single call: another tenant's latency stays
near its idle figure however many calls the first one keeps in flight.

Both live on one event loop and are not thread-safe; nothing here awaits
between a check and its count.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from sandhub.errors import QuotaExceeded


class TenantBudget:
    def __init__(self, *, what: str, per_tenant: int, total: int, tenant_limit: str, total_limit: str) -> None:
        """``what`` names the unit in messages ("Watch streams"); the limits
        name the config fields a refusal reports."""
        self._what = what
        self._per_tenant = per_tenant
        self._total = total
        self._tenant_limit = tenant_limit
        self._total_limit = total_limit
        self._used: dict[str, int] = {}
        self._all = 0

    def used(self, tenant: str) -> int:
        return self._used.get(tenant, 0)

    @property
    def used_total(self) -> int:
        return self._all

    def room(self, tenant: str) -> int:
        """How much the tenant may still take."""
        return max(0, min(self._per_tenant - self.used(tenant), self._total - self._all))

    def take(self, tenant: str, n: int = 1) -> None:
        """Takes ``n`` or raises QuotaExceeded naming the cap in the way."""
        used = self.used(tenant)
        if used + n > self._per_tenant:
            raise QuotaExceeded(f"this tenant already holds {used} {self._what} on this server "
                                f"(at most {self._per_tenant}); finish some first", limit=self._tenant_limit)
        if self._all + n > self._total:
            raise QuotaExceeded(f"this server holds its most {self._what} ({self._total}) for all tenants; "
                                "try again shortly", limit=self._total_limit)
        self._add(tenant, n)

    def take_upto(self, tenant: str, n: int) -> int:
        """Takes as much of ``n`` as there is room for; returns how much."""
        got = min(n, self.room(tenant))
        if got:
            self._add(tenant, got)
        return got

    def give_back(self, tenant: str, n: int) -> None:
        if n <= 0:
            return
        left = self._used[tenant] - n
        assert left >= 0, "gave back more than was taken"
        if left:
            self._used[tenant] = left
        else:
            del self._used[tenant]
        self._all -= n

    def _add(self, tenant: str, n: int) -> None:
        self._used[tenant] = self.used(tenant) + n
        self._all += n

    @contextmanager
    def hold(self, tenant: str, n: int = 1) -> Iterator[None]:
        self.take(tenant, n)
        try:
            yield
        finally:
            self.give_back(tenant, n)


class FairGate:
    """At most ``width`` holders at once, and at most ``per_tenant`` of them
    of one tenant (half the width by default), so a tenant whose calls are
    slow can never hold every turn; waiters are let in one tenant at a time,
    round robin, each tenant's own waiters in arrival order."""

    def __init__(self, width: int, *, per_tenant: int = 0) -> None:
        self._width = width
        self._per_tenant = per_tenant or max(1, width // 2)
        self._running = 0
        self._held: dict[str, int] = {}
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def running(self) -> int:
        return self._running

    @asynccontextmanager
    async def turn(self, tenant: str) -> AsyncIterator[None]:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(turn)
        self._dispatch()
        try:
            await turn  # at once when a turn was free
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(tenant)  # handed a turn just as the caller left: pass it on
            else:
                self._forget(tenant, turn)
            raise
        try:
            yield
        finally:
            self._release(tenant)

    def _release(self, tenant: str) -> None:
        self._running -= 1
        left = self._held[tenant] - 1
        if left:
            self._held[tenant] = left
        else:
            del self._held[tenant]
        self._dispatch()

    def _dispatch(self) -> None:
        """Hands free turns to waiting tenants below their own cap, round robin."""
        served = True
        while served and self._running < self._width:
            served = False
            for tenant in list(self._waiting):
                if self._running >= self._width:
                    return
                if self._held.get(tenant, 0) >= self._per_tenant:
                    continue
                queue = self._waiting[tenant]
                turn = queue.popleft()
                if queue:
                    self._waiting.move_to_end(tenant)
                else:
                    del self._waiting[tenant]
                served = True
                if turn.done():  # its caller left
                    continue
                turn.set_result(None)
                self._running += 1
                self._held[tenant] = self._held.get(tenant, 0) + 1

    def _forget(self, tenant: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is None:
            return
        try:
            queue.remove(turn)
        except ValueError:
            return
        if not queue:
            del self._waiting[tenant]


class CallBudget:
    """Calls one tenant may have running or waiting at once (a TenantBudget),
    run a few at a time in fair turns (a FairGate)."""

    def __init__(self, *, per_tenant: int, total: int, concurrency: int, limit_prefix: str = "") -> None:
        self.count = TenantBudget(what="calls", per_tenant=per_tenant, total=total,
                                  tenant_limit=f"max_{limit_prefix}calls_per_tenant",
                                  total_limit=f"max_{limit_prefix}calls")
        self.gate = FairGate(concurrency)

    @asynccontextmanager
    async def call(self, tenant: str) -> AsyncIterator[None]:
        with self.count.hold(tenant):
            async with self.gate.turn(tenant):
                yield


def watch_budget(*, per_tenant: int, total: int) -> TenantBudget:
    return TenantBudget(what="Watch streams", per_tenant=per_tenant, total=total,
                        tenant_limit="max_watches_per_tenant", total_limit="max_watches")
