"""Pure pieces of the Kubernetes exec driver (no API server): the v5 status
channel, the exec URL, and the supervisor scripts' answers."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client

from orchestrator_service.backends.exec_base import CommandSpec, ExitInfo
from orchestrator_service.backends.kubernetes import exec_scripts as s
from orchestrator_service.backends.kubernetes.exec_ws import exec_url, exit_code_of


@pytest.mark.parametrize("status, code", [
    (b'{"metadata":{},"status":"Success"}', 0),
    (json.dumps({"status": "Failure", "reason": "NonZeroExitCode",
                 "details": {"causes": [{"reason": "ExitCode", "message": "42"}]}}).encode(), 42),
    (b'{"status":"Failure","reason":"InternalError","message":"no such container"}', None),
    (b"", None),
    (b"not json", None),
])
def test_exit_code_from_the_status_channel(status: bytes, code: int | None) -> None:
    assert exit_code_of(status) == code


def test_exec_url_names_every_argument() -> None:
    conf = client.Configuration(host="https://127.0.0.1:6443")
    url = exec_url(conf, namespace="ns", pod="cnt-x", container="main", argv=["sh", "-c", "a b&c"],
                   stdin=True, tty=False)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("wss", "127.0.0.1:6443", "/api/v1/namespaces/ns/pods/cnt-x/exec")
    assert parse_qsl(parts.query) == [("command", "sh"), ("command", "-c"), ("command", "a b&c"), ("container", "main"),
                                      ("stdin", "true"), ("stdout", "true"), ("stderr", "true"), ("tty", "false")]


def test_wrapped_command_quotes_env_and_refuses_bad_names() -> None:
    argv = s.wrapped(CommandSpec(argv=("python", "-V"), env={"A": "it's"}, cwd="app"))
    assert "setsid /bin/sh -c" in argv[2] and 'exec "$@"' in s.wrapped(CommandSpec(argv=("x",)), tty=True)[2]
    assert argv[:2] == ["/bin/sh", "-c"] and argv[2].startswith("export A='it'\"'\"'s'; ")
    assert argv[3:] == ["sandhub", "app", "python", "-V"]
    with pytest.raises(ValueError):
        s.exports({"A;rm -rf /": "x"})


def test_parse_processes_and_reads() -> None:
    out = (b"P job-2 31 1700000005 0 - 0 0 0 0\n" + s.command_json(CommandSpec(argv=("sleep", "9"))).encode() + b"\n"
           b"P job-1 30 1700000000 1700000002 143 1048576 5242880 0 7\n"
           b'{"argv":["sh","-c","x"],"env":{"K":"V"},"cwd":"w"}\n')
    job1, job2 = s.parse_processes(out)
    assert job1.process_id == "job-1" and job1.command == CommandSpec(argv=("sh", "-c", "x"), env={"K": "V"}, cwd="w")
    assert job1.exit == ExitInfo(signal=15) and job1.end_time == 1700000002
    assert (job1.stdout_first_offset, job1.stdout_bytes, job1.stderr_bytes) == (1048576, 5242880, 7)
    assert job2.exit is None and job2.pid == 31 and job2.end_time == 0.0
    assert s.parse_read(b"R 12\nabc\ndef") == s.ReadAnswer(12, b"abc\ndef")
    with pytest.raises(ValueError):
        s.parse_read(b"sh: oops\n")


def test_the_pid_line_always_comes_before_the_commands_output() -> None:
    """The command's own process writes the pid line, then execs: a fast
    command's output can't overtake it (it once did, 1-2 % of `ls /` runs)."""
    import subprocess

    # The line is written by the process that then becomes the command, not by its parent.
    assert s.shlex.quote('echo "SANDHUB-PID $$"; exec "$@"') in s.WRAP
    for _ in range(50):
        out = subprocess.run(s.wrapped(CommandSpec(argv=("echo", "fast"), cwd="/")), capture_output=True,
                             text=True, check=True).stdout.splitlines()
        assert out[0].startswith("SANDHUB-PID ") and out[1:] == ["fast"], out
