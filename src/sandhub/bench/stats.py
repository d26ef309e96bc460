"""Numbers to text: percentiles, a summary and an ASCII histogram. Pure, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BAR = "#"


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation between closest
    ranks (numpy's default), so p50 of [1, 2, 3, 4] is 2.5."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {p}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    count: int
    min: float
    p50: float
    p90: float
    p99: float
    max: float
    mean: float


def summarize(values: Sequence[float]) -> Summary | None:
    """None when there is nothing to summarize."""
    if not values:
        return None
    return Summary(
        count=len(values),
        min=min(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
        max=max(values),
        mean=sum(values) / len(values),
    )


@dataclass(frozen=True)
class Bucket:
    upper: float
    """Values up to and including this one (and above the previous bucket's)."""
    count: int


def buckets(values: Sequence[float], n: int = 10) -> list[Bucket]:
    """``n`` equal-width buckets between min and max, labelled by their upper
    edge; one bucket when all values are equal. Every value is in exactly one."""
    if not values:
        return []
    if n < 1:
        raise ValueError("need at least one bucket")
    lo, hi = min(values), max(values)
    if hi == lo:
        return [Bucket(hi, len(values))]
    width = (hi - lo) / n
    counts = [0] * n
    for v in values:
        # Upper edge inclusive, as the label says; the epsilon keeps a value
        # on an edge from slipping up a bucket through rounding.
        index = math.ceil((v - lo) / width - 1e-9) - 1
        counts[min(max(index, 0), n - 1)] += 1
    return [Bucket(lo + width * (i + 1) if i < n - 1 else hi, c) for i, c in enumerate(counts)]


def histogram(values: Sequence[float], *, n: int = 10, width: int = 40, precision: int = 1) -> list[str]:
    """One line per bucket, as the original tool printed it:
    ``  12.3 [  41] |########`` — the bucket's upper edge, its count, and a bar
    scaled so the fullest bucket is ``width`` characters long."""
    bs = buckets(values, n)
    if not bs:
        return []
    most = max(b.count for b in bs)
    labels = [f"{b.upper:.{precision}f}" for b in bs]
    label_width = max(map(len, labels))
    count_width = len(str(most))
    lines = []
    for label, b in zip(labels, bs):
        bar = BAR * (round(b.count / most * width) if b.count else 0)
        if b.count and not bar:
            bar = BAR  # a bucket with anything in it never looks empty
        lines.append(f"  {label:>{label_width}} [{b.count:>{count_width}}] |{bar}")
    return lines
