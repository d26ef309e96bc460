"""`sandhub bench matrix` without containers: the plan, the per-cell summary,
the markdown (against literal lines), the kept hand-written tail, the chart,
and the matrix run over in-memory targets. No numbers are asserted as
timings; the fake targets report fixed ones."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sandhub.bench import matrix_report
from sandhub.bench.chart import ChartUnavailable, write_chart
from sandhub.bench.matrix import Cell, Matrix, MatrixOptions, cells, estimated_s, rotated, run_matrix, summarize_cell
from sandhub.bench.matrix_cli import _sizes
from sandhub.bench.scenarios import NOT_CREATED
from sandhub.bench.target import Created, CreateParams, FileToPut, RunResult, TargetError


def test_plan_burst_then_gradual_and_its_schedule() -> None:
    plan = cells((1, 20), (1,))
    assert plan == [Cell("burst", 1), Cell("burst", 20), Cell("gradual", 1)]
    assert [c.interval_s for c in plan] == [0.1, 0.1, 1.0]
    assert estimated_s(plan, 3) == pytest.approx((0.1 + 2.0 + 1.0) * 3)
    assert [rotated(["hub", "floor", "docker"], i) for i in range(4)] == [
        ["hub", "floor", "docker"], ["floor", "docker", "hub"], ["docker", "hub", "floor"], ["hub", "floor", "docker"]]


def test_sizes_argument() -> None:
    assert _sizes("1,20,1000") == (1, 20, 1000)
    assert _sizes("none") == ()
    with pytest.raises(Exception):
        _sizes("0")


def run_json(target: str, *, cct: Sequence[float], ls: Sequence[float], failures: Mapping[str, int] | None = None,
             memory: dict[str, Any] | None = None) -> dict[str, Any]:
    """What report.to_json gives for a basic run, reduced to what the matrix
    reads; ``failures`` are failed creates (their later steps skipped)."""
    def metric(values: Sequence[float], fails: Mapping[str, int]) -> dict[str, Any]:
        summary = None
        if values:
            ordered = sorted(values)
            summary = {"p50": ordered[len(ordered) // 2], "p99": ordered[-1], "mean": sum(values) / len(values)}
        return {"count": len(values), "failures": sum(fails.values()), "failure_reasons": dict(fails),
                "summary": summary, "values": list(values)}

    skipped = {NOT_CREATED: sum((failures or {}).values())} if failures else {}
    return {
        "target": target, "target_detail": f"{target} detail", "leftovers": [], "interrupted": False,
        "wall_s": 1.0, "max_issue_lag_ms": 0.5, "memory": memory, "container_ids": [],
        "metrics": {"create": metric(cct, failures or {}), "cct": metric(cct, skipped), "ls": metric(ls, skipped),
                    "ls_mean": metric(ls, skipped)},
    }


def test_summarize_cell_takes_what_the_table_needs() -> None:
    row = summarize_cell(Cell("burst", 3), run_json("hub", cct=[10, 20, 30], ls=[5, 7],
                                                    failures={"UNAVAILABLE: x": 1}))
    assert row["mode"] == "burst" and row["n"] == 3 and row["target"] == "hub"
    assert (row["cct_p50_ms"], row["cct_p99_ms"], row["ls_mean_ms"]) == (20, 30, 6)
    # one failed container, listed once, by its cause (not by the steps it skipped)
    assert row["failures"] == 1 and row["failure_reasons"] == {"create: UNAVAILABLE: x": 1}
    assert row["cct_values"] == [10, 20, 30] and row["error"] == ""


def sample_matrix() -> dict[str, Any]:
    mem = {"containers": 20, "per_container_mib": {"cgroup": 0.4, "pss": 0.5, "host_available_delta": 1.25}}
    runs = [
        summarize_cell(Cell("burst", 20), run_json("hub", cct=[30, 40, 50], ls=[8, 12], memory=mem)),
        summarize_cell(Cell("burst", 20), run_json("floor", cct=[15, 20, 25], ls=[4, 4], memory=mem)),
        summarize_cell(Cell("burst", 20), run_json("docker", cct=[400, 800, 1000], ls=[100, 100],
                                                   failures={"Docker: boom": 2})),
        summarize_cell(Cell("gradual", 1), run_json("hub", cct=[30], ls=[10])),
        {"mode": "gradual", "n": 1, "interval_s": 1.0, "target": "docker", "target_detail": "",
         "error": "Docker: dockerd not found", "failures": 0, "failure_reasons": {}, "leftovers": 0,
         "interrupted": False, "cct_values": [], "memory": None},
    ]
    return {
        "command": "sandhub bench matrix --burst-sizes 20", "started": "2026-01-01 00:00 UTC",
        "machine": {"cpus": 2, "cpu_model": "Xeon", "memory_total_mib": 24576, "kernel": "6.1", "cgroup": "v1",
                    "python": "3.11.7", "load_before": [1.0, 2.0, 3.0], "load_after": [2.5, 2.0, 3.0]},
        "options": {"burst_sizes": [20], "gradual_sizes": [1]},
        "runs": runs,
        "rpc_cpu": {"calls": 1000, "concurrency": 4, "failures": 0, "run_wall_s": 9.5, "get_wall_s": 2.25,
                    "hub_per_1000_run_ms": 2500.0, "agent_per_1000_run_ms": 600.0,
                    "hub_per_1000_get_ms": 1200.0, "orchestrator_per_1000_get_ms": 800.0},
        "interrupted": False, "wall_s": 600, "notes": ["a note"],
    }


def test_markdown_table_ratios_memory_cpu_and_failures() -> None:
    text = matrix_report.markdown(sample_matrix(), chart="BENCHMARKS-cct.png")
    lines = text.splitlines()
    assert lines[0] == "# Benchmarks"
    assert "- 2 cores (Xeon), 24.0 GiB memory, Linux 6.1, cgroup v1, Python 3.11.7" in lines
    assert "- load average (1/5/15 min) 1.00 / 2.00 / 3.00 before, 2.50 / 2.00 / 3.00 after (10 min in all)" in lines
    assert "| burst | 20 | sandhub | 40.0 | 50.0 | 40.0 | 10.0 | 0 |" in lines
    assert "| burst | 20 | floor | 20.0 | 25.0 | 20.0 | 4.0 | 0 |" in lines
    assert "| burst | 20 | Docker | 800.0 | 1,000.0 | 800.0 | 100.0 | 2 |" in lines
    assert "| gradual | 1 | Docker | not run: Docker: dockerd not found | | | | |" in lines
    assert ("| mode | n | CCT p50 sandhub/floor | CCT p99 sandhub/floor | `ls /` mean sandhub/floor | "
            "CCT p50 sandhub/Docker | CCT p99 sandhub/Docker | `ls /` mean sandhub/Docker |") in lines
    assert "| burst | 20 | 2.00× | 2.00× | 2.50× | 0.05× | 0.05× | 0.10× |" in lines
    assert "| gradual | 1 | – | – | – | – | – | – |" in lines
    assert "![CCT per target and cell](BENCHMARKS-cct.png)" in lines
    assert "| sandhub | 20 | 0.40 | 0.50 | 1.25 |" in lines
    assert "| Run(`ls /`) × 1,000 | Hub | 2,500 | 9.5 |" in lines
    assert "| GetContainer × 1,000 | Orchestrator | 800 | |" in lines
    assert "- burst × 20, Docker:" in lines and "  - 2 × create: Docker: boom" in lines
    assert "- a note" in lines
    assert "interrupted" not in lines[2]


def test_markdown_of_an_interrupted_matrix_says_so_and_chart_note_replaces_chart() -> None:
    m = sample_matrix()
    m["interrupted"] = True
    m["rpc_cpu"] = None
    text = matrix_report.markdown(m, chart_note="No chart: matplotlib is not installed.")
    assert "— **interrupted, partial**" in text.splitlines()[2]
    assert "No chart: matplotlib is not installed." in text and "![" not in text
    assert "(not measured in this run)" in text


def test_hand_written_tail_is_kept_across_runs() -> None:
    old = "# Benchmarks\nold table\n\n" + matrix_report.KEEP_MARKER + "\n## Profiling\nfound X\n"
    merged = matrix_report.merge_kept("# Benchmarks\nnew table\n", old)
    assert merged == "# Benchmarks\nnew table\n\n" + matrix_report.KEEP_MARKER + "\n## Profiling\nfound X\n"
    assert matrix_report.merge_kept("new\n", "no marker here") == "new\n"
    assert matrix_report.merge_kept("new\n", None) == "new\n"


def test_chart_is_a_png_when_matplotlib_is_there(tmp_path: Path) -> None:
    """matplotlib is the optional `bench` extra: with it a PNG, without it a reason."""
    out = tmp_path / "c.png"
    data = matrix_report.by_cell(sample_matrix()["runs"])
    assert set(data) == {("burst", 20), ("gradual", 1)}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ChartUnavailable):
            write_chart(data, out, title="t")
        return
    write_chart(data, out, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class MemoryTarget:
    """In-memory containers; ``fail_start`` makes start fail like a missing dockerd."""

    cgroup_parent = ""

    def __init__(self, name: str, cct_ms: float, *, fail_start: str = "") -> None:
        self.name = name
        self._cct = cct_ms
        self._fail_start = fail_start
        self._ids = itertools.count(1)
        self.alive_ids: dict[str, dict[str, str]] = {}
        self.closed = False
        self.runs = 0

    @property
    def detail(self) -> str:
        return f"in-memory {self.name}"

    async def start(self) -> None:
        if self._fail_start:
            raise TargetError(self._fail_start)

    async def close(self) -> list[str]:
        self.closed = True
        return []

    async def create(self, params: CreateParams) -> Created:
        cid = f"{self.name}-{next(self._ids)}"
        self.alive_ids[cid] = dict(params.labels)
        return Created(cid, self._cct)

    async def put_files(self, container_id: str, files: Sequence[FileToPut]) -> None:
        raise TargetError("no uploads")

    async def run(self, container_id: str, argv: Sequence[str]) -> RunResult:
        self.runs += 1
        return RunResult(0, b"bin\n")

    async def start_process(self, container_id: str, process_id: str, argv: Sequence[str]) -> None:
        raise TargetError("no processes")

    async def delete(self, container_id: str) -> None:
        self.alive_ids.pop(container_id, None)

    async def alive(self, labels: Mapping[str, str]) -> list[str]:
        return [c for c, lab in self.alive_ids.items() if all(lab.get(k) == v for k, v in labels.items())]


async def test_matrix_runs_every_cell_on_every_target_and_records_an_unavailable_one() -> None:
    made: list[MemoryTarget] = []

    def factory(name: str) -> Any:
        t = MemoryTarget(name, {"hub": 30.0, "floor": 15.0}.get(name, 0.0),
                         fail_start="Docker: dockerd not found" if name == "docker" else "")
        made.append(t)
        return t

    m = Matrix(options=MatrixOptions(burst_sizes=(1, 3), gradual_sizes=(), runs=2, rpc_calls=0, settle_s=0),
               command="test")
    said: list[str] = []
    await run_matrix(m, factory=factory, say=said.append)
    assert [(r["mode"], r["n"], r["target"]) for r in m.runs] == [
        ("burst", 1, "hub"), ("burst", 1, "floor"), ("burst", 1, "docker"),
        ("burst", 3, "floor"), ("burst", 3, "docker"), ("burst", 3, "hub")]
    by = {(r["n"], r["target"]): r for r in m.runs}
    assert by[(3, "hub")]["cct_p50_ms"] == 30.0 and by[(3, "floor")]["cct_p50_ms"] == 15.0
    assert by[(3, "docker")]["error"] == "Docker: dockerd not found"
    assert all(t.closed and not t.alive_ids for t in made)  # everything deleted, every target closed
    assert sum(t.runs for t in made if t.name == "hub") == (1 + 3) * 2
    assert m.failed  # a target that did not run is a failure of the matrix
    assert m.machine["load_after"] is not None and not m.interrupted
    text = matrix_report.markdown(m.to_json())
    ratio_line = next(line for line in text.splitlines() if line.startswith("| burst | 3 | 2"))
    assert ratio_line.startswith("| burst | 3 | 2.00× | 2.00× | ")  # CCT from the fakes; `ls /` is timed
    assert ratio_line.endswith("| – | – | – |")  # no Docker numbers to divide by


def test_failure_reasons_are_grouped_with_request_ids_blanked() -> None:
    from sandhub.bench.matrix import grouped_reasons

    metrics = {"ls": {"failure_reasons": {
        "INTERNAL INTERNAL: internal error; quote request id 32640809c1454ba1 to the operator": 1,
        "INTERNAL INTERNAL: internal error; quote request id b927cdd5b2804da8 to the operator": 2,
    }}, "cct": {"failure_reasons": {"skipped: the container was not created": 4}}}
    assert grouped_reasons(metrics) == {  # skipped steps are consequences, not causes
        "ls: INTERNAL INTERNAL: internal error; quote request id ... to the operator": 3,
    }


def test_failed_containers_count_each_container_once() -> None:
    from sandhub.bench.matrix import failed_containers

    metrics = {
        "create": {"failures": 2, "failure_reasons": {"no answer": 2}},
        "cct": {"failures": 2, "failure_reasons": {NOT_CREATED: 2}},
        "ls": {"failures": 23, "failure_reasons": {NOT_CREATED: 20, "exited 1": 3}},
        "ls_mean": {"failures": 3, "failure_reasons": {NOT_CREATED: 2, "3 of 10 runs failed": 1}},
    }
    assert failed_containers(metrics) == 3


def test_docker_failures_are_results_but_measured_failures_fail_the_matrix() -> None:
    def matrix_with(target: str, failures: int, error: str = "", leftovers: int = 0) -> Matrix:
        m = Matrix(options=MatrixOptions(), command="test")
        m.runs = [{"target": target, "failures": failures, "error": error, "leftovers": leftovers}]
        return m

    assert not matrix_with("docker", 827).failed
    assert matrix_with("hub", 1).failed and matrix_with("floor", 1).failed
    assert matrix_with("docker", 0, error="Docker: dockerd not found").failed
    assert matrix_with("docker", 0, leftovers=1).failed
    assert not matrix_with("hub", 0).failed


def test_from_json_rewrites_markdown_and_keeps_the_hand_written_tail(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    saved = tmp_path / "m.json"
    saved.write_text(json.dumps(sample_matrix()))
    out = tmp_path / "B.md"
    out.write_text("# old\n\n" + matrix_report.KEEP_MARKER + "\nfindings by hand\n")
    sandhub = str(Path(sys.executable).parent / "sandhub")
    proc = subprocess.run([sandhub, "bench", "matrix", "--from-json", str(saved), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("# Benchmarks\n") and "# old" not in text
    assert text.endswith(matrix_report.KEEP_MARKER + "\nfindings by hand\n")
    assert "| burst | 20 | 2.00× | 2.00× | 2.50× | 0.05× | 0.05× | 0.10× |" in text
    assert "| burst | 20 | sandhub | 40.0 | 50.0 | 40.0 | 10.0 | 0 |" in text


def test_small_ratios_keep_two_significant_digits() -> None:
    from sandhub.bench.matrix_report import _ratio

    assert (_ratio(30, 10), _ratio(1, 10), _ratio(30, 11000), _ratio(None, 1), _ratio(1, 0)) == (
        "3.00×", "0.10×", "0.0027×", "–", "–")
