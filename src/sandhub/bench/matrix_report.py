"""The matrix as markdown (BENCHMARKS.md): machine, table, ratios, memory,
Hub CPU, failures and method. Pure: a matrix's JSON in, text out.

Everything in an existing BENCHMARKS.md from KEEP_MARKER on (notes written
by hand, e.g. profiling findings) is kept when the file is written again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

KEEP_MARKER = "<!-- kept: everything below is written by hand and kept by `sandhub bench matrix` -->"
TARGET_ORDER = ("hub", "floor", "docker")
TARGET_NAMES = {"hub": "sandhub", "floor": "floor", "docker": "Docker"}
CHART_NAME = "BENCHMARKS-cct.png"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    """Two decimals, or two significant digits below 0.1 (sandhub/Docker)."""
    if a is None or b is None or b <= 0:
        return "–"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 or r == 0 else f"{r:.2g}×"


def _mib(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _rows(matrix: Mapping[str, Any]) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    """(mode, n) -> target -> run, in the order the cells ran."""
    out: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in matrix.get("runs", []):
        out.setdefault((r["mode"], int(r["n"])), {})[r["target"]] = r
    return out


def _targets(matrix: Mapping[str, Any]) -> list[str]:
    present = {r["target"] for r in matrix.get("runs", [])}
    return [t for t in TARGET_ORDER if t in present] + sorted(present - set(TARGET_ORDER))


def machine_lines(matrix: Mapping[str, Any]) -> list[str]:
    m = matrix.get("machine", {})

    def load(key: str) -> str:
        return " / ".join(f"{x:.2f}" for x in m.get(key) or []) or "?"

    lines = [
        f"- {m.get('cpus', '?')} cores ({m.get('cpu_model') or 'unknown CPU'}), "
        f"{m.get('memory_total_mib', 0) / 1024:.1f} GiB memory, Linux {m.get('kernel', '?')}, "
        f"cgroup {m.get('cgroup') or 'none'}, Python {m.get('python', '?')}",
        f"- load average (1/5/15 min) {load('load_before')} before, {load('load_after')} after "
        f"({matrix.get('wall_s', 0) / 60:.0f} min in all)",
    ]
    details = {}
    for r in matrix.get("runs", []):
        if r.get("target_detail") and r["target"] not in details:
            details[r["target"]] = r["target_detail"]
    for t in _targets(matrix):
        if t in details:
            lines.append(f"- {TARGET_NAMES.get(t, t)}: {details[t]}")
    return lines


def main_table(matrix: Mapping[str, Any]) -> list[str]:
    lines = [
        "| mode | n | target | CCT p50 (ms) | CCT p99 (ms) | create p50, client (ms) | `ls /` mean (ms) | failed containers |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (mode, n), by_target in _rows(matrix).items():
        for t in [t for t in _targets(matrix) if t in by_target]:
            r = by_target[t]
            name = TARGET_NAMES.get(t, t)
            if r.get("error"):
                lines.append(f"| {mode} | {n:,} | {name} | not run: {r['error']} | | | | |")
                continue
            fails = str(r["failures"]) + (f" (+{r['leftovers']} left behind)" if r.get("leftovers") else "")
            lines.append(f"| {mode} | {n:,} | {name} | {_ms(r.get('cct_p50_ms'))} | {_ms(r.get('cct_p99_ms'))} | "
                         f"{_ms(r.get('create_p50_ms'))} | {_ms(r.get('ls_mean_ms'))} | {fails} |")
    return lines


def ratio_table(matrix: Mapping[str, Any]) -> list[str]:
    """sandhub over the floor and over Docker, per cell, from the same run."""
    others = [t for t in ("floor", "docker") if t in _targets(matrix)]
    if "hub" not in _targets(matrix) or not others:
        return ["(needs sandhub and at least one of floor, Docker in the same run)"]
    head, rule = ["mode", "n"], ["---", "---:"]
    for o in others:
        label = TARGET_NAMES[o]
        head += [f"CCT p50 sandhub/{label}", f"CCT p99 sandhub/{label}", f"`ls /` mean sandhub/{label}"]
        rule += ["---:"] * 3
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for (mode, n), by_target in _rows(matrix).items():
        hub = by_target.get("hub", {})
        cols = [mode, f"{n:,}"]
        for o in others:
            other = by_target.get(o, {})
            cols += [_ratio(hub.get(k), other.get(k)) for k in ("cct_p50_ms", "cct_p99_ms", "ls_mean_ms")]
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def memory_table(matrix: Mapping[str, Any]) -> list[str]:
    """Per target, the run with the most containers alive at the sample."""
    best: dict[str, dict[str, Any]] = {}
    for r in matrix.get("runs", []):
        mem = r.get("memory")
        if mem and (r["target"] not in best or mem["containers"] > best[r["target"]]["memory"]["containers"]):
            best[r["target"]] = r
    if not best:
        return ["(no memory sample)"]
    lines = ["| target | alive | cgroup (MiB) | PSS of its processes (MiB) | host MemAvailable drop (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for t in [t for t in _targets(matrix) if t in best]:
        mem = best[t]["memory"]
        per = mem.get("per_container_mib", {})
        lines.append(f"| {TARGET_NAMES.get(t, t)} | {mem['containers']:,} | {_mib(per.get('cgroup'))} | "
                     f"{_mib(per.get('pss'))} | {_mib(per.get('host_available_delta'))} |")
    return lines


def rpc_cpu_lines(matrix: Mapping[str, Any]) -> list[str]:
    r = matrix.get("rpc_cpu")
    if not r:
        return ["(not measured in this run)"]
    calls = r["calls"]
    return [
        "| calls | process | CPU per 1,000 calls (ms) | wall for the batch (s) |",
        "|---|---|---:|---:|",
        f"| Run(`ls /`) × {calls:,} | Hub | {r['hub_per_1000_run_ms']:,.0f} | {r['run_wall_s']:.1f} |",
        f"| Run(`ls /`) × {calls:,} | the container's agent (serves the call, runs `ls`) | "
        f"{r['agent_per_1000_run_ms']:,.0f} | |",
        f"| GetContainer × {calls:,} | Hub | {r['hub_per_1000_get_ms']:,.0f} | {r['get_wall_s']:.1f} |",
        f"| GetContainer × {calls:,} | Orchestrator | {r['orchestrator_per_1000_get_ms']:,.0f} | |",
        "",
        f"{r['concurrency']} concurrent clients, {r['failures']} failed calls. The Hub and the Orchestrator "
        "ran as two `sandhub serve --only …` processes of their own (log level info, as deployed); CPU is "
        "user + system time of each process (all threads) from /proc/<pid>/stat before and after the batch, "
        "so the bench client's CPU is not in it.",
    ]


def failure_lines(matrix: Mapping[str, Any], limit: int = 5) -> list[str]:
    lines = []
    for r in matrix.get("runs", []):
        reasons = r.get("failure_reasons") or {}
        if not reasons and not r.get("leftovers"):
            continue
        lines.append(f"- {r['mode']} × {r['n']:,}, {TARGET_NAMES.get(r['target'], r['target'])}:")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:limit]:
            lines.append(f"  - {count} × {reason}")
        if r.get("leftovers"):
            lines.append(f"  - {r['leftovers']} things left behind after cleanup")
    return lines or ["None."]


METHOD = """\
- **CCT** (container creation time) is what each system itself reports:
  sandhub's `ready_time - create_time` (Hub and floor alike), Docker's
  `State.StartedAt - Created`. *create p50, client* is the caller's view:
  request to a running container (Hub: CreateContainer with
  wait_until_running; floor: the backend's create; Docker: create + start +
  inspect).
