"""Local images: a root filesystem tar imported, then run as a container."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from orchestrator_service.backends.local.image_import import import_rootfs
from sandhub.errors import InvalidField
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services, auth

pytestmark = pytest.mark.root
A = auth("key-a")


def busybox_rootfs(path: Path, *, extra: list[tarfile.TarInfo] | None = None) -> Path:
    """A tiny root filesystem like `docker export` gives: busybox, its applet
    links, an absolute symlink, a device node (skipped on import)."""
    with tarfile.open(path, "w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "ls", "cat", "echo"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        etc = tarfile.TarInfo("etc")
        etc.type, etc.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(etc)
        hello = b"from the image\n"
        info = tarfile.TarInfo("etc/motd")
        info.size, info.mode = len(hello), 0o4755  # setuid bit: dropped on import
        tar.addfile(info, io.BytesIO(hello))
        abs_link = tarfile.TarInfo("etc/localtime")
        abs_link.type, abs_link.linkname = tarfile.SYMTYPE, "/usr/share/zoneinfo/UTC"
        tar.addfile(abs_link)
        dev = tarfile.TarInfo("dev/null")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(dev)
        for member in extra or []:
            tar.addfile(member, io.BytesIO(b"x" * member.size))
    return path


def test_import_refuses_escapes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    # A symlink to the host's /tmp, then a file "through" it.
    link = tarfile.TarInfo("escape")
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path)
    through = tarfile.TarInfo("escape/owned")
    through.size = 1
    with pytest.raises(InvalidField, match="outside the image"):
        import_rootfs(images, "evil", busybox_rootfs(tmp_path / "a.tar", extra=[link, through]))
    assert not (tmp_path / "owned").exists()
    dotdot = tarfile.TarInfo("../../owned2")
    dotdot.size = 1
    with pytest.raises(InvalidField, match="'..'"):
        import_rootfs(images, "evil", busybox_rootfs(tmp_path / "b.tar", extra=[dotdot]))
    # Nothing half-imported is left.
    assert sorted(p.name for p in images.iterdir()) == []
    with pytest.raises(InvalidField):
        import_rootfs(images, "host", busybox_rootfs(tmp_path / "c.tar"))


async def test_imported_image_runs(services: Services, tmp_path: Path) -> None:
    archive = busybox_rootfs(tmp_path / "rootfs.tar")
    env = dict(os.environ, SANDHUB_IMAGES_DIR=str(services.orchestrator.config.local.images_dir))
    cli = [sys.executable, "-m", "sandhub.cli.main", "image"]
    done = subprocess.run([*cli, "import", "tiny", str(archive)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    again = subprocess.run([*cli, "import", "tiny", str(archive)], env=env, capture_output=True, text=True)
    assert again.returncode == 4 and "--replace" in again.stderr
    listed = subprocess.run([*cli, "list"], env=env, capture_output=True, text=True)
    assert listed.stdout.split() == ["host", "tiny"]
    root = services.orchestrator.config.local.images_dir / "tiny"
    assert (root / "etc/motd").stat().st_mode & 0o7777 == 0o755
    assert not (root / "dev/null").exists()

    c = (await services.hub_stub.CreateContainer(pb.CreateContainerRequest(image="tiny", wait_until_running=True),
                                                 metadata=A)).container
    assert c.state == pb.CONTAINER_STATE_RUNNING, c.state_message
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    r = await ex.Run(xpb.RunRequest(container_id=c.container_id, command=xpb.Command(shell="cat /etc/motd; ls /")), metadata=A)
    assert r.exit_status.exit_code == 0, r.stderr
    assert r.stdout.startswith(b"from the image\n")
    assert set(r.stdout.split()[3:]) >= {b"bin", b"etc", b"work", b"tmp"}
    assert b"usr" not in r.stdout.split()  # nothing of the host's
