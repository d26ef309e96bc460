"""Pure pieces of the local backend: the bwrap command line, records, images."""

from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator_service.backends.local.images import Entry, Image, Images
from orchestrator_service.backends.local.sandbox import (AGENT, AgentFds, SandboxSpec, args_memfd, bwrap_argv,
                                                        launcher_env)
from orchestrator_service.backends.local.store import Record, Runtime, Store
from orchestrator_service.model import Container, Endpoint, Port, Resources, State
from sandhub.errors import UnknownImage

IMAGE = Image("img", Path("/images/img"), (Entry("usr", "dir"), Entry("bin", "symlink", "usr/bin")), ("/etc/shadow",))


def spec(**kw: object) -> SandboxSpec:
    base = dict(container_id="cnt-aaaaaaaaaaaa", image=IMAGE, env={"A": "1"}, disk_mib=64, busybox="/bin/busybox",
                agent="/tools/sandhub-agent", agent_token="t" * 64, open_files=1024)
    base.update(kw)
    return SandboxSpec(**base)  # type: ignore[arg-type]


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


FDS = AgentFds(listen=3, token=4, env=5, ready=8)


def test_argv_isolates_and_binds_read_only() -> None:
    argv = bwrap_argv(spec(), info_fd=7, agent=FDS)
    for flag in ("--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--new-session"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert "--bind" not in argv  # nothing of the host is writable
    assert argv[argv.index("--ro-bind") + 1 : argv.index("--ro-bind") + 3] == ["/images/img/usr", "/usr"]
    assert argv[argv.index("--symlink") + 1 : argv.index("--symlink") + 3] == ["usr/bin", "/bin"]
    assert argv[argv.index("--remount-ro") + 1] == "/"
    assert argv[argv.index("--info-fd") + 1] == "7"
    # disk cap split between /work and /tmp
    assert pairs(argv, "--size") == [str(32 * 1024 * 1024)] * 2
    # The agent, bound read-only, is pid 1; its own environment is the container id
    # alone (the container's env goes through --env-fd), and no secret or host
    # path is on its command line.
    assert ["/tools/sandhub-agent", AGENT] == argv[argv.index("/tools/sandhub-agent"):][:2]
    assert "--clearenv" in argv and pairs(argv, "--setenv") == ["SANDHUB_CONTAINER_ID"]
    command = argv[argv.index("--") + 1:]
    assert command == [AGENT, "--listen", "fd:3", "--token-fd", "4", "--env-fd", "5", "--ready-fd", "8",
                       "--container-id", "cnt-aaaaaaaaaaaa", "--workdir", "/work", "--state-dir", "/tmp/.sandhub",
                       "--open-files", "1024"]


def test_args_memfd_holds_the_arguments_sealed() -> None:
    import fcntl
    import os

    args = ["--setenv", "SECRET", "x" * 100_000, "--", "sh", "-c", "a b"]
    fd = args_memfd(args)
    try:
        data = os.read(fd, 1 << 20)
        assert data.split(b"\0")[:-1] == [a.encode() for a in args]
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
        with pytest.raises(OSError):
            os.write(fd, b"more")
    finally:
        os.close(fd)


def test_launcher_env_is_the_container_id_alone() -> None:
    assert launcher_env("cnt-aaaaaaaaaaaa") == {"SANDHUB_CONTAINER_ID": "cnt-aaaaaaaaaaaa"}


def test_argv_without_busybox_binds_none() -> None:
    argv = bwrap_argv(spec(busybox=""), info_fd=3, agent=FDS)
    assert argv[argv.index("--") + 1] == AGENT
    assert "/.sandhub/busybox" not in argv


def test_record_round_trip(tmp_path: Path) -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    c = Container(
        id="cnt-aaaaaaaaaaaa", tenant="t", image="host", resources=Resources(1000, 512, 256, 1024, 1024),
        env={"A": "1"}, labels={"app": "web"}, ports=(Port(8000, "TCP", "http"),), state=State.RUNNING,
        backend="local", placement="default", create_time=now, expire_time=now, update_time=now,
        endpoints=(Endpoint("http", 8000, "TCP", "10.0.0.2:8000"),), ready_time=now,
    )
    store = Store(tmp_path)
    store.prepare()
    store.save(Record(c, Runtime(bwrap_pid=1, init_pid=2, init_start_ticks=3, namespaces={"pid": 4})))
    (loaded,) = store.load_all()
    assert loaded.container == c
    assert loaded.runtime.namespaces == {"pid": 4}


def test_unreadable_record_is_kept_aside(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    store.path("cnt-bbbbbbbbbbbb").write_text("{torn")
    assert store.load_all() == []
    assert (store.dir / "cnt-bbbbbbbbbbbb.unreadable").exists()


def test_images(tmp_path: Path) -> None:
    (tmp_path / "alpine" / "usr").mkdir(parents=True)
    (tmp_path / "alpine" / "proc").mkdir()
    images = Images(tmp_path)
    assert [e.name for e in images.resolve("alpine").entries] == ["usr"]
    host = images.resolve("host")
    assert host.root == Path("/") and all(e.name not in ("root", "home", "var", "proc") for e in host.entries)
    with pytest.raises(UnknownImage):
        images.resolve("nope")
    with pytest.raises(UnknownImage):
        images.resolve("../alpine")


def test_cgroup2_options_come_from_its_mount_whatever_the_rest() -> None:
    from orchestrator_service.backends.local.cgroups import cgroup2_options

    mountinfo = (
        "25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "40 25 0:35 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
        "rw,nsdelegate,memory_recursiveprot\n"
    )
    assert cgroup2_options(mountinfo) == ["nsdelegate", "memory_recursiveprot"]
    assert cgroup2_options(mountinfo.replace("cgroup2 cgroup2", "tmpfs tmpfs")) is None


def test_favordynmods_on_a_kernel_without_it_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator_service.backends.local import cgroups

    features = tmp_path / "features"
    features.write_text("nsdelegate\nmemory_localevents\n")
    monkeypatch.setattr(cgroups, "FEATURES", features)
    assert cgroups.favordynmods_state() == (None, None)
    assert cgroups.favor_dynmods(enable=True, scratch=tmp_path / "mnt").startswith("not supported by this kernel")
    assert not (tmp_path / "mnt").exists()  # nothing tried


def test_favordynmods_is_left_alone_without_the_hierarchys_options(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A cgroup2 mount resets every flag it does not name: with no mount to
    read them from, nothing is mounted (nsdelegate & co. could be lost)."""
    from orchestrator_service.backends.local import cgroups

    features, mountinfo = tmp_path / "features", tmp_path / "mountinfo"
    features.write_text("nsdelegate\nfavordynmods\n")
    mountinfo.write_text("31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n")
    monkeypatch.setattr(cgroups, "FEATURES", features)
    monkeypatch.setattr(cgroups, "MOUNTINFO", mountinfo)
    assert cgroups.favordynmods_state() == (False, None)
    assert cgroups.favor_dynmods(enable=True, scratch=tmp_path / "mnt").startswith("off: no cgroup2 mount")
    assert not (tmp_path / "mnt").exists()


def test_find_agent_takes_the_configured_one_else_the_newest_build(tmp_path: Path) -> None:
    import os

    from orchestrator_service.backends.local.agent_binary import find_agent
    from sandhub.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="make agent"):
        find_agent("", cache=tmp_path)
    with pytest.raises(BackendUnavailable, match="make agent"):
        find_agent(str(tmp_path / "missing"), cache=tmp_path)
    builds = []
    for i, name in enumerate(("sandhub-agent-aaaa", "sandhub-agent-bbbb")):
        (tmp_path / name).mkdir()
        p = tmp_path / name / "sandhub-agent"
        p.write_bytes(b"\x7fELF")
        p.chmod(0o755)
        os.utime(p, (1000 + i, 1000 + i))
        builds.append(p)
    assert find_agent("", cache=tmp_path) == str(builds[1])
    assert find_agent(str(builds[0]), cache=tmp_path) == str(builds[0])
