"""The Hub's ExecService on Kubernetes containers, end to end over gRPC:
Hub -> Orchestrator (kubernetes backend) -> REAL kube-apiserver, and the
Hub's exec driver -> pods/exec v5 -> KWOK (commands run on this host as
nobody, so files go to the session's scratch directory, not /work)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest

from hub_service.server import start_hub
from orchestrator_service.server import start_orchestrator
from sandhub.config import HubConfig
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import KEYS
from tests.integration.test_exec import A, get, put, run
from tests.kubernetes.control_plane import ControlPlane
from tests.kubernetes.test_orchestrator import orchestrator_config

pytestmark = pytest.mark.kubernetes


@pytest.fixture
async def hub(control_plane: ControlPlane, namespace: str) -> AsyncIterator[grpc.aio.Channel]:
    config = orchestrator_config(control_plane, namespace)
    orch = await start_orchestrator(replace(config, reap_interval_s=5.0))
    hub = await start_hub(HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{orch.port}", api_keys=KEYS,
                                    kubernetes=config.kubernetes, orchestrator_token=config.token),
                        exec_via_agent=False)  # the pods/exec path, until it is removed
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    yield channel
    await channel.close()
    await hub.stop(0)
    await orch.stop(0)


async def test_run_put_and_get_files_through_the_hub(hub: grpc.aio.Channel, control_plane: ControlPlane) -> None:
    created = await pb_grpc.OrchestratorServiceStub(hub).CreateContainer(
        pb.CreateContainerRequest(wait_until_running=True, labels={"app": "web"}), metadata=A)
    cid = created.container.container_id
    assert created.container.state == pb.CONTAINER_STATE_RUNNING
    ex = xpb_grpc.ExecServiceStub(hub)
    r = await run(ex, cid, shell="echo hi; echo err >&2; exit 3")
    assert (r.exit_status.exit_code, r.stdout, r.stderr) == (3, b"hi\n", b"err\n")
    assert control_plane.exec_dir is not None
    dest = str(control_plane.exec_dir / "tmp" / cid)
    blob = os.urandom(3 << 20)
    got = await put(ex, cid, {"app/main.py": b"print('hello')\n", "blob.bin": blob}, destination=dest, mode=0o640)
    assert [f.path for f in got.files] == [f"{dest}/app/main.py", f"{dest}/blob.bin"]
    assert got.files[1].sha256 == hashlib.sha256(blob).hexdigest()
    r = await run(ex, cid, "cat", f"{dest}/app/main.py")
    assert r.stdout == b"print('hello')\n"
    info, data = await get(ex, cid, f"{dest}/blob.bin")
    assert data == blob and info.size == len(blob)
