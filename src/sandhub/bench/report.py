"""Results to text (histograms and percentiles per metric) and to JSON, and the
ratios between two runs (sandhub/floor, later sandhub/docker)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sandhub.bench.results import Metric, Results
from sandhub.bench.stats import histogram, summarize

FAILURE_LINES = 5
"""Distinct failure reasons shown per metric; the JSON has them all."""


def _num(value: float | None, precision: int = 1) -> str:
    return "-" if value is None else f"{value:.{precision}f}"


def metric_text(m: Metric) -> list[str]:
    lines = [f"{m.name} ({m.unit}): {m.description}"]
    s = summarize(m.values)
    lines.extend(histogram(m.values))
    if s is None:
        lines.append(f"  no values  count 0  failures {m.failed}")
    else:
        lines.append(
            f"  min {s.min:.1f}  p50 {s.p50:.1f}  p90 {s.p90:.1f}  p99 {s.p99:.1f}  max {s.max:.1f}"
            f"  mean {s.mean:.1f}  count {s.count}  failures {m.failed}"
        )
    for reason, count in m.failures.most_common(FAILURE_LINES):
        lines.append(f"  failed {count} x {reason}")
    if len(m.failures) > FAILURE_LINES:
        lines.append(f"  ... and {len(m.failures) - FAILURE_LINES} other reasons (see --json)")
    return lines


def _describe_params(p: Mapping[str, Any]) -> str:
    def or_default(value: Any, unit: str = "") -> str:
        return f"{value}{unit}" if value else "default"

    parts = [
        f"{p.get('n')} containers, one every {p.get('interval_s'):g} s (open loop, at most {p.get('concurrency_cap')} in flight)",
        f"cpu {or_default(p.get('cpu_millicores'), 'm')}, memory {or_default(p.get('memory_mib'), ' MiB')}, "
        f"image {p.get('image') or 'default'}",
    ]
    if p.get("files"):
        parts.append(f"files {', '.join(p['files'])}")
    return "; ".join(parts)


def memory_text(r: Results) -> list[str]:
    if r.memory is None:
        return []
    per = r.memory.per_container_mib()
    what = "container with its web server running" if r.scenario == "webserver" else "idle container"
    return [
        f"memory per {what} ({r.memory.containers} alive): "
        f"cgroup {_num(per['cgroup'], 2)} MiB, PSS {_num(per['pss'], 2)} MiB "
        f"({r.memory.processes} processes), host MemAvailable drop {_num(per['host_available_delta'], 2)} MiB"
    ]


def text(r: Results, *, compare: Mapping[str, Any] | None = None) -> str:
    m = r.machine
    lines = [
        f"sandhub bench {r.command}: scenario {r.scenario}, target {r.target}",
        f"  {r.target_detail}",
        f"  {_describe_params(r.params)}",
        f"  wall {r.wall_s:.1f} s; requests issued up to {r.max_issue_lag_ms:.1f} ms behind schedule",
    ]
    if m:
        lines.append(
            f"  machine: {m.get('cpus')} x {m.get('cpu_model') or 'cpu'}, {m.get('memory_total_mib', 0) / 1024:.1f} GiB, "
            f"Linux {m.get('kernel')}, cgroup {m.get('cgroup') or 'none'}"
        )
    for metric in r.metrics.values():
        lines.append("")
        lines.extend(metric_text(metric))
    lines.append("")
    lines.extend(memory_text(r))
    if compare is not None:
        lines.extend(ratio_text(to_json(r), compare))
    if r.kept:
        lines.append(f"kept {len(r.kept)} containers (--keep): {' '.join(r.kept)}")
    if r.leftovers:
        lines.append(f"LEFT BEHIND after cleanup ({len(r.leftovers)}):")
        lines.extend(f"  {item}" for item in r.leftovers[:20])
    failures = sum(x.failed for x in r.metrics.values())
    verdict = "interrupted" if r.interrupted else "FAILED" if r.failed else "ok"
    lines.append(f"result: {verdict}: {len(r.container_ids)} containers created, {failures} failures, "
                 f"{len(r.leftovers)} left behind")
    return "\n".join(lines)


def metric_json(m: Metric) -> dict[str, Any]:
    s = summarize(m.values)
    return {
        "unit": m.unit,
        "description": m.description,
        "count": len(m.values),
        "failures": m.failed,
        "failure_reasons": dict(m.failures.most_common()),
        "summary": dataclasses.asdict(s) if s else None,
        "values": [round(v, 3) for v in m.values],
    }


def to_json(r: Results) -> dict[str, Any]:
    return {
        "command": r.command,
        "target": r.target,
        "target_detail": r.target_detail,
        "scenario": r.scenario,
        "params": r.params,
        "machine": r.machine,
        "wall_s": round(r.wall_s, 3),
        "max_issue_lag_ms": round(r.max_issue_lag_ms, 3),
        "container_ids": r.container_ids,
        "metrics": {name: metric_json(m) for name, m in r.metrics.items()},
        "memory": None if r.memory is None else {
            **dataclasses.asdict(r.memory), "per_container_mib": r.memory.per_container_mib()
        },
        "kept": r.kept,
        "leftovers": r.leftovers,
        "interrupted": r.interrupted,
        "ok": not r.failed,
    }


def ratios(this: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """p50 and p99 of this run divided by the other's, for metrics both have values for."""
    out: dict[str, dict[str, float]] = {}
    for name, m in this.get("metrics", {}).items():
        o = other.get("metrics", {}).get(name)
        if not o or not m.get("summary") or not o.get("summary"):
            continue
        pair = {}
        for key in ("p50", "p99"):
            if o["summary"][key] > 0:
                pair[key] = m["summary"][key] / o["summary"][key]
        if pair:
            out[name] = pair
    return out


def ratio_text(this: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """Ratios of this run to the other, turned so the floor is always the
    denominator (sandhub/floor, docker/floor) whichever run compares."""
    if this.get("target") == "floor" and other.get("target") != "floor":
        this, other = other, this
    label = f"{this.get('target')}/{other.get('target')}"
    found = ratios(this, other)
    if not found:
        return [f"ratio {label}: no metric with values in both runs"]
    lines = [f"ratio {label} ({this.get('target_detail', '?')} / {other.get('target_detail', '?')}):"]
    for name, pair in found.items():
        lines.append(f"  {name}: p50 {pair.get('p50', float('nan')):.2f}x  p99 {pair.get('p99', float('nan')):.2f}x")
    return lines
