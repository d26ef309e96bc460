"""The /bin/sh scripts the exec driver runs in a pod, and parsers of their
answers. No agent is baked into images: any image with /bin/sh and the
usual tools (head, tail, wc, mkfifo, date; busybox or coreutils) works.

Background processes are supervised by a shell in the container, under
``${TMPDIR:-/tmp}/.sandhub/p/<id>/``: ``pid``, ``start``, ``end``, ``exit``,
``cmd`` (the command as JSON) and each stream as numbered segments
(``out.N``, ``err.N``) that a reader loop fills from a FIFO with
``head -c SEGMENT``; once a segment is full, the one KEEP back is removed,
so output is a bounded ring (the newest KEEP segments, plus the one filling)
and byte offsets stay absolute (segment N starts at N*SEGMENT).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator_service.backends.exec_base import ENV_NAME, CommandSpec, ExitInfo, ProcessInfo

SEGMENT = 1 << 20
KEEP = 4
"""The last KEEP * SEGMENT bytes (4 MiB) at least, (KEEP + 1) * SEGMENT at most,
are kept per stream of a background process."""


_CHECK = (
    'if [ -n "$1" ]; then cd -- "$1" 2>/dev/null || { echo SANDHUB-NOCWD; exit 126; }; fi; shift; '
    'command -v -- "$1" >/dev/null 2>&1 || { echo SANDHUB-NOEXEC; exit 127; }; '
)
_ANNOUNCE = shlex.quote('echo "SANDHUB-PID $$"; exec "$@"')
WRAP = _CHECK + (
    f'exec 3<&0; if command -v setsid >/dev/null 2>&1; then setsid /bin/sh -c {_ANNOUNCE} sandhub "$@" 0<&3 3<&- & '
    f'else /bin/sh -c {_ANNOUNCE} sandhub "$@" 0<&3 3<&- & fi; '
    'exec 3<&-; wait "$!"'
)
"""Runs argv in cwd with the pid announced first (stdout's first line), or
says why it can't: so the driver knows the pid (for signals) and can refuse
an unknown program before the caller streams anything into it. The pid line
is written by the very process that then execs the command, so none of the
command's output can come before it (a fast command's output once did, and
was taken for a start error). The command leads a process group of its own
(setsid, where the image has it), so a signal or kill reaches everything it
started; the shell passes its exit status on (128+n after signal n). stdin
goes through fd 3: sh gives a background command /dev/null as stdin before
any redirection of its own."""
WRAP_TTY = _CHECK + 'echo "SANDHUB-PID $$"; exec "$@"'
"""With a PTY the runtime already makes the command a session leader."""


def exports(env: Mapping[str, str]) -> str:
    """``export K='v'; ...`` for the caller's environment, names checked."""
    for key in env:
        if not ENV_NAME.match(key):
            raise ValueError(key)
    return "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())


def wrapped(command: CommandSpec, *, tty: bool = False) -> list[str]:
    script = WRAP_TTY if tty else WRAP
    return ["/bin/sh", "-c", exports(command.env) + script, "sandhub", command.cwd, *command.argv]


def signal_argv(pid: int, signum: int) -> list[str]:
    """Signals the process group when the process leads one, else the process."""
    return ["/bin/sh", "-c", 'kill -s "$1" -- "-$2" 2>/dev/null || kill -s "$1" -- "$2"', "sandhub",
            str(signum), str(pid)]


_DIR = 'b="${TMPDIR:-/tmp}/.sandhub/p"; '

_STATS = (
    'stats() { lo=; hi=; for f in "$1".*; do [ -e "$f" ] || continue; i=${f##*.}; '
    'if [ -z "$lo" ] || [ "$i" -lt "$lo" ]; then lo=$i; fi; '
    'if [ -z "$hi" ] || [ "$i" -gt "$hi" ]; then hi=$i; fi; done; '
    'if [ -z "$hi" ]; then echo "0 0"; else echo "$((lo * $2)) $((hi * $2 + $(wc -c < "$1.$hi")))"; fi; }; '
)

_SHOW = (
    # Each value read once, an empty one (a file being written) taken as unknown:
    # a short line would make the process look absent.
    'show() { d=$1; [ -f "$d/cmd" ] || return 0; '
    'p=$(cat "$d/pid" 2>/dev/null); s=$(cat "$d/start" 2>/dev/null); '
    'x=$(cat "$d/exit" 2>/dev/null); e=$(cat "$d/end" 2>/dev/null); '
    'echo "P ${d##*/} ${p:-0} ${s:-0} ${e:-0} ${x:--} '
    '$(stats "$d/out" "$2") $(stats "$d/err" "$2")"; cat "$d/cmd"; echo; }; '
)

