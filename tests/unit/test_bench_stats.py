"""sandhub bench: percentiles, summaries, histograms, report and ratios. Pure logic."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sandhub.bench import host, report
from sandhub.bench.results import MemorySample, Results
from sandhub.bench.stats import BAR, buckets, histogram, percentile, summarize
from sandhub.bench.target import not_running


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile([10], 99) == 10
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summary() -> None:
    s = summarize([3.0, 1.0, 2.0])
    assert s is not None
    assert (s.count, s.min, s.p50, s.max, s.mean) == (3, 1.0, 2.0, 3.0, 2.0)
    assert summarize([]) is None


def test_buckets_hold_every_value_once() -> None:
    values = [1.0, 1.5, 2.0, 9.9, 10.0, 10.0]
    bs = buckets(values, 9)
    assert len(bs) == 9
    assert sum(b.count for b in bs) == len(values)
    assert bs[0].count == 3 and bs[-1].count == 3  # 1, 1.5, 2 in the first; 9.9, 10, 10 in the last
    assert bs[-1].upper == 10.0
    assert [b.upper for b in bs] == sorted(b.upper for b in bs)


def test_buckets_of_equal_values_is_one_bucket() -> None:
    bs = buckets([5.0, 5.0, 5.0])
    assert len(bs) == 1 and bs[0].count == 3 and bs[0].upper == 5.0


def test_histogram_one_bar_per_bucket_scaled_to_the_fullest() -> None:
    values = [1.0] * 40 + [2.0] * 20 + [10.0]
    lines = histogram(values, n=9, width=40)
    assert len(lines) == 9
    bars = [line.split("|", 1)[1] for line in lines]
    assert bars[0] == BAR * 40  # the fullest bucket: 1.0 and 2.0 share it with n=9 over 1..10
    assert bars[-1] == BAR  # one value still shows
    assert all(b == "" for b in bars[1:-1])
    counts = [int(line.split("[")[1].split("]")[0]) for line in lines]
    assert sum(counts) == len(values)
    # labels, counts and bars line up in columns
    assert len({line.index("[") for line in lines}) == 1
    assert len({line.index("|") for line in lines}) == 1


def test_histogram_of_nothing_is_empty() -> None:
    assert histogram([]) == []


def _results(target: str, cct: list[float]) -> Results:
    r = Results(command="spawn", target=target, target_detail=target, scenario="create",
                params={"n": len(cct), "interval_s": 0.1, "concurrency_cap": 8})
    m = r.metric("cct", "ms", "creation time")
    for v in cct:
        m.add(v)
    return r


def test_report_text_and_json_agree_and_failures_fail_the_run() -> None:
    r = _results("hub", [10.0, 20.0, 30.0])
    r.metrics["cct"].fail("UNAVAILABLE: down")
    r.memory = MemorySample(containers=2, cgroup_bytes=2 * 2**20, pss_bytes=None, processes=0,
                            host_available_delta_bytes=4 * 2**20)
    text = report.text(r)
    assert "cct (ms)" in text and "p50 20.0" in text and "failures 1" in text
    assert "failed 1 x UNAVAILABLE: down" in text
    assert "cgroup 1.00 MiB" in text and "PSS - MiB" in text
    data = report.to_json(r)
    assert data["metrics"]["cct"]["summary"]["p50"] == 20.0
    assert data["metrics"]["cct"]["failure_reasons"] == {"UNAVAILABLE: down": 1}
    assert data["memory"]["per_container_mib"]["host_available_delta"] == 2.0
    assert data["ok"] is False
    assert report.to_json(_results("hub", [1.0]))["ok"] is True


def test_ratios_between_two_runs() -> None:
    hub = report.to_json(_results("hub", [20.0, 40.0]))
    floor = report.to_json(_results("floor", [10.0, 10.0]))
    got = report.ratios(hub, floor)
    assert got["cct"]["p50"] == pytest.approx(3.0)
    assert "ratio hub/floor" in report.ratio_text(hub, floor)[0]
    # the floor run comparing against the hub run still says sandhub/floor
    assert report.ratio_text(floor, hub) == report.ratio_text(hub, floor)


def test_cgroup_index_finds_containers_one_or_two_levels_under_the_parent(tmp_path: Path) -> None:
    for d in ("memory/sandhub/cnt-aaaaaaaaaaaa", "pids/sandhub/3f2a/cnt-bbbbbbbbbbbb", "memory/other/cnt-cccccccccccc"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "memory/sandhub/cnt-aaaaaaaaaaaa/memory.usage_in_bytes").write_text("4096\n")
    index = host.cgroup_index("sandhub", root=tmp_path)
    assert index["cnt-aaaaaaaaaaaa"] == [tmp_path / "memory/sandhub/cnt-aaaaaaaaaaaa"]
    assert index["cnt-bbbbbbbbbbbb"] == [tmp_path / "pids/sandhub/3f2a/cnt-bbbbbbbbbbbb"]
    assert "cnt-cccccccccccc" not in index
    assert host.memory_cgroup(index["cnt-aaaaaaaaaaaa"]) == (tmp_path / "memory/sandhub/cnt-aaaaaaaaaaaa",
                                                            "memory.usage_in_bytes")
    assert host.memory_cgroup(index["cnt-bbbbbbbbbbbb"]) is None


def test_not_running_reason_is_the_same_for_the_same_cause() -> None:
    a = not_running("FAILED", "StartFailed", "the sandbox did not start (bwrap exit 1)\nmore")
    assert a == "container is FAILED (StartFailed: the sandbox did not start (bwrap exit 1))"
    assert not_running("FAILED", "", "") == "container is FAILED (no reason)"
    assert not_running("FAILED", "X", "cnt-aaaaaaaaaaaa died") == not_running("FAILED", "X", "cnt-bbbbbbbbbbbb died")


def _counted(cid: str, argv: list[str], env: dict[str, str] | None, proc_file: str) -> dict[str, set[str]]:
    """Which containers host.container_processes credits a helper process to,
    once it has exec'd (before, /proc shows this process's command line)."""
    import subprocess
    import sys

    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv], env=env)
    try:
        shown = Path(f"/proc/{helper.pid}/{proc_file}")
        for _ in range(500):
            if cid.encode() in shown.read_bytes():
                break
            time.sleep(0.01)
        found = host.container_processes([cid, "e" * 64], "no-such-cgroup-parent")
        return {k: {"helper" if p == helper.pid else str(p) for p in v} for k, v in found.items()}
    finally:
        helper.kill()
        helper.wait()


def test_a_process_given_the_container_id_as_an_argument_counts_as_the_containers() -> None:
    """Docker's containerd-shim-runc-v2 -id <id> lives outside the container's
    cgroup; its memory is the container's all the same (and a shim still alive
    after cleanup is a leftover)."""
    cid = "f" * 64
    assert _counted(cid, ["-id", cid], None, "cmdline") == {cid: {"helper"}, "e" * 64: set()}


def test_bwrap_named_by_its_environment_counts_as_the_containers() -> None:
    """sandhub's bwrap (outside the container's cgroup) carries the id as its
    whole environment, on no command line."""
    cid = "cnt-aaaaaaaaaaaa"
    assert _counted(cid, [], {"SANDHUB_CONTAINER_ID": cid}, "environ") == {cid: {"helper"}, "e" * 64: set()}
