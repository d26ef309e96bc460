"""What one tenant may hold on this Hub at once (see sandhub.budget): short
calls (in fair turns), exec calls, Watch streams and Run output in memory."""

from __future__ import annotations

from dataclasses import dataclass

from sandhub.budget import CallBudget, TenantBudget, watch_budget
from sandhub.config import HubConfig


@dataclass
class HubBudgets:
    calls: CallBudget
    """Every OrchestratorService call but Watch, and the unary process calls."""
    exec_calls: TenantBudget
    """Run, Exec, PutFiles, GetFiles and AttachProcess: each holds a process or a stream."""
    watches: TenantBudget
    output: TenantBudget
    """Bytes of agent replies held in memory: Run output and process-call replies
    (see hub_service.exec.agent_servicer.HeldReply)."""

    @classmethod
    def from_config(cls, config: HubConfig) -> HubBudgets:
        limits = config.exec
        return cls(
            calls=CallBudget(per_tenant=config.max_calls_per_tenant, total=config.max_calls,
                             concurrency=config.call_concurrency),
            exec_calls=TenantBudget(what="exec calls", per_tenant=limits.max_calls_per_tenant,
                                    total=limits.max_calls, tenant_limit="max_exec_calls_per_tenant",
                                    total_limit="max_exec_calls"),
            watches=watch_budget(per_tenant=config.max_watches_per_tenant, total=config.max_watches),
            output=TenantBudget(what="bytes of Run output", per_tenant=limits.max_held_output_bytes_per_tenant,
                                total=limits.max_held_output_bytes,
                                tenant_limit="max_held_output_bytes_per_tenant",
                                total_limit="max_held_output_bytes"),
        )
