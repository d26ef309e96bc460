"""`sandhub put|get-file|run|exec|ps|attach|kill`: ExecService from a shell.

`run` and `exec` exit with the command's own exit code (128+N for a signal),
so they compose in scripts like the command itself would.

With --json every verb prints machine-readable JSON on stdout (field names in
the proto3 JSON mapping's camelCase; zero values present): a command's bytes
are ``"stdout": "text"`` when they are UTF-8 and ``"stdoutBase64"`` when not.
`exec` and `attach` print one JSON object per line as output arrives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from typing import Any

from google.protobuf import json_format

from sandhub.cli.connect import connect
from sandhub.cli.jsonout import json_line, message_dict, output_fields, print_json
from sandhub.exec.v1 import exec_pb2 as pb


def _argv(args: argparse.Namespace) -> list[str] | str:
    """The command's words, or with --shell one string for /bin/sh -c."""
    return " ".join(args.argv) if args.shell else list(args.argv)


def _env(args: argparse.Namespace) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.env)


def _exit_code(status: pb.ExitStatus) -> int:
    if status.signal_number:
        return 128 + status.signal_number
    return status.exit_code


def cmd_put(args: argparse.Namespace) -> int:
    try:
        resp = connect(args).put_paths(args.container_id, args.files, destination=args.dest)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print_json(message_dict(resp))
        return 0
    for f in resp.files:
        print(f"{f.path}\t{f.size}\t{f.mode:o}\t{f.sha256}")
    return 0


