"""The Docker target's pure pieces against literal bytes and objects, and its
HTTP client against a fake Engine on a unix socket (no Docker, no root)."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import tarfile
from pathlib import Path

import pytest

from sandhub.bench.docker import free_subnet, routed_networks
from sandhub.bench.docker_api import (
    ContainerSpec,
    DockerApiError,
    DockerClient,
    Request,
    Response,
    body_framing,
    container_body,
    decode_chunked,
    demux,
    encode_request,
    error_message,
    exec_body,
    json_request,
    label_filter,
    parse_head,
    parse_time,
)
from sandhub.bench.dockerd import busybox_rootfs_tar, daemon_json, dockerd_argv, mounts_under
from sandhub.bench.rpc_cpu import CLK_TCK, parse_stat


def test_get_with_query_is_encoded_sorted_and_percent_quoted() -> None:
    req = Request("GET", "/containers/json", label_filter({"bench-run": "b1", "a": "x y"}))
    assert encode_request(req) == (
        b"GET /v1.41/containers/json?all=1&filters=%7B%22label%22%3A%20%5B%22a%3Dx%20y%22%2C%20%22bench-run%3Db1%22%5D%7D"
        b" HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
    )


def test_post_carries_compact_json_with_its_length() -> None:
    req = json_request("POST", "/exec/abc/start", {"Tty": False, "Detach": False})
    assert encode_request(req) == (
        b"POST /v1.41/exec/abc/start HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 28\r\n\r\n"
        b'{"Detach":false,"Tty":false}'
    )


def test_post_without_body_still_says_its_length_is_zero() -> None:
    assert encode_request(Request("POST", "/containers/x/start")) == (
        b"POST /v1.41/containers/x/start HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 0\r\n\r\n"
    )


def test_head_is_parsed_with_lower_case_names() -> None:
    status, headers = parse_head(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nApi-Version: 1.41\r\n\r\n")
    assert status == 201 and headers == {"content-type": "application/json", "api-version": "1.41"}
    with pytest.raises(DockerApiError):
        parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(DockerApiError):
        parse_head(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")


@pytest.mark.parametrize(("status", "headers", "method", "expected"), [
    (200, {"content-length": "12"}, "GET", 12),
    (200, {"transfer-encoding": "chunked"}, "GET", "chunked"),
    (204, {}, "DELETE", "none"),
    (304, {}, "POST", "none"),
    (200, {"content-length": "5"}, "HEAD", "none"),
    (200, {"content-type": "application/vnd.docker.raw-stream"}, "POST", "eof"),  # exec start, hijacked
    (101, {"upgrade": "tcp"}, "POST", "eof"),
])
def test_body_framing(status: int, headers: dict[str, str], method: str, expected: str | int) -> None:
    assert body_framing(status, headers, method) == expected


def test_chunked_body_is_joined_and_truncation_is_an_error() -> None:
    assert decode_chunked(b"4\r\nWiki\r\n6;ext=1\r\npedia \r\n0\r\n\r\n") == b"Wikipedia "
    with pytest.raises(DockerApiError):
        decode_chunked(b"a\r\nshort\r\n")


def frame(kind: int, data: bytes) -> bytes:
    return bytes([kind, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


def test_demux_splits_stdout_and_stderr_frames() -> None:
    stream = frame(1, b"bin\n") + frame(2, b"oops\n") + frame(1, b"etc\n") + frame(1, b"")
    assert demux(stream) == (b"bin\netc\n", b"oops\n")
    assert demux(b"") == (b"", b"")
    with pytest.raises(DockerApiError):
        demux(frame(1, b"abc")[:-1])
    with pytest.raises(DockerApiError):
        demux(b"\x01\x00\x00")


def test_container_body_carries_sandhubs_default_limits_and_hardening() -> None:
    spec = ContainerSpec(image="img:1", cmd=("/bin/sleep", "inf"), labels={"bench-run": "b1"}, memory_mib=512,
                         cpu_millicores=1000, pids=256, open_files=1024, tmpfs_mib={"/work": 512, "/tmp": 512},
                         network="shbd-1")
    assert container_body(spec) == {
        "Image": "img:1",
        "Cmd": ["/bin/sleep", "inf"],
        "Labels": {"bench-run": "b1"},
        "User": "1000:1000",
        "WorkingDir": "/work",
        "NetworkDisabled": False,
        "HostConfig": {
            "Memory": 536870912,
            "NanoCpus": 1000000000,
            "PidsLimit": 256,
            "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 1024}],
            "ReadonlyRootfs": True,
            "Tmpfs": {"/tmp": "size=512m,mode=1777", "/work": "size=512m,mode=755"},
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "NetworkMode": "shbd-1",
        },
    }
    no_net = ContainerSpec(image="i", cmd=(), labels={}, memory_mib=1, cpu_millicores=10, pids=1, open_files=1,
                           tmpfs_mib={}, network="none")
    assert container_body(no_net)["NetworkDisabled"] is True


def test_exec_body_attaches_output_unless_detached() -> None:
    assert exec_body(["ls", "/"]) == {"Cmd": ["ls", "/"], "AttachStdin": False, "AttachStdout": True,
                                      "AttachStderr": True, "Tty": False}
    assert exec_body(["sleep", "1"], detach=True)["AttachStdout"] is False


def test_label_filter_asks_for_stopped_containers_too() -> None:
    q = label_filter({"b": "2", "a": "1"})
    assert q["all"] == "1" and json.loads(q["filters"]) == {"label": ["a=1", "b=2"]}


def test_docker_timestamps_keep_sub_microsecond_precision() -> None:
    created = parse_time("2026-11-29T07:42:13.391088259Z")
    started = parse_time("2026-11-29T07:42:14.011763727Z")
    assert started - created == pytest.approx(0.620675468, abs=1e-6)
    assert parse_time("2026-11-29T08:42:13+01:00") == parse_time("2026-11-29T07:42:13Z")
    assert parse_time("0001-01-01T00:00:00Z") < 0  # Docker's "never"
    with pytest.raises(DockerApiError):
        parse_time("yesterday")


def test_error_message_prefers_dockers_message() -> None:
    assert error_message(Response(404, {}, b'{"message":"No such container: x"}')) == "No such container: x"
    assert error_message(Response(500, {}, b"plain failure\n")) == "plain failure"


def test_routes_are_read_from_proc_net_route_and_subnets_avoid_them() -> None:
    table = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "br0\t0000E00A\t00000000\t0001\t0\t0\t0\t0000F0FF\t0\t0\t0\n"  # 10.224.0.0/12: the whole range
    )
    nets = routed_networks(table)
    assert nets == [ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Network("10.224.0.0/12")]
    assert ipaddress.IPv4Network(free_subnet(nets[:1])).subnet_of(ipaddress.IPv4Network("10.224.0.0/12"))
    from sandhub.bench.target import TargetError

    with pytest.raises(TargetError):
        free_subnet(nets, tries=8)


def test_private_daemon_flags_keep_off_the_hosts_network_and_paths(tmp_path: Path) -> None:
    argv = dockerd_argv("/usr/sbin/dockerd", tmp_path, "shbd-1")
    assert argv[0] == "/usr/sbin/dockerd"
    for flag in (f"--host=unix://{tmp_path}/docker.sock", f"--data-root={tmp_path}/data",
                 f"--exec-root={tmp_path}/exec", f"--pidfile={tmp_path}/docker.pid",
                 f"--config-file={tmp_path}/daemon.json", "--cgroup-parent=/shbd-1", "--bridge=none",
                 "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"):
        assert flag in argv
    assert daemon_json(tmp_path) == {"deprecated-key-path": f"{tmp_path}/key.json"}


def test_busybox_image_has_the_binary_its_applets_and_mount_points(tmp_path: Path) -> None:
    fake = tmp_path / "busybox"
    fake.write_bytes(b"\x7fELF fake")
    with tarfile.open(fileobj=io.BytesIO(busybox_rootfs_tar(str(fake), ["ls", "sleep"]))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("bin/busybox").read() == b"\x7fELF fake"  # type: ignore[union-attr]
    assert members["bin/ls"].issym() and members["bin/ls"].linkname == "busybox"
    assert members["bin/sleep"].issym()
    assert {"work", "tmp", "proc", "sys", "dev", "etc/passwd"} <= set(members)


def test_mounts_under_finds_only_paths_below_the_root() -> None:
    assert mounts_under(Path("/definitely/not/mounted")) == []


def test_proc_stat_with_spaces_and_parens_in_the_name() -> None:
    line = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 150 50 20 10 20 0 1 0 777 0 0"
    own, reaped, start = parse_stat(line)
    assert (own, reaped, start) == (200 / CLK_TCK, 30 / CLK_TCK, 777)


async def fake_engine(path: Path, answers: dict[bytes, bytes]) -> asyncio.AbstractServer:
    """Answers by request line; records nothing else."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        _, headers = parse_head(b"HTTP/1.1 200 X\r\n" + head.split(b"\r\n", 1)[1])
        await reader.readexactly(int(headers.get("content-length", "0")))
        writer.write(answers[head.split(b"\r\n", 1)[0]])
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


