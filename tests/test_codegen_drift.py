"""The committed stubs must be what `make gen` makes from proto/ today."""

import shutil
from pathlib import Path

from sandhub.codegen import check

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_protos() -> None:
    assert check(ROOT / "proto", ROOT / "src") == []


def test_drift_is_detected(tmp_path: Path) -> None:
    proto = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto)
    target = proto / "sandhub" / "orchestrator" / "v1" / "orchestrator.proto"
    target.write_text(target.read_text().replace("string request_id = 19;", "string request_id = 19;\n  string added = 20;"))
    problems = check(proto, ROOT / "src")
    assert any("orchestrator_pb2.py" in p for p in problems)


def test_committed_go_stubs_match_protos(tmp_path: Path) -> None:
    """gen/go is what `make gen` makes: buf with the go.mod-pinned plugins."""
    import os
    import subprocess

    import pytest

    buf = os.environ.get("SANDHUB_BUF")
    if not buf or not os.path.exists(buf):
        pytest.fail("SANDHUB_BUF is not set to a built buf; run through `make test`")
    subprocess.run(
        [buf, "generate", "proto", "--template", "proto/buf.gen.go.yaml", "-o", str(tmp_path)],
        cwd=ROOT, check=True, timeout=600,
    )
    made = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "gen").rglob("*") if p.is_file()}
    committed = {p.relative_to(ROOT): p.read_bytes() for p in (ROOT / "gen").rglob("*") if p.is_file()}
    assert made.keys() == committed.keys()
    stale = sorted(str(k) for k in made if made[k] != committed[k])
    assert not stale, f"stale Go stubs (run `make gen`): {stale}"
