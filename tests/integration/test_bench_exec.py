"""`sandhub bench exec` runs end to end and leaves nothing behind (figures are printed, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def test_bench_exec_measures_every_path() -> None:
    if os.geteuid() != 0:
        pytest.fail("the bench creates containers and needs root (CI runs as root)")
    done = subprocess.run([sys.executable, "-m", "sandhub.cli.main", "bench", "exec", "--runs", "3",
                           "--upload-mib", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["failures"] == []
    assert {k: len(v) for k, v in result["ls_ms"].items()} == {"hub": 3, "nsenter": 3}
    assert all(v > 0 for values in result["ls_ms"].values() for v in values)
    assert set(result["upload_mb_s"]) == {"plain_grpc", "put_files", "get_files"}
    assert all(len(v) == 3 and min(v) > 0 for v in result["upload_mb_s"].values())