def cmd_get_file(args: argparse.Namespace) -> int:
    if args.json and args.output == "-":
        print("error: --json prints the file's info on stdout: name the file with -o", file=sys.stderr)
        return 2
    fmt = pb.ARCHIVE_FORMAT_TAR if args.tar else pb.ARCHIVE_FORMAT_UNSPECIFIED
    out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
    try:
        info = connect(args).download(args.container_id, args.path, out, archive_format=fmt)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    if args.json:
        print_json({"info": message_dict(info), "output": args.output,
                    "bytesWritten": os.path.getsize(args.output)})
    elif info.is_dir and args.output != "-":
        print(f"{info.path} is a directory: wrote a tar archive", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    stdin = b"" if sys.stdin.isatty() or args.no_stdin else sys.stdin.buffer.read()
    r = connect(args).run(args.container_id, _argv(args), stdin=stdin, env=_env(args), cwd=args.cwd,
                          timeout_s=args.run_timeout)
    if args.json:
        print_json({
            "exitCode": _exit_code(r.exit_status),
            "exitStatus": message_dict(r.exit_status),
            **output_fields("stdout", r.stdout),
            **output_fields("stderr", r.stderr),
            "stdoutTruncated": r.stdout_truncated,
            "stderrTruncated": r.stderr_truncated,
            "startTime": json_format.MessageToDict(r)["startTime"] if r.HasField("start_time") else None,
            "duration": json_format.MessageToDict(r)["duration"] if r.HasField("duration") else None,
        })
        return _exit_code(r.exit_status)
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(r.stderr)
    if r.exit_status.timed_out:
        print(f"sandhub: timed out after {args.run_timeout:g}s; the command was killed", file=sys.stderr)
    if r.stdout_truncated or r.stderr_truncated:
        print("sandhub: output was truncated", file=sys.stderr)
    return _exit_code(r.exit_status)


def cmd_exec(args: argparse.Namespace) -> int:
    """Interactive: stdin is forwarded, a terminal gets a PTY in raw mode and
    its size follows the window. With --json, no PTY: each event is a JSON line."""
    tty = sys.stdin.isatty() and not args.no_tty and not args.json
    pty = None
    if tty:
        size = shutil.get_terminal_size()
        pty = (size.lines, size.columns)
    session = connect(args).exec(args.container_id, _argv(args), env=_env(args), cwd=args.cwd, pty=pty)

    def pump_stdin() -> None:
        fd = sys.stdin.fileno()
        while data := os.read(fd, 65536):
            session.write(data)
        session.close_stdin()

    saved: Any = None
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setraw(sys.stdin.fileno())

        def on_winch(*_: Any) -> None:
            s = shutil.get_terminal_size()
            session.resize(s.lines, s.columns)

        signal.signal(signal.SIGWINCH, on_winch)
    threading.Thread(target=pump_stdin, daemon=True).start()
    code = 1
    try:
        for r in session:
            kind = r.WhichOneof("msg")
            if args.json:
                if kind == "started":
                    json_line({"started": {"pid": r.started.pid}})
                elif kind in ("stdout", "stderr"):
                    json_line({"stream": kind, **output_fields("data", getattr(r, kind))})
                elif kind == "exit_status":
                    code = _exit_code(r.exit_status)
                    json_line({"exitStatus": message_dict(r.exit_status), "exitCode": code})
            elif kind == "stdout":
                sys.stdout.buffer.write(r.stdout)
                sys.stdout.flush()
            elif kind == "stderr":
                sys.stderr.buffer.write(r.stderr)
                sys.stderr.flush()
            elif kind == "exit_status":
                code = _exit_code(r.exit_status)
    finally:
        session.close()
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
    r = connect(args).start_process(args.container_id, args.process_id, _argv(args), env=_env(args), cwd=args.cwd)
    if args.json:
        print_json({"process": message_dict(r.process), "created": r.created})
    else:
        print(_process_line(r.process) + ("" if r.created else "\t(already running)"))
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    processes = connect(args).iter_processes(args.container_id)
    if args.json:
        print_json({"processes": [message_dict(p) for p in processes]})
        return 0
    for p in processes:
        print(_process_line(p))
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    """Without --json, stdout and stderr as they were; with it, one JSON line
    per chunk (stream, offset, data, droppedBefore) and one for the exit."""
    code = 0
    chunks = connect(args).attach_process(args.container_id, args.process_id, stdout_offset=args.offset,
                                          stderr_offset=args.offset, follow=args.follow)
    for r in chunks:
        kind = r.WhichOneof("msg")
        if kind in ("stdout", "stderr"):
            chunk: pb.OutputChunk = getattr(r, kind)
            if args.json:
                json_line({"stream": kind, "offset": chunk.offset, **output_fields("data", chunk.data),
                            "droppedBefore": chunk.dropped_before})
                continue
            if chunk.dropped_before:
                print(f"sandhub: {kind} before offset {chunk.offset} was dropped", file=sys.stderr)
            stream = sys.stdout.buffer if kind == "stdout" else sys.stderr.buffer
            stream.write(chunk.data)
            stream.flush()
        elif kind == "exit_status":
            code = _exit_code(r.exit_status)
            if args.json:
                json_line({"exitStatus": message_dict(r.exit_status), "exitCode": code})
    return code


def cmd_kill(args: argparse.Namespace) -> int:
    try:
        p = connect(args).signal_process(args.container_id, args.process_id, args.signal)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print_json({"process": message_dict(p)})
    else:
        print(_process_line(p))
    return 0


def add_parsers(sub: Any, client: argparse.ArgumentParser) -> None:
    command = argparse.ArgumentParser(add_help=False)
    command.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    command.add_argument("--cwd", default="", help="working directory (default: the work dir)")
    command.add_argument("--shell", action="store_true", help="run the words as one /bin/sh -c string")

    p = sub.add_parser("put", parents=[client], help="upload files or directories into a container")
    p.add_argument("container_id")
    p.add_argument("files", nargs="+")
    p.add_argument("--dest", default="", help="directory in the container (default: its work dir)")
    p.set_defaults(func=cmd_put)

    g = sub.add_parser("get-file", parents=[client], help="download a file (or a directory, as tar)")
    g.add_argument("container_id")
    g.add_argument("path")
    g.add_argument("-o", "--output", default="-", help="local file (default: stdout)")
    g.add_argument("--tar", action="store_true", help="always as a tar archive")
    g.set_defaults(func=cmd_get_file)

    r = sub.add_parser("run", parents=[client, command], help="run a command once; exits with its exit code")
    r.add_argument("container_id")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    r.add_argument("--run-timeout", type=float, default=0.0, help="seconds; then the command is killed")
    r.add_argument("--no-stdin", action="store_true")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("exec", parents=[client, command], help="run a command interactively (a PTY on a terminal)")
    e.add_argument("container_id")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    e.add_argument("--no-tty", action="store_true")
    e.set_defaults(func=cmd_exec)

    s = sub.add_parser("start", parents=[client, command], help="start a background process")
    s.add_argument("container_id")
    s.add_argument("process_id")
    s.add_argument("argv", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_start)

    ps = sub.add_parser("ps", parents=[client], help="list a container's background processes")
    ps.add_argument("container_id")
    ps.set_defaults(func=cmd_ps)

    a = sub.add_parser("attach", parents=[client], help="print a background process's output")
    a.add_argument("container_id")
    a.add_argument("process_id")
    a.add_argument("--offset", type=int, default=0, help="from this byte of each stream")
    a.add_argument("-f", "--follow", action="store_true", help="keep printing until it exits")
    a.set_defaults(func=cmd_attach)

    k = sub.add_parser("kill", parents=[client], help="signal a background process")
    k.add_argument("container_id")
    k.add_argument("process_id")
    k.add_argument("-s", "--signal", default="TERM")
    k.set_defaults(func=cmd_kill)
