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
