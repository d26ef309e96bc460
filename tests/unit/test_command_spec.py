"""One set of rules for a command, checked by the Hub at its door
(commands.command_spec, naming the request's field) and by every exec driver
(CommandSpec.check) for callers that reach a driver directly."""

from __future__ import annotations

import pytest

from hub_service.exec.commands import command_proto, command_spec
from orchestrator_service.backends.exec_base import CommandSpec
from sandhub.config import ExecLimits
from sandhub.errors import InvalidField
from sandhub.exec.v1 import exec_pb2 as pb


@pytest.mark.parametrize(("spec", "field", "words"), [
    (CommandSpec(argv=()), "command.argv", "must name a program"),
    (CommandSpec(argv=("",)), "command.argv", "must name a program"),
    (CommandSpec(argv=("ls", "a\0b")), "command.argv", "NUL"),
    (CommandSpec(argv=("ls",), cwd="/tmp\0"), "command.cwd", "NUL"),
    (CommandSpec(argv=("ls",), env={"A": "x\0"}), "command.env[A]", "NUL"),
    (CommandSpec(argv=("ls",), env={"A=B": "x"}), "command.env[A=B]", "not a valid variable name"),
    (CommandSpec(argv=("ls",), env={"1A": "x"}), "command.env[1A]", "not a valid variable name"),
    (CommandSpec(argv=("ls",), env={"": "x"}), "command.env[]", "not a valid variable name"),
    (CommandSpec(argv=("ls",), env={"A\n": "x"}), "command.env[A\n]", "not a valid variable name"),
    (CommandSpec(argv=("ls",), cwd="work"), "command.cwd", "absolute"),
    (CommandSpec.from_shell("echo \0"), "command.shell", "NUL"),
])
def test_a_command_no_backend_can_run_is_refused_naming_the_field(spec: CommandSpec, field: str, words: str) -> None:
    with pytest.raises(InvalidField) as refused:
        spec.check()
    assert refused.value.field == field and words in str(refused.value)


def test_a_good_command_passes() -> None:
    CommandSpec(argv=("ls", "-l", ""), env={"_A1": "", "PATH": "/bin"}, cwd="/work").check()


def test_the_hub_names_the_requests_own_field_and_adds_its_size_limit() -> None:
    limits = ExecLimits()
    with pytest.raises(InvalidField) as refused:
        command_spec(pb.Command(argv=["ls"], env={"bad-name": "1"}), limits, field="start.command")
    assert refused.value.field == "start.command.env[bad-name]"
    with pytest.raises(InvalidField, match="give either argv or shell"):
        command_spec(pb.Command(argv=["ls"], shell="ls"), limits)
    with pytest.raises(InvalidField, match="bytes; at most"):
        command_spec(pb.Command(argv=["x" * (limits.max_command_bytes + 1)]), limits)
    shell = command_spec(pb.Command(shell="echo hi"), limits)
    assert shell == CommandSpec(argv=("/bin/sh", "-c", "echo hi"), shell="echo hi")


def test_a_shell_command_comes_back_as_it_was_asked_for() -> None:
    """Kept with a background process and read back (both backends keep the
    record), a `shell` command is `shell` again, not the argv that ran it."""
    limits = ExecLimits()
    for asked in (pb.Command(shell="echo $HOME; sleep 1", env={"A": "1"}, cwd="/tmp"),
                  pb.Command(argv=["sh", "-c", "echo hi"], env={"B": "2"})):
        kept = CommandSpec.from_record(command_spec(asked, limits).to_record())
        assert command_proto(kept) == asked
        assert kept.argv == command_spec(asked, limits).argv  # and it still runs the same way
