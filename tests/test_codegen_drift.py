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
