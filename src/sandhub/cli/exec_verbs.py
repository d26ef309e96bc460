"""`sandhub put|get-file|run|exec|ps|attach|kill`: ExecService from a shell.

`run` and `exec` exit with the command's own exit code (128+N for a signal),
so they compose in scripts like the command itself would.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from sandhub.exec.v1 import exec_pb2 as pb
from sandhub.exec.v1 import exec_pb2_grpc as pb_grpc

CHUNK = 1 << 20


class ExecClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.channel = grpc.insecure_channel(args.hub, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.ExecServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
        self.timeout = args.timeout


def _command(args: argparse.Namespace) -> pb.Command:
    env = dict(item.split("=", 1) for item in args.env)
    if args.shell:
        return pb.Command(shell=" ".join(args.argv), env=env, cwd=args.cwd)
    return pb.Command(argv=args.argv, env=env, cwd=args.cwd)


def _exit_code(status: pb.ExitStatus) -> int:
    if status.signal_number:
        return 128 + status.signal_number
    return status.exit_code


def cmd_put(args: argparse.Namespace) -> int:
    c = ExecClient(args)
    sources = [Path(p) for p in args.files]

    def requests() -> Iterator[pb.PutFilesRequest]:
        yield pb.PutFilesRequest(start=pb.PutFilesRequest.Start(container_id=args.id, destination=args.dest))
        for src in sources:
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            for f in files:
                rel = f.name if f == src else str(Path(src.name) / f.relative_to(src))
                st = f.stat()
                yield pb.PutFilesRequest(file=pb.PutFilesRequest.File(path=rel, mode=st.st_mode & 0o777,
                                                                      size=st.st_size))
                with f.open("rb") as fh:
                    while data := fh.read(CHUNK):
                        yield pb.PutFilesRequest(data=data)

    resp = c.stub.PutFiles(requests(), metadata=c.metadata, timeout=c.timeout)
    for f in resp.files:
        print(f"{f.path}\t{f.size}\t{f.mode:o}\t{f.sha256}")
    return 0


def cmd_get_file(args: argparse.Namespace) -> int:
    c = ExecClient(args)
    fmt = pb.ARCHIVE_FORMAT_TAR if args.tar else pb.ARCHIVE_FORMAT_UNSPECIFIED
    out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
    try:
        for r in c.stub.GetFiles(pb.GetFilesRequest(container_id=args.id, path=args.path, format=fmt),
                                 metadata=c.metadata, timeout=c.timeout):
            if r.HasField("info") and r.info.is_dir and args.output != "-":
                print(f"{r.info.path} is a directory: writing a tar archive", file=sys.stderr)
            elif not r.HasField("info"):
                out.write(r.data)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    c = ExecClient(args)
    stdin = b"" if sys.stdin.isatty() or args.no_stdin else sys.stdin.buffer.read()
    req = pb.RunRequest(container_id=args.id, command=_command(args), stdin=stdin)
    if args.run_timeout:
        req.timeout.FromNanoseconds(int(args.run_timeout * 1e9))
    r = c.stub.Run(req, metadata=c.metadata, timeout=max(c.timeout, args.run_timeout + 10))
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(r.stderr)
    if r.status.timed_out:
        print(f"sandhub: timed out after {args.run_timeout:g}s; the command was killed", file=sys.stderr)
    if r.stdout_truncated or r.stderr_truncated:
        print("sandhub: output was truncated", file=sys.stderr)
    return _exit_code(r.status)


def cmd_exec(args: argparse.Namespace) -> int:
    """Interactive: stdin is forwarded, a terminal gets a PTY in raw mode and
    its size follows the window."""
    c = ExecClient(args)
    tty = sys.stdin.isatty() and not args.no_tty
    start = pb.ExecRequest.Start(container_id=args.id, command=_command(args))
    if tty:
        size = shutil.get_terminal_size()
        start.pty.CopyFrom(pb.PtySize(rows=size.lines, cols=size.columns))
    outgoing: queue.Queue[pb.ExecRequest | None] = queue.Queue()
    outgoing.put(pb.ExecRequest(start=start))

    def requests() -> Iterator[pb.ExecRequest]:
        while (r := outgoing.get()) is not None:
            yield r

    def pump_stdin() -> None:
        fd = sys.stdin.fileno()
        while data := os.read(fd, 65536):
            outgoing.put(pb.ExecRequest(stdin=data))
        outgoing.put(pb.ExecRequest(close_stdin=pb.ExecRequest.CloseStdin()))

    saved: Any = None
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setraw(sys.stdin.fileno())

        def on_winch(*_: Any) -> None:
            s = shutil.get_terminal_size()
            outgoing.put(pb.ExecRequest(resize=pb.PtySize(rows=s.lines, cols=s.columns)))

        signal.signal(signal.SIGWINCH, on_winch)
    threading.Thread(target=pump_stdin, daemon=True).start()
    code = 1
    try:
        for r in c.stub.Exec(requests(), metadata=c.metadata):
            kind = r.WhichOneof("msg")
            if kind == "stdout":
                sys.stdout.buffer.write(r.stdout)
                sys.stdout.flush()
            elif kind == "stderr":
                sys.stderr.buffer.write(r.stderr)
                sys.stderr.flush()
            elif kind == "exited":
                code = _exit_code(r.exited)
    finally:
        outgoing.put(None)
        if saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    return code


def _process_line(p: pb.Process) -> str:
    state = pb.ProcessState.Name(p.state).removeprefix("PROCESS_STATE_")
    if p.state == pb.PROCESS_STATE_EXITED:
        state += f"({_exit_code(p.exit_status)})"
    cmd = p.command.shell or " ".join(p.command.argv)
    return f"{p.process_id}\t{state}\t{p.pid}\t{p.stdout_bytes}/{p.stderr_bytes}\t{cmd}"


def cmd_start(args: argparse.Namespace) -> int:
    c = ExecClient(args)
    r = c.stub.StartProcess(pb.StartProcessRequest(container_id=args.id, process_id=args.process_id,
                                                   command=_command(args)), metadata=c.metadata, timeout=c.timeout)
    print(_process_line(r.process) + ("" if r.created else "\t(already running)"))
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    c = ExecClient(args)
    token = ""
    while True:
        r = c.stub.ListProcesses(pb.ListProcessesRequest(container_id=args.id, page_token=token),
                                 metadata=c.metadata, timeout=c.timeout)
        for p in r.processes:
            print(_process_line(p))
        token = r.next_page_token
        if not token:
            return 0


def cmd_attach(args: argparse.Namespace) -> int:
    c = ExecClient(args)
    req = pb.AttachProcessRequest(container_id=args.id, process_id=args.process_id, follow=args.follow,
                                  stdout_offset=args.offset, stderr_offset=args.offset)
    code = 0
    for r in c.stub.AttachProcess(req, metadata=c.metadata):
        kind = r.WhichOneof("msg")
        if kind == "stdout":
            if r.stdout.dropped_before:
                print(f"sandhub: output before offset {r.stdout.offset} was dropped", file=sys.stderr)
            sys.stdout.buffer.write(r.stdout.data)
            sys.stdout.flush()
        elif kind == "stderr":
            sys.stderr.buffer.write(r.stderr.data)
        elif kind == "exited":
            code = _exit_code(r.exited)
    return code


def cmd_kill(args: argparse.Namespace) -> int:
    c = ExecClient(args)
    sig = f"SIGNAL_SIG{args.signal.upper().removeprefix('SIG')}"
    if sig not in pb.Signal.keys():
        raise SystemExit(f"error: unknown signal {args.signal!r}")
    r = c.stub.SignalProcess(pb.SignalProcessRequest(container_id=args.id, process_id=args.process_id, signal=sig),
                             metadata=c.metadata, timeout=c.timeout)
    print(_process_line(r.process))
    return 0


def add_parsers(sub: Any, client: argparse.ArgumentParser) -> None:
    command = argparse.ArgumentParser(add_help=False)
    command.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    command.add_argument("--cwd", default="", help="working directory (default: the work dir)")
    command.add_argument("--shell", action="store_true", help="run the words as one /bin/sh -c string")

    p = sub.add_parser("put", parents=[client], help="upload files or directories into a container")
    p.add_argument("id")
    p.add_argument("files", nargs="+")
    p.add_argument("--dest", default="", help="directory in the container (default: its work dir)")
    p.set_defaults(func=cmd_put)

    g = sub.add_parser("get-file", parents=[client], help="download a file (or a directory, as tar)")
    g.add_argument("id")
    g.add_argument("path")
    g.add_argument("-o", "--output", default="-", help="local file (default: stdout)")
    g.add_argument("--tar", action="store_true", help="always as a tar archive")
    g.set_defaults(func=cmd_get_file)

    r = sub.add_parser("run", parents=[client, command], help="run a command once; exits with its exit code")
    r.add_argument("id")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    r.add_argument("--run-timeout", type=float, default=0.0, help="seconds; then the command is killed")
    r.add_argument("--no-stdin", action="store_true")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("exec", parents=[client, command], help="run a command interactively (a PTY on a terminal)")
    e.add_argument("id")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    e.add_argument("--no-tty", action="store_true")
    e.set_defaults(func=cmd_exec)

    s = sub.add_parser("start", parents=[client, command], help="start a background process")
    s.add_argument("id")
    s.add_argument("process_id")
    s.add_argument("argv", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_start)

    ps = sub.add_parser("ps", parents=[client], help="list a container's background processes")
    ps.add_argument("id")
    ps.set_defaults(func=cmd_ps)

    a = sub.add_parser("attach", parents=[client], help="print a background process's output")
    a.add_argument("id")
    a.add_argument("process_id")
    a.add_argument("--offset", type=int, default=0, help="from this byte of each stream")
    a.add_argument("-f", "--follow", action="store_true", help="keep printing until it exits")
    a.set_defaults(func=cmd_attach)

    k = sub.add_parser("kill", parents=[client], help="signal a background process")
    k.add_argument("id")
    k.add_argument("process_id")
    k.add_argument("-s", "--signal", default="TERM")
    k.set_defaults(func=cmd_kill)
