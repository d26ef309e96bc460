"""Every .proto sets the language options other languages' generators need.

Buf's lint has no rule requiring them (STANDARD and COMMENTS don't), so this
test is `make lint`'s check for them: without `go_package`, plain
`protoc --go_out` fails ("unable to determine Go import path"). The options
are read from the generated Python modules' descriptors, and every .proto
under proto/ must have a generated module (the drift test keeps them current).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def _file_options(rel: str) -> descriptor_pb2.FileOptions:
    module = importlib.import_module(rel.removesuffix(".proto").replace("/", ".") + "_pb2")
    options = module.DESCRIPTOR.GetOptions()
    assert isinstance(options, descriptor_pb2.FileOptions)
    return options


def _package(rel: str) -> list[str]:
    # sandhub/exec/v1/exec.proto -> ["sandhub", "exec", "v1"]
    return rel.split("/")[:-1]


def test_there_are_protos() -> None:
    assert len(PROTOS) >= 3, PROTOS


@pytest.mark.parametrize("rel", PROTOS)
def test_language_options_are_set(rel: str) -> None:
    options = _file_options(rel)
    missing = [name for name in ("go_package", "java_package", "java_multiple_files", "csharp_namespace")
               if not options.HasField(name)]
    assert not missing, f"{rel} lacks option(s) {missing}"
    assert options.java_multiple_files, f"{rel}: java_multiple_files must be true"


@pytest.mark.parametrize("rel", PROTOS)
def test_language_options_follow_the_package(rel: str) -> None:
    """Names derive from the proto package, so a new file can't copy another's."""
    options = _file_options(rel)
    pkg = _package(rel)  # e.g. sandhub, exec, v1
    go_path, _, go_name = options.go_package.partition(";")
    assert go_path.endswith("/gen/go/" + "/".join(pkg)), options.go_package
    assert go_name == pkg[-2] + pkg[-1], options.go_package
    assert options.java_package == "dev." + ".".join(pkg), options.java_package
    assert options.csharp_namespace == ".".join(p[:1].upper() + p[1:] for p in pkg), options.csharp_namespace


def _messages() -> list[object]:
    from google.protobuf import descriptor

    found: list[descriptor.Descriptor] = []

    def walk(m: descriptor.Descriptor) -> None:
        found.append(m)
        for nested in m.nested_types:
            walk(nested)

    for rel in PROTOS:
        module = importlib.import_module(rel.removesuffix(".proto").replace("/", ".") + "_pb2")
        for m in module.DESCRIPTOR.message_types_by_name.values():
            walk(m)
    return found


def test_no_oneof_member_is_typed_by_a_message_nested_under_its_own_name() -> None:
    """protoc-gen-go names a oneof wrapper <Message>_<Field>; a nested message
    <Message>.<Field> gets the same Go name, so Go appends "_" to one of them
    (ExecRequest_Start_). The oneofs' message types live at the top level."""
    clashes = []
    for m in _messages():
        nested = {n.name for n in m.nested_types}  # type: ignore[attr-defined]
        for oneof in m.oneofs:  # type: ignore[attr-defined]
            for f in oneof.fields:
                camel = "".join(p[:1].upper() + p[1:] for p in f.name.split("_"))
                if camel in nested:
                    clashes.append(f"{m.full_name}.{f.name}")  # type: ignore[attr-defined]
    assert not clashes, clashes


def test_one_name_for_one_thing() -> None:
    """A container id is `container_id` in every message, and an ExitStatus is
    `exit_status` wherever it appears (issue 13 found four names for it)."""
    wrong = []
    for m in _messages():
        for f in m.fields:  # type: ignore[attr-defined]
            if f.message_type is not None and f.message_type.full_name == "sandhub.exec.v1.ExitStatus" \
                    and f.name != "exit_status":
                wrong.append(f"{f.full_name}: an ExitStatus must be named exit_status")
            if f.name == "id":
                wrong.append(f"{f.full_name}: name the id for what it identifies (container_id, process_id)")
    assert not wrong, wrong