START = _DIR + (
    'id=$1; cwd=$2; seg=$3; keep=$4; cmd=$5; shift 5; d="$b/$id"; '
    'mkdir -p "$b" || exit 125; mkdir "$d" 2>/dev/null || { echo EXISTS; exit 0; }; '
    'if [ -n "$cwd" ]; then cd -- "$cwd" 2>/dev/null || { rm -rf "$d"; echo NOCWD; exit 0; }; fi; '
    'command -v -- "$1" >/dev/null 2>&1 || { rm -rf "$d"; echo NOEXEC; exit 0; }; '
    'mkfifo "$d/o" "$d/e" || exit 125; '
    'ring() { n=0; while :; do head -c "$seg" > "$2.$n"; [ -s "$2.$n" ] || { rm -f "$2.$n"; break; }; '
    'rm -f "$2.$((n - keep))"; n=$((n + 1)); done < "$1"; }; '
    '( ring "$d/o" "$d/out" & ring "$d/e" "$d/err" & '
    'date +%s > "$d/start"; "$@" < /dev/null > "$d/o" 2> "$d/e" & pid=$!; echo "$pid" > "$d/pid"; '
    'printf "%s" "$cmd" > "$d/cmd"; wait "$pid"; rc=$?; wait; '
    'date +%s > "$d/end.t"; mv "$d/end.t" "$d/end"; echo "$rc" > "$d/exit.t"; mv "$d/exit.t" "$d/exit" '
    ') < /dev/null > /dev/null 2>&1 & '
    'while [ ! -f "$d/cmd" ]; do sleep 0.01 2>/dev/null || sleep 1; done; echo STARTED'
)
"""argv: id cwd segment keep command-json program args..."""

LIST = _DIR + _STATS + _SHOW + 'for d in "$b"/*; do [ -d "$d" ] && show "$d" "$1"; done; exit 0'
"""argv: segment. One "P id pid start end exit out_lo out_hi err_lo err_hi" line
and one JSON line per process."""

GET = _DIR + _STATS + _SHOW + '[ -f "$b/$1/cmd" ] || exit 3; show "$b/$1" "$2"'
"""argv: id segment. Exit 3: no such process."""

READ = _DIR + (
    'base="$b/$1/$2"; off=$3; max=$4; seg=$5; [ -f "$b/$1/cmd" ] || exit 3; lo=; '
    'for f in "$base".*; do [ -e "$f" ] || continue; i=${f##*.}; '
    'if [ -z "$lo" ] || [ "$i" -lt "$lo" ]; then lo=$i; fi; done; '
    'if [ -n "$lo" ] && [ "$off" -lt "$((lo * seg))" ]; then off=$((lo * seg)); fi; '
    'echo "R $off"; k=$((off / seg)); pos=$((off % seg)); left=$max; '
    'while [ "$left" -gt 0 ] && [ -e "$base.$k" ]; do sz=$(wc -c < "$base.$k"); n=$((sz - pos)); '
    'if [ "$n" -gt "$left" ]; then n=$left; fi; '
    'if [ "$n" -gt 0 ]; then tail -c "+$((pos + 1))" "$base.$k" | head -c "$n"; left=$((left - n)); fi; '
    'if [ "$sz" -lt "$seg" ]; then break; fi; k=$((k + 1)); pos=0; done'
)
"""argv: id out|err offset max segment. "R offset" line, then the bytes. Exit 3: no such process."""

SIGNAL = _DIR + '[ -f "$b/$1/pid" ] || exit 3; kill -s "$2" -- "$(cat "$b/$1/pid")" 2>/dev/null; exit 0'
"""argv: id signum. Exit 3: no such process."""


def sh(script: str, *args: str) -> list[str]:
    return ["/bin/sh", "-c", script, "sandhub", *args]


@dataclass(frozen=True)
class ReadAnswer:
    offset: int
    data: bytes


def parse_read(out: bytes) -> ReadAnswer:
    head, _, data = out.partition(b"\n")
    words = head.split()
    if len(words) != 2 or words[0] != b"R":
        raise ValueError(f"unexpected answer {head[:80]!r}")
    return ReadAnswer(int(words[1]), data)


def parse_processes(out: bytes) -> list[ProcessInfo]:
    lines = out.decode(errors="replace").split("\n")
    found: list[ProcessInfo] = []
    for i, line in enumerate(lines):
        words = line.split()
        if len(words) != 10 or words[0] != "P" or i + 1 >= len(lines):
            continue
        _, pid_, pid, start, end, code, out_lo, out_hi, err_lo, err_hi = words
        cmd = json.loads(lines[i + 1] or "{}")
        exit_info = None
        if code != "-":
            rc = int(code)
            exit_info = ExitInfo(signal=rc - 128) if rc > 128 else ExitInfo(exit_code=rc)
        found.append(ProcessInfo(
            process_id=pid_,
            command=CommandSpec.from_record(cmd),
            pid=int(pid), start_time=float(start), exit=exit_info, end_time=float(end) if exit_info else 0.0,
            stdout_bytes=int(out_hi), stderr_bytes=int(err_hi),
            stdout_first_offset=int(out_lo), stderr_first_offset=int(err_lo),
        ))
    return sorted(found, key=lambda p: (p.start_time, p.process_id))


def command_json(command: CommandSpec) -> str:
    return json.dumps(command.to_record(), separators=(",", ":"))


def start_argv(process_id: str, command: CommandSpec) -> list[str]:
    prefix = exports(command.env)
    return sh(prefix + START, process_id, command.cwd, str(SEGMENT), str(KEEP), command_json(command),
              *command.argv)