- **`ls /` mean**: the mean of every `ls /` run of the cell, 10 per
  container, each to completion with its output (Hub: the Run RPC; floor:
  Run straight to the container's agent, no Hub; Docker: exec create + attached
  start + exec inspect, what `docker exec` does).
- **burst** asks for a container every 0.1 s, **gradual** every 1 s, on an
  open loop (requests go out on schedule even when earlier ones are still
  in flight). Every container is created, then runs its 10 `ls /`, and
  stays alive until the cell ends, when all are deleted.
- **sandhub** is the Hub and an Orchestrator on the local backend, started
  in the bench process on loopback (`--start-local`, their own thread and
  event loop); **floor** is the same sandboxes made by calling the local
  backend directly, without gRPC or the Hub; **Docker** is a dockerd the
  bench starts on a private socket and data root, with containers given
  sandhub's default limits and hardening (1 CPU, 512 MiB, 256 pids, 1,024
  open files, read-only root with 512 MiB tmpfs /tmp and /work, uid 1000,
  no capabilities, no_new_privs) from a busybox image imported from a
  tar, and an address on a bridge of its own (no iptables: unlike
  sandhub's, its containers can reach each other).
- The three run one after the other within each cell (order rotating
  from cell to cell), so the ratios compare the same machine at nearly
  the same time.
- **Memory** is sampled once the cell's containers are all up and idle:
  their memory cgroups, the PSS of their processes (sandhub: bwrap and
  what it runs; Docker: the container's processes and its
  containerd-shim, which lives outside the container's cgroup), and how
  much the host's MemAvailable fell (everything, daemons included, and
  whatever else the host did meanwhile).
- **failed containers**: not created, or created with a failed `ls /`.
  No create is asked for while the host's MemAvailable is below the
  reserve (2,048 MiB by default): each such container counts as failed,
  so a target that needs more memory than the machine has shows it
  without the host's OOM killer picking a victim. Failed containers of
  sandhub or the floor make the matrix exit 1; Docker's (the reference
  giving up under load) are a result and are listed under Failures.
