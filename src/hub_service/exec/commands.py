"""Commands, signals and exit statuses: proto <-> the driver's dataclasses."""

from __future__ import annotations

from google.protobuf import duration_pb2

from orchestrator_service.backends.exec_base import CommandSpec, ExitInfo, PtySize
from sandhub.config import ExecLimits
from sandhub.errors import InvalidField
from sandhub.exec.v1 import exec_pb2 as pb

MAX_PTY = 1000


def command_spec(command: pb.Command, limits: ExecLimits, *, field: str = "command") -> CommandSpec:
    """Checks a Command and turns it into a CommandSpec; ``shell`` runs under /bin/sh -c."""
    if command.argv and command.shell:
        raise InvalidField(field, "give either argv or shell, not both")
    if command.shell:
        spec = CommandSpec.from_shell(command.shell, env=command.env, cwd=command.cwd)
    elif command.argv:
        spec = CommandSpec(argv=tuple(command.argv), env=dict(command.env), cwd=command.cwd)
    else:
        raise InvalidField(f"{field}.argv", "is empty: give argv or shell")
    spec.check(field)
    size = sum(len(a.encode()) + 1 for a in spec.argv) + len(command.cwd.encode())
    size += sum(len(k.encode()) + len(v.encode()) + 2 for k, v in command.env.items())
    if size > limits.max_command_bytes:
        raise InvalidField(field, f"is {size} bytes; at most {limits.max_command_bytes}")
    return spec


def command_proto(spec: CommandSpec) -> pb.Command:
    """The command as it was asked for: a ``shell`` line stays one."""
    if spec.shell:
        return pb.Command(shell=spec.shell, env=spec.env, cwd=spec.cwd)
    return pb.Command(argv=list(spec.argv), env=spec.env, cwd=spec.cwd)


def pty_size(size: pb.PtySize, *, field: str) -> PtySize:
    if not (0 < size.rows <= MAX_PTY and 0 < size.cols <= MAX_PTY):
        raise InvalidField(field, f"rows and cols must be 1..{MAX_PTY}")
    return PtySize(rows=size.rows, cols=size.cols)


SIGTERM = 15


def signal_number(value: int, *, field: str = "signal") -> int:
    """The Linux number of a Signal enum value (the enum's numbers are Linux's);
    SIGNAL_UNSPECIFIED (a message that leaves the field unset) means SIGTERM,
    as the contract says."""
    if value == pb.SIGNAL_UNSPECIFIED:
        return SIGTERM
    if value not in pb.Signal.values():
        raise InvalidField(field, "name a signal, e.g. SIGNAL_SIGTERM")
    return int(value)


def exit_status(info: ExitInfo, *, timed_out: bool = False, oom_killed: bool = False) -> pb.ExitStatus:
    status = pb.ExitStatus(exit_code=-1 if info.signal else info.exit_code, signal_number=info.signal,
                           timed_out=timed_out, oom_killed=oom_killed)
    if info.signal and info.signal in pb.Signal.values():
        status.signal = info.signal  # type: ignore[assignment]
    return status


def timeout_s(value: duration_pb2.Duration, *, default: float, maximum: float, field: str) -> float:
    seconds = value.ToNanoseconds() / 1e9
    if seconds < 0:
        raise InvalidField(field, "must not be negative")
    if seconds == 0:
        return default
    if seconds > maximum:
        raise InvalidField(field, f"at most {maximum:g}s")
    return seconds


