"""The exec driver interface: how the Hub reaches inside a container.

Each backend has one (local: enter the sandbox's namespaces on this host;
kubernetes: pods/exec; ecs: ECS Exec). The Hub's ExecService is written once
on top of it: files, one-shot runs and interactive streams are all built from
``spawn``; background processes have their own calls because they must outlive
the Hub. Inputs and outputs are plain dataclasses; no generated ``_pb2`` here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sandhub.errors import InvalidField

Stream = Literal["stdout", "stderr"]

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
"""Variable names every backend can pass on (a shell `export` included)."""
SHELL = "/bin/sh"
"""What runs a command asked for as a ``shell`` line (``SHELL -c line``)."""


@dataclass(frozen=True)
class CommandSpec:
    argv: tuple[str, ...]
    """Program and arguments; argv[0] is looked up in the container's PATH."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to (and overriding) the container's own environment."""
    cwd: str = ""
    """Working directory inside the container; "" means the container's work dir."""
    shell: str = ""
    """The caller's text when the command was asked for as a ``shell`` line
    (argv is then the shell running it): kept so that a background process's
    command comes back as it was asked for, not as the argv that ran it."""

    @classmethod
    def from_shell(cls, line: str, *, env: Mapping[str, str] | None = None, cwd: str = "") -> CommandSpec:
        """A command asked for as a shell line: SHELL runs it."""
        return cls(argv=(SHELL, "-c", line), env=dict(env or {}), cwd=cwd, shell=line)

    def to_record(self) -> dict[str, Any]:
        """The JSON form a backend keeps with a background process: the shell
        line or the argv (not both: a long line would be kept twice)."""
        what: dict[str, Any] = {"shell": self.shell} if self.shell else {"argv": list(self.argv)}
        return {**what, "env": dict(self.env), "cwd": self.cwd}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CommandSpec:
        """The inverse of ``to_record``."""
        env, cwd = dict(record.get("env", {})), str(record.get("cwd", ""))
        if record.get("shell"):
            return cls.from_shell(str(record["shell"]), env=env, cwd=cwd)
        return cls(argv=tuple(record.get("argv", ())), env=env, cwd=cwd)

    def check(self, field: str = "command") -> None:
        """InvalidField (naming ``field``'s part) unless every backend can run
        this as given: a program named, no NUL anywhere, variable names of
        ENV_NAME, an absolute or empty cwd. The Hub checks at its door and the
        drivers again, for callers that reach them directly."""
        if not self.argv or not self.argv[0]:
            raise InvalidField(f"{field}.argv", "must name a program (argv[0] is empty)")
        what = "shell" if self.shell else "argv"
        if any("\0" in t for t in self.argv):
            raise InvalidField(f"{field}.{what}", "contains a NUL character")
        if "\0" in self.cwd:
            raise InvalidField(f"{field}.cwd", "contains a NUL character")
        for key, value in self.env.items():
            if "\0" in key or "\0" in value:
                raise InvalidField(f"{field}.env[{key}]", "contains a NUL character")
            if not ENV_NAME.match(key):
                raise InvalidField(f"{field}.env[{key}]", f"{key!r} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if self.cwd and not self.cwd.startswith("/"):
            raise InvalidField(f"{field}.cwd", "must be an absolute path")


@dataclass(frozen=True)
class PtySize:
    rows: int
    cols: int


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int = 0
    """The exit code when the process exited by itself, else 0."""
    signal: int = 0
    """The signal number that ended the process, 0 if it exited."""


@dataclass(frozen=True)
class OutputChunk:
    stream: Stream
    data: bytes


class RunningProcess(Protocol):
    """A process started by ``spawn``, tied to its caller: ``kill`` (or the
    Hub going away) ends it and every process it started."""

    @property
    def pid(self) -> int:
        """The process's pid as seen inside the container."""

    async def write_stdin(self, data: bytes) -> None:
        """Writes all of ``data``; waits while the process doesn't read (flow
        control). Raises BrokenPipeError once the process closed its stdin."""

    async def close_stdin(self) -> None: ...

    async def read(self, max_bytes: int = 65536) -> OutputChunk | None:
        """What the process wrote next, on either stream, as soon as any is
        there; None once both streams are at end of file. Nothing is buffered
        beyond the pipe: a caller that doesn't read makes the process wait."""

    async def resize(self, size: PtySize) -> None:
        """Resizes the PTY; does nothing without one."""

    async def signal(self, signum: int) -> None:
        """Sends ``signum`` to the process's whole process group."""

    async def wait(self) -> ExitInfo: ...

    async def kill(self) -> None:
        """SIGKILLs the process group and frees what the process held. Idempotent."""


@dataclass(frozen=True)
class ProcessInfo:
    """A background process, as kept by the driver."""

    process_id: str
    command: CommandSpec
    pid: int
    start_time: float
    """Unix time the process started."""
    exit: ExitInfo | None = None
    """None while it runs."""
    end_time: float = 0.0
    stdout_bytes: int = 0
    """Total bytes the process wrote to stdout since it started."""
    stderr_bytes: int = 0
    stdout_first_offset: int = 0
    """Offset of the oldest stdout byte still kept (older output was dropped)."""
    stderr_first_offset: int = 0


@dataclass(frozen=True)
class OutputRead:
    offset: int
    """Offset of data[0]; larger than the asked offset when older output was dropped."""
    data: bytes
    dropped_before: bool
    """True when output between the asked offset and ``offset`` is gone."""


class ExecDriver(Protocol):
    @property
    def toolbox(self) -> str:
        """A static busybox inside every container of this backend (the Hub's
        file transfers use its applets), or "" to use the image's own tools."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def spawn(
        self, *, container_id: str, command: CommandSpec, pty: PtySize | None = None
    ) -> RunningProcess:
        """Starts ``command`` inside the container with pipes (or a PTY, whose
        output all arrives as stdout). Raises ContainerNotRunning,
        ContainerNotFound, or InvalidField when argv[0] can't be run."""

    async def start_background(
        self, *, container_id: str, process_id: str, command: CommandSpec
    ) -> tuple[ProcessInfo, bool]:
        """Starts a process that belongs to the container, not to the caller;
        its output is kept in a bounded buffer per stream. Starting an id that
        exists returns the existing one and False."""

    async def get_background(self, *, container_id: str, process_id: str) -> ProcessInfo:
        """Raises ProcessNotFound."""

    async def list_background(self, *, container_id: str) -> list[ProcessInfo]:
        """Ordered by start time, then id."""

    async def signal_background(self, *, container_id: str, process_id: str, signum: int) -> ProcessInfo: ...

    async def out_of_pids(self, *, container_id: str) -> bool:
        """True when the container holds as many processes as its limit allows:
        a command that failed without a word (a shell that could not fork
        may not even say so) is then told apart from one that really failed.
        False when the backend can't tell."""

    async def read_output(
        self, *, container_id: str, process_id: str, stream: Stream, offset: int, max_bytes: int
    ) -> OutputRead:
        """Output from ``offset`` on, at most ``max_bytes``; empty data when
        nothing newer exists yet (the caller polls or waits)."""
