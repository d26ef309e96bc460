"""The servers of `sandhub bench agent-relay`, in a process of their own (as
`sandhub serve` runs the Hub): a static AgentDirectoryService standing in for
the Orchestrator, and a Hub relaying ExecService to the agents it names.

    python -m sandhub.bench.agent_relay_server CONTAINER_ID=TARGET...
        (env SANDHUB_ORCHESTRATOR_TOKEN, SANDHUB_BENCH_API_KEY, SANDHUB_BENCH_TENANT)

Prints one JSON line {"hub_port": N} once serving; stops when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import grpc

from sandhub import internal_auth, rpc
from sandhub.internal.v1 import agents_pb2, agents_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2


class StaticDirectory(agents_pb2_grpc.AgentDirectoryServiceServicer):
    """Every container id it knows is RUNNING at one target (any tenant)."""

    def __init__(self, targets: dict[str, str]) -> None:
        self._targets = targets

    async def GetAgentEndpoint(self, request: agents_pb2.GetAgentEndpointRequest,
                               context: rpc.Ctx) -> agents_pb2.GetAgentEndpointResponse:
        target = self._targets.get(request.container_id)
        if target is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown container")
        return agents_pb2.GetAgentEndpointResponse(target=target, backend="local",
                                                   state=orchestrator_pb2.CONTAINER_STATE_RUNNING)


async def serve(targets: dict[str, str], *, token: str, api_key: str, tenant: str) -> None:
    from hub_service.server import start_hub
    from sandhub import logs
    from sandhub.config import HubConfig

    logs.configure(level="warning")
    directory = grpc.aio.server(interceptors=[internal_auth.TokenServerInterceptor(token)])
    agents_pb2_grpc.add_AgentDirectoryServiceServicer_to_server(StaticDirectory(targets), directory)
    port = directory.add_insecure_port("127.0.0.1:0")
    await directory.start()
    hub = await start_hub(HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{port}",
                                    api_keys={api_key: tenant}, orchestrator_token=token))
    print(json.dumps({"hub_port": hub.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes it
    await hub.stop(0)
    await directory.stop(0)


def main(argv: list[str]) -> int:
    targets = dict(arg.split("=", 1) for arg in argv)
    asyncio.run(serve(targets, token=os.environ["SANDHUB_ORCHESTRATOR_TOKEN"],
                      api_key=os.environ["SANDHUB_BENCH_API_KEY"], tenant=os.environ["SANDHUB_BENCH_TENANT"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
