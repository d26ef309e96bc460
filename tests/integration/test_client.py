"""sandhub.client against a real Hub (local backend, root): every call of both
services, sync and async, and errors as exceptions with their ErrorInfo."""

from __future__ import annotations

import asyncio

import pytest

from sandhub.client import AsyncClient, Client, InvalidArgument, NotFound
from sandhub.common.v1 import errors_pb2
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def target(services: Services) -> str:
    return f"127.0.0.1:{services.hub.port}"


async def test_async_client_containers_exec_and_processes(services: Services) -> None:
    async with AsyncClient(target(services), api_key="key-a") as hub:
        made = [await hub.create_container(labels={"app": "t"}, wait_until_running=True) for _ in range(3)]
        seen = [c.container_id async for c in hub.iter_containers(label_selector="app=t", page_size=2)]
        assert sorted(seen) == sorted(c.container_id for c in made)
        page = await hub.list_containers(label_selector="app=t", page_size=2)
        assert len(page.containers) == 2 and page.next_page_token
        cid = made[0].container_id
        extended = await hub.extend_container(cid, by_s=600)
        assert extended.expire_time.ToNanoseconds() > made[0].expire_time.ToNanoseconds()

        session = await hub.exec(cid, ["sh", "-c", "cat; echo done"])
        await session.write(b"from stdin ")
        await session.close_stdin()  # EOF ends cat
        out, _, status = await session.wait()
        assert (out, status.exit_code, session.pid > 0) == (b"from stdin done\n", 0, True)

        sleeper = await hub.exec(cid, ["sleep", "60"])
        await sleeper.signal("TERM")
        _, _, status = await sleeper.wait()
        assert status.signal == xpb.SIGNAL_SIGTERM

        started = await hub.start_process(cid, "web", "echo up; sleep 60")
        assert started.created and started.process.state == xpb.PROCESS_STATE_RUNNING
        assert (await hub.get_process(cid, "web")).process_id == "web"
        assert [p.process_id async for p in hub.iter_processes(cid)] == ["web"]
        for _ in range(50):
            chunks = [r async for r in hub.attach_process(cid, "web")]
            if any(r.stdout.data for r in chunks):
                break
            await asyncio.sleep(0.1)
        assert b"".join(r.stdout.data for r in chunks) == b"up\n"
        await hub.signal_process(cid, "web", "KILL")
        followed = [r async for r in hub.attach_process(cid, "web", stdout_offset=3, follow=True)]
        assert followed[-1].exit_status.signal == xpb.SIGNAL_SIGKILL

        info, data = await hub.get_file(cid, "/etc/hostname")
        assert info.size == len(data) > 0
        deleted = await hub.delete_container(cid)
        assert deleted.container_id == cid

        with pytest.raises(NotFound) as nf:
            await hub.get_process(made[1].container_id, "nope")
        assert nf.value.reason == errors_pb2.ERROR_REASON_PROCESS_NOT_FOUND
        assert nf.value.metadata["process_id"] == "nope" and "PROCESS_NOT_FOUND" in str(nf.value)
        with pytest.raises(InvalidArgument) as bad:
            await hub.list_containers(page_token="not-a-token")
        assert bad.value.reason == errors_pb2.ERROR_REASON_INVALID_PAGE_TOKEN and bad.value.field == "page_token"


async def test_sync_client_files_pty_resize_and_watch(services: Services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "x.sh").write_text("#!/bin/sh\necho x\n")
    (tmp_path / "d" / "sub" / "x.sh").chmod(0o755)

    def walk() -> None:
        with Client(target(services), api_key="key-b") as hub:
            watch = hub.watch_containers(send_initial=True)
            assert next(watch).type == pb.WATCH_EVENT_TYPE_SYNCED
            c = hub.create_container(wait_until_running=True)
            assert next(watch).container.container_id == c.container_id
            put = hub.put_paths(c.container_id, [tmp_path / "d"], destination="/work/in")
            assert [(f.path, f.mode) for f in put.files] == [("/work/in/d/sub/x.sh", 0o755)]
            assert hub.run(c.container_id, ["/work/in/d/sub/x.sh"]).stdout == b"x\n"
            with hub.exec(c.container_id, ["sh"], pty=(24, 80)) as s:
                s.resize(40, 132)
                s.write(b"sleep 0.2; stty size; exit 0\n")
                out, _, status = s.wait()
            assert b"40 132" in out and status.exit_code == 0
            hub.delete_container(c.container_id)

    await asyncio.to_thread(walk)
