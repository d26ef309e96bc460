"""The Hub over TLS and mutual TLS, with the API key as standard per-call
credentials (grpc.access_token_call_credentials composed with
ssl_channel_credentials, what grpc-go's oauth and grpc-js's
combineChannelCredentials do too). Real Hub on loopback in front of the real
local backend (root); certificates made per test with `cryptography`."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from hub_service.server import RunningHub, start_hub
from hub_service.transport import is_loopback
from sandhub.client import AsyncClient, Client, NotFound, Tls, Unauthenticated
from sandhub.common.v1 import errors_pb2
from sandhub.config import ConfigError, load_hub
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import Services, hub_config
from tests.kubernetes.pki import ClusterPKI

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@dataclass
class TlsHub:
    hub: RunningHub
    pki: ClusterPKI
    target: str

    @property
    def ca(self) -> bytes:
        return self.pki.ca_cert.read_bytes()


async def tls_hub(services: Services, tmp_path: Path, *, mutual: bool = False) -> TlsHub:
    pki = ClusterPKI(tmp_path / "pki")
    cert, key = pki.issue("hub", server=True)
    hub = await start_hub(hub_config(services.orchestrator, tls_cert_file=cert, tls_key_file=key,
                                     tls_client_ca_file=pki.ca_cert if mutual else None))
    return TlsHub(hub, pki, f"127.0.0.1:{hub.port}")


@pytest.fixture
async def tls(services: Services, tmp_path: Path) -> AsyncIterator[TlsHub]:
    t = await tls_hub(services, tmp_path)
    yield t
    await t.hub.stop(0)


@pytest.fixture
async def mtls(services: Services, tmp_path: Path) -> AsyncIterator[TlsHub]:
    t = await tls_hub(services, tmp_path, mutual=True)
    yield t
    await t.hub.stop(0)


def standard_channel(t: TlsHub, key: str, *, cert: tuple[Path, Path] | None = None) -> grpc.aio.Channel:
    """What any gRPC user writes: TLS channel credentials composed with the
    access-token call credentials; no hand-made metadata."""
    ssl = grpc.ssl_channel_credentials(
        root_certificates=t.ca,
        private_key=cert[1].read_bytes() if cert else None,
        certificate_chain=cert[0].read_bytes() if cert else None,
    )
    creds = grpc.composite_channel_credentials(ssl, grpc.access_token_call_credentials(key))
    return grpc.aio.secure_channel(t.target, creds)


async def test_standard_credentials_over_tls_create_run_delete(tls: TlsHub) -> None:
    async with standard_channel(tls, "key-a") as channel:
        containers = pb_grpc.OrchestratorServiceStub(channel)
        made = (await containers.CreateContainer(pb.CreateContainerRequest(wait_until_running=True))).container
        assert made.tenant == "tenant-a" and made.state == pb.CONTAINER_STATE_RUNNING
        run = await xpb_grpc.ExecServiceStub(channel).Run(xpb.RunRequest(
            container_id=made.container_id, command=xpb.Command(argv=["echo", "over tls"])))
        assert (run.exit_status.exit_code, run.stdout) == (0, b"over tls\n")
        gone = (await containers.DeleteContainer(pb.DeleteContainerRequest(container_id=made.container_id))).container
        assert gone.container_id == made.container_id
    # The same key on a channel without it is refused, over TLS too.
    async with grpc.aio.secure_channel(tls.target, grpc.ssl_channel_credentials(tls.ca)) as bare:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.OrchestratorServiceStub(bare).ListContainers(pb.ListContainersRequest())
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_sandhub_client_over_tls_sync_and_async(tls: TlsHub) -> None:
    def walk() -> tuple[bytes, str]:
        with Client(tls.target, api_key="key-b", tls=Tls(ca_cert=tls.ca)) as hub:
            c = hub.create_container(wait_until_running=True)
            hub.put_files(c.container_id, {"hi.txt": b"hello"})
            out = hub.run(c.container_id, ["cat", "hi.txt"]).stdout
            hub.delete_container(c.container_id)
            return out, c.tenant

    assert await asyncio.to_thread(walk) == (b"hello", "tenant-b")
    async with AsyncClient(tls.target, api_key="key-a", tls=Tls(ca_cert=tls.ca)) as hub:
        with pytest.raises(NotFound) as nf:
            await hub.get_container("cnt-000000000000")
        assert nf.value.reason == errors_pb2.ERROR_REASON_CONTAINER_NOT_FOUND and nf.value.metadata["container_id"] == "cnt-000000000000"
        assert nf.value.request_id
    async with AsyncClient(tls.target, api_key="wrong", tls=Tls(ca_cert=tls.ca)) as hub:
        with pytest.raises(Unauthenticated) as un:
            await hub.list_containers()
        assert un.value.reason == errors_pb2.ERROR_REASON_INVALID_CREDENTIALS


async def test_a_plaintext_client_gets_nothing_from_the_tls_port(tls: TlsHub) -> None:
    async with grpc.aio.insecure_channel(tls.target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.OrchestratorServiceStub(plain).ListContainers(
                pb.ListContainersRequest(), metadata=(("authorization", "Bearer key-a"),), timeout=5)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_mtls_needs_a_client_certificate_signed_by_the_ca(mtls: TlsHub, tmp_path: Path) -> None:
    async with standard_channel(mtls, "key-a") as no_cert:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.OrchestratorServiceStub(no_cert).ListContainers(pb.ListContainersRequest(), timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    stranger = ClusterPKI(tmp_path / "other-ca").issue("stranger", server=False, client=True)
    async with standard_channel(mtls, "key-a", cert=stranger) as foreign:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.OrchestratorServiceStub(foreign).ListContainers(pb.ListContainersRequest(), timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    client = mtls.pki.issue("backend-1", server=False, client=True)
    async with standard_channel(mtls, "key-a", cert=client) as ok:
        listed = await pb_grpc.OrchestratorServiceStub(ok).ListContainers(pb.ListContainersRequest(), timeout=5)
        assert list(listed.containers) == []
    # The certificate admits the connection; the API key still picks (and is needed for) the tenant.
    tls = Tls.from_files(mtls.pki.ca_cert, *client)
    async with AsyncClient(mtls.target, tls=tls) as keyless:
        with pytest.raises(Unauthenticated):
            await keyless.list_containers()


def grpcurl() -> str:
    path = os.environ.get("SANDHUB_GRPCURL", "")
    if not path:
        found = sorted(glob.glob(os.path.expanduser("~/.cache/sandhub/tools/grpcurl-*/grpcurl")))
        path = found[-1] if found else ""
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"grpcurl not found (SANDHUB_GRPCURL={path!r}): run `make tools`")
    return path


@pytest.mark.tools
async def test_grpcurl_over_tls(tls: TlsHub) -> None:
    ca = str(tls.pki.ca_cert)

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([grpcurl(), "-cacert", ca, *args], capture_output=True, text=True, timeout=30)

    listed = await asyncio.to_thread(call, "-H", "authorization: Bearer key-a", tls.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"sandhub.orchestrator.v1.OrchestratorService", "sandhub.exec.v1.ExecService"} <= set(listed.stdout.split())
    got = await asyncio.to_thread(call, "-H", "authorization: Bearer key-a", "-d", "{}", tls.target,
                                  "sandhub.orchestrator.v1.OrchestratorService/ListContainers")
    assert got.returncode == 0 and json.loads(got.stdout) == {}, got.stderr
    keyless = await asyncio.to_thread(call, "-d", "{}", tls.target,
                                      "sandhub.orchestrator.v1.OrchestratorService/ListContainers")
    assert keyless.returncode != 0 and "Unauthenticated" in keyless.stderr


async def test_the_cli_over_tls(tls: TlsHub) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDHUB_")}
    env.update(SANDHUB_HUB=tls.target, SANDHUB_API_KEY="key-a")
    argv = [sys.executable, "-m", "sandhub.cli.main"]

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv, *args], env={**env, **extra}, capture_output=True, text=True, timeout=60)

    ok = await asyncio.to_thread(cli, "list", "--json", "--ca-cert", str(tls.pki.ca_cert))
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"containers": []}, ok.stderr
    by_env = await asyncio.to_thread(cli, "get", "cnt-000000000000", SANDHUB_CA_CERT_FILE=str(tls.pki.ca_cert))
    assert by_env.returncode == 3 and "CONTAINER_NOT_FOUND" in by_env.stderr, by_env.stderr
    plain = await asyncio.to_thread(cli, "list", "--timeout", "5")
    assert plain.returncode == 6 and "TLS" in plain.stderr


async def test_plaintext_is_refused_off_loopback_unless_allowed(services: Services) -> None:
    with pytest.raises(ValueError, match="refusing plaintext on 0.0.0.0:0"):
        await start_hub(hub_config(services.orchestrator, listen="0.0.0.0:0"))
    allowed = await start_hub(hub_config(services.orchestrator, listen="0.0.0.0:0", allow_plaintext=True))
    await allowed.stop(0)
    assert [is_loopback(a) for a in ("127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/run/x.sock")] == [True] * 4
    assert [is_loopback(a) for a in (":1", "0.0.0.0:1", "[::]:1", "10.1.2.3:1", "hub.example:1")] == [False] * 5


def test_tls_configuration_from_the_environment(tmp_path: Path) -> None:
    env = {"SANDHUB_HUB_TLS_CERT_FILE": "/c.pem", "SANDHUB_HUB_TLS_KEY_FILE": "/k.pem",
           "SANDHUB_HUB_TLS_CLIENT_CA_FILE": "/ca.pem", "SANDHUB_HUB_ALLOW_PLAINTEXT": "true"}
    hub = load_hub(env)
    assert (hub.tls_cert_file, hub.tls_key_file, hub.tls_client_ca_file, hub.allow_plaintext) == (
        Path("/c.pem"), Path("/k.pem"), Path("/ca.pem"), True)
    assert load_hub({}).tls_cert_file is None and not load_hub({}).allow_plaintext
    with pytest.raises(ConfigError, match="both or neither"):
        load_hub({"SANDHUB_HUB_TLS_CERT_FILE": "/c.pem"})
    with pytest.raises(ConfigError, match="CLIENT_CA_FILE needs"):
        load_hub({"SANDHUB_HUB_TLS_CLIENT_CA_FILE": "/ca.pem"})
