"""A bound on the exec calls one tenant has open at once on this Hub.

Every Run, Exec, file transfer and attach holds a process or a stream; without
a bound one tenant could open enough of them to starve the others. Over the
bound a call fails at once with RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) rather
than queueing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sandhub.errors import QuotaExceeded


class TenantSlots:
    def __init__(self, per_tenant: int) -> None:
        self._per_tenant = per_tenant
        self._open: dict[str, int] = {}

    @contextmanager
    def take(self, tenant: str) -> Iterator[None]:
        used = self._open.get(tenant, 0)
        if used >= self._per_tenant:
            raise QuotaExceeded(f"{used} exec calls are already open for this tenant on this Hub; "
                                "finish some first", limit="max_exec_calls_per_tenant")
        self._open[tenant] = used + 1
        try:
            yield
        finally:
            left = self._open[tenant] - 1
            if left:
                self._open[tenant] = left
            else:
                del self._open[tenant]

    def open_calls(self, tenant: str) -> int:
        return self._open.get(tenant, 0)
