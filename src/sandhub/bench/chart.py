"""A PNG of the CCT distributions: one panel per mode, a box per target and
size (log scale: the floor's milliseconds and Docker's seconds on one axis).

matplotlib is an optional extra (`pip install -e '.[bench]'`): it is the
plotting library everyone can read and change, and writes a PNG without a
display (Agg); but it pulls in numpy and Pillow, which the services never
need, so it stays out of the product's dependencies. Without it the matrix
still writes its table and says why there is no chart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sandhub.bench.matrix_report import TARGET_NAMES, TARGET_ORDER

COLORS = {"hub": "#1f77b4", "floor": "#2ca02c", "docker": "#d62728"}


class ChartUnavailable(Exception):
    pass


def write_chart(cells: Mapping[tuple[str, int], Mapping[str, Sequence[float]]], path: Path, *, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise ChartUnavailable("matplotlib is not installed (pip install -e '.[bench]')") from None

    modes = [m for m in ("burst", "gradual") if any(k[0] == m for k in cells)]
    if not modes:
        raise ChartUnavailable("no CCT values to draw")
    targets = [t for t in TARGET_ORDER if any(t in v for v in cells.values())]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False, sharey=True)
    width = 0.8 / max(len(targets), 1)
    for ax, mode in zip(axes[0], modes):
        sizes = sorted(n for m, n in cells if m == mode)
        for j, t in enumerate(targets):
            data, positions = [], []
            for i, n in enumerate(sizes):
                values = cells[(mode, n)].get(t)
                if values:
                    data.append(list(values))
                    positions.append(i + (j - (len(targets) - 1) / 2) * width)
            if not data:
                continue
            ax.boxplot(data, positions=positions, widths=width * 0.9, whis=(1, 99), showfliers=True,
                       patch_artist=True, boxprops={"facecolor": COLORS.get(t, "grey"), "alpha": 0.55},
                       medianprops={"color": "black"}, flierprops={"markersize": 2, "alpha": 0.4})
        ax.set_xticks(range(len(sizes)), [f"{n:,}" for n in sizes])
        ax.set_xlabel(f"containers ({mode}: one every {'0.1' if mode == 'burst' else '1'} s)")
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.set_title(mode)
    axes[0][0].set_ylabel("CCT (ms, log)  box: p25–p75, whiskers: p1–p99")
    fig.legend(handles=[Patch(facecolor=COLORS.get(t, "grey"), alpha=0.55, label=TARGET_NAMES.get(t, t))
                        for t in targets], loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