async def test_client_reads_chunked_length_and_hijacked_answers(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    server = await fake_engine(sock, {
        b"GET /v1.41/info HTTP/1.1": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n",
        b"POST /v1.41/containers/create HTTP/1.1": b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n{\"Id\":\"c\"}\n",
        b"POST /v1.41/exec/e/start HTTP/1.1": b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\n"
                                               + frame(1, b"bin\n") + frame(2, b"x"),
        b"DELETE /v1.41/containers/gone HTTP/1.1": b"HTTP/1.1 404 Not Found\r\nContent-Length: 27\r\n\r\n"
                                                    b'{"message":"No such thing"}',
    })
    try:
        client = DockerClient(str(sock), timeout_s=5)
        assert (await client.call(Request("GET", "/info"))).json() == {"a": 1}
        created = await client.checked(json_request("POST", "/containers/create", {"Image": "i"}))
        assert created.status == 201 and created.json() == {"Id": "c"}
        started = await client.call(json_request("POST", "/exec/e/start", {"Detach": False}))
        assert demux(started.body) == (b"bin\n", b"x")
        with pytest.raises(DockerApiError) as e:
            await client.checked(Request("DELETE", "/containers/gone"))
        assert e.value.status == 404
    finally:
        server.close()
        await server.wait_closed()


async def test_client_without_a_daemon_says_so(tmp_path: Path) -> None:
    with pytest.raises(DockerApiError) as e:
        await DockerClient(str(tmp_path / "none.sock"), timeout_s=2).call(Request("GET", "/_ping"))
    assert e.value.status == 0 and "FileNotFoundError" in e.value.message
