"""`sandhub bench agent-relay` runs end to end against the real agent (figures are printed, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.agent_harness import agent_binary


def test_bench_agent_relay_measures_every_path() -> None:
    agent_binary()  # a clear failure when it is not built
    done = subprocess.run([sys.executable, "-m", "sandhub.cli.main", "bench", "agent-relay", "--runs", "3",
                           "--upload-mib", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    result = json.loads(done.stdout)
    assert result["failures"] == []
    assert {k: len(v) for k, v in result["ls_ms"].items()} == {"hub": 3, "agent": 3, "subprocess": 3}
    # Go builds the agent, so it is here: the Go transfer client's rows too.
    assert set(result["upload_mb_s"]) == {"plain_grpc", "put_files", "get_files", "agent_put_files",
                                          "agent_get_files", "go_put_files", "go_get_files"}
    assert all(len(v) == 3 and min(v) > 0 for v in result["upload_mb_s"].values())