"""


def markdown(matrix: Mapping[str, Any], *, chart: str = "", chart_note: str = "", command: str = "") -> str:
    o = matrix.get("options", {})
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command or matrix.get('command', 'sandhub bench matrix')}` on {matrix.get('started', '?')}"
        + (" — **interrupted, partial**" if matrix.get("interrupted") else "") + ".",
        f"Sizes: burst {', '.join(f'{n:,}' for n in o.get('burst_sizes', []))}; "
        f"gradual {', '.join(f'{n:,}' for n in o.get('gradual_sizes', [])) or 'none'}.",
        "",
        "## Machine",
        "",
        *machine_lines(matrix),
        "",
        "## Container creation time and `ls /`",
        "",
        *main_table(matrix),
        "",
        "## Ratios (same run)",
        "",
        *ratio_table(matrix),
        "",
    ]
    if chart:
        lines += ["## CCT distributions", "", f"![CCT per target and cell]({chart})", ""]
    elif chart_note:
        lines += ["## CCT distributions", "", chart_note, ""]
    lines += [
        "## Memory per idle container",
        "",
        *memory_table(matrix),
        "",
        "## Hub CPU per 1,000 RPCs",
        "",
        *rpc_cpu_lines(matrix),
        "",
        "## Failures",
        "",
        *failure_lines(matrix),
        "",
        "## Method",
        "",
        METHOD,
    ]
    for note in matrix.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def merge_kept(new: str, old: str | None) -> str:
    """``new`` followed by the hand-written tail of ``old`` (from KEEP_MARKER on), if any."""
    if old and KEEP_MARKER in old:
        return new.rstrip() + "\n\n" + old[old.index(KEEP_MARKER):]
    return new


def by_cell(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, Sequence[float]]]:
    """CCT values per (mode, n) and target: what the chart draws."""
    out: dict[tuple[str, int], dict[str, Sequence[float]]] = {}
    for r in runs:
        if r.get("cct_values"):
            out.setdefault((r["mode"], int(r["n"])), {})[r["target"]] = r["cct_values"]
    return out
