"""Generates the Python stubs of proto/ into a source root, or checks they match.

    python -m sandhub.codegen src            # (re)generate
    python -m sandhub.codegen --check src    # exit 1 if committed stubs drifted

Stubs land where their import path matches the proto package, so
``proto/sandhub/exec/v1/exec.proto`` becomes ``src/sandhub/exec/v1/exec_pb2.py``
importable as ``sandhub.exec.v1.exec_pb2``.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
INIT_TEXT = "# Generated package: do not edit; run `make gen`.\n"


def proto_files(proto_root: Path) -> list[Path]:
    return sorted(proto_root.rglob("*.proto"))


def generate(proto_root: Path, out_root: Path) -> list[Path]:
    """Runs protoc over every .proto; returns the generated files (relative)."""
    from grpc_tools import protoc  # dev dependency, only needed here

    include = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for rel in files:
        # Every directory from the package root down gets an __init__.py,
        # except the top-level "sandhub" package, which is first-party.
        parts = Path(rel).parent.parts
        for depth in range(2, len(parts) + 1):
            init = out_root.joinpath(*parts[:depth], "__init__.py")
            if not init.exists():
                init.write_text(INIT_TEXT)
    return sorted(
        p.relative_to(out_root)
        for p in out_root.rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def check(proto_root: Path, out_root: Path) -> list[str]:
    """Returns the differences between committed stubs and fresh ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(proto_root, Path(tmp))
        problems = []
        for rel in fresh:
            committed = out_root / rel
            if not committed.exists():
                problems.append(f"missing: {committed}")
            elif not filecmp.cmp(committed, Path(tmp) / rel, shallow=False):
                problems.append(f"differs: {committed}")
        fresh_set = {str(r) for r in fresh}
        for proto_pkg in {Path(name).parts[0] for name in fresh_set}:
            for path in (out_root / proto_pkg).rglob("*"):
                if path.name.endswith(GENERATED_SUFFIXES) and str(path.relative_to(out_root)) not in fresh_set:
                    problems.append(f"stale: {path}")
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_root", type=Path)
    parser.add_argument("--proto-root", type=Path, default=Path("proto"))
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.proto_root, args.out_root)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("generated stubs drifted from proto/: run `make gen`", file=sys.stderr)
            return 1
        return 0
    for rel in generate(args.proto_root, args.out_root):
        print(f"generated {args.out_root / rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
