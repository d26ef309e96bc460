"""`sandhub bench matrix`: arguments in, BENCHMARKS.md (+ chart, + JSON) out.

Exit codes as the other bench commands: 0 every container of sandhub and
the floor succeeded and nothing was left behind; 1 a failed container of
theirs, a leftover of any target or a target not run; 130 interrupted
(after cleaning up; BENCHMARKS.md is then not written). Docker's failed
containers are results (the reference giving up under load), listed in
BENCHMARKS.md, and don't change the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from sandhub.bench.signals import until_signalled
from sandhub.bench.matrix import TARGETS, Matrix, MatrixOptions, cells, estimated_s, run_matrix

QUICK_GRADUAL = (1, 20, 100)


def _sizes(text: str) -> tuple[int, ...]:
    if text.strip() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,20,100, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be at least 1")
    return sizes


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = set(names) - set(TARGETS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"targets are {', '.join(TARGETS)}; got {text!r}")
    return names


def add_parser(sub: Any) -> None:
    defaults = MatrixOptions()
    m = sub.add_parser(
        "matrix",
        help="the original table (burst and gradual x sizes) for sandhub, the floor and Docker, into BENCHMARKS.md",
        description="Runs the basic scenario (create, then `ls /` --runs times) for every cell and target, one "
                    "target after the other per cell, then Hub CPU per 1,000 RPCs; writes BENCHMARKS.md and a PNG "
                    "chart. Default: the whole original table, burst and gradual x 1,20,100,1000 (about 75 min on "
                    "2 cores, gradual x 1,000 alone 17 min per target); --quick leaves gradual x 1,000 out (about "
                    "25 min).",
    )
    m.add_argument("--burst-sizes", type=_sizes, default=defaults.burst_sizes, metavar="N,N",
                   help="containers per burst cell (one every 0.1 s); default 1,20,100,1000")
    m.add_argument("--gradual-sizes", type=_sizes, default=defaults.gradual_sizes, metavar="N,N",
                   help="containers per gradual cell (one every 1 s); default 1,20,100,1000; 'none' for no gradual cells")
    m.add_argument("--quick", action="store_true", help="gradual sizes 1,20,100: all but the 50-minute cell")
    m.add_argument("--targets", type=_targets, default=defaults.targets,
                   help="comma-separated of hub,floor,docker (default all three)")
    m.add_argument("--runs", type=int, default=defaults.runs, help="`ls /` runs per container (default 10)")
    m.add_argument("--rpc-calls", type=int, default=defaults.rpc_calls,
                   help="calls for Hub CPU per 1,000 RPCs (default 1000; 0 skips it)")
    m.add_argument("--memory-reserve", type=int, default=defaults.memory_reserve_mib, metavar="MIB",
                   help="ask for no container while the host's MemAvailable is below this (default "
                        f"{defaults.memory_reserve_mib}; 0 turns the check off): each is then a failed create")
    m.add_argument("--docker-network", choices=("bridge", "none"), default=defaults.docker_network,
                   help="Docker containers on a bridge of the bench's own (an address each, like sandhub's) or none")
    m.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"), help="markdown (default BENCHMARKS.md)")
    m.add_argument("--chart", type=Path, default=None,
                   help="PNG of the CCT distributions (default: BENCHMARKS-cct.png beside --output)")
    m.add_argument("--json-out", type=Path, default=None, help="also write every number (and CCT values) as JSON")
    m.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                   help="measure nothing: write the markdown and chart of a run saved with --json-out")
    m.add_argument("--log-level", default="warning", help="of in-process services (default warning)")
    m.set_defaults(func=cmd_matrix)


def cmd_matrix(args: argparse.Namespace) -> int:
    from sandhub import logs
    from sandhub.bench import matrix_report

    logs.configure(level=args.log_level)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        _write(args, data, started=str(data.get("started", "")))
        return 0
    options = MatrixOptions(
        burst_sizes=args.burst_sizes, gradual_sizes=QUICK_GRADUAL if args.quick else args.gradual_sizes,
        targets=args.targets, runs=args.runs, rpc_calls=args.rpc_calls, docker_network=args.docker_network,
        memory_reserve_mib=max(0, args.memory_reserve),
    )
    plan = cells(options.burst_sizes, options.gradual_sizes)
    command = "sandhub bench matrix " + shlex.join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "matrix"] else ""
    print(f"{len(plan)} cells x {len(options.targets)} targets; the schedule alone takes "
          f"{estimated_s(plan, len(options.targets)) / 60:.0f} min", file=sys.stderr)
    matrix = Matrix(options=options, command=command.strip() or "sandhub bench matrix")
    asyncio.run(_main(matrix, progress=sys.stderr.isatty()))
    data = matrix.to_json()
    if args.json_out:
        args.json_out.write_text(json.dumps(data, indent=1))
    if matrix.interrupted:
        print("interrupted: everything created was deleted; BENCHMARKS.md not written", file=sys.stderr)
        print(matrix_report.markdown(data))
        return 130
    _write(args, data, started=matrix.started)
    return 1 if matrix.failed else 0


def _write(args: argparse.Namespace, data: dict[str, Any], *, started: str) -> None:
    """BENCHMARKS.md (keeping its hand-written tail) and the chart beside it."""
    from sandhub.bench import matrix_report
    from sandhub.bench.chart import ChartUnavailable, write_chart

    chart_path = args.chart or args.output.with_name(matrix_report.CHART_NAME)
    chart, note = "", ""
    try:
        write_chart(matrix_report.by_cell(data["runs"]), chart_path,
                    title=f"sandhub bench matrix, {started}: CCT per cell")
        chart = _relative(chart_path, args.output.parent)
    except ChartUnavailable as e:
        note = f"No chart: {e}."
    old = args.output.read_text() if args.output.exists() else None
    text = matrix_report.markdown(data, chart=chart, chart_note=note)
    args.output.write_text(matrix_report.merge_kept(text, old))
    print(text)
    print(f"wrote {args.output}" + (f" and {chart_path}" if chart else ""), file=sys.stderr)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


async def _main(matrix: Matrix, *, progress: bool) -> None:
    """SIGINT or SIGTERM: the running cell cleans up first."""
    await until_signalled(run_matrix(matrix, say=lambda s: print(s, file=sys.stderr, flush=True), progress=progress))
