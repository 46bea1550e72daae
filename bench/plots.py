"""The report's PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot, ticker

from bench.load import VARIANTS

STYLES = {"uint8": "o-", "jpeg": "s-", "v2": "^-", "nobatch": "v--", "v2-pa": "D-"}
DPI = 100


def latency_throughput(results: dict[str, Any], path: Path) -> Path:
    """p50 (markers, solid) and p99 (faint) latency against images/s, one panel per model."""
    models = list(results["raw"])
    figure, panels = pyplot.subplots(
        1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False
    )
    for axes, model in zip(panels[0], models, strict=True):
        raw = results["raw"][model]
        axes.plot(
            [r["img_per_s"] for r in raw],
            [r["p50_ms"] for r in raw],
            "k.:",
            label="raw ORT (batch latency)",
        )
        for r in raw:
            axes.annotate(
                f"b{r['batch']}",
                (r["img_per_s"], r["p50_ms"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
                color="0.3",
            )
        for variant in VARIANTS:
            rows = _rows(results, model, variant.key)
            if not rows:
                continue
            x = [r["img_per_s"] for r in rows]
            (line,) = axes.plot(
                x, [r["p50_ms"] for r in rows], STYLES[variant.key], label=f"{variant.key} p50"
            )
            axes.plot(
                x,
                [r["p99_ms"] for r in rows],
                STYLES[variant.key][0] + ":",
                color=line.get_color(),
                alpha=0.4,
            )
            for r in rows:
                axes.annotate(
                    f"c{r['concurrency']}",
                    (r["img_per_s"], r["p50_ms"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, -9),
                    color=line.get_color(),
                )
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ticker.ScalarFormatter())
        axes.set_title(f"{model}: latency vs throughput (p50; faint: p99)", fontsize=10)
        axes.set_xlabel("images/s")
        axes.set_ylabel("latency (ms)")
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8)
    return _save(figure, path)


def batch_sizes(results: dict[str, Any], path: Path, variant: str = "uint8") -> Path:
    """Share of session runs per batch-size bucket, one bar per concurrency, per model."""
    models = list(results["raw"])
    figure, panels = pyplot.subplots(
        1, len(models), figsize=(5.2 * len(models), 3.6), squeeze=False
    )
    for axes, model in zip(panels[0], models, strict=True):
        rows = _rows(results, model, variant)
        buckets = [b for b in (rows[0]["batch_sizes"] if rows else {}) if not b.startswith(">")]
        used = [b for b in buckets if any(r["batch_sizes"].get(b, 0) for r in rows)] or buckets
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            total = sum(r["batch_sizes"].values()) or 1
            shares = [r["batch_sizes"].get(b, 0) / total for b in used]
            positions = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(used))]
            axes.bar(
                positions, shares, width, label=f"c{r['concurrency']} (mean {r['batch_mean']:.1f})"
            )
        axes.set_xticks(range(len(used)), used)
        axes.set_title(f"{model}: batch sizes the server ran ({variant})", fontsize=10)
        axes.set_xlabel("images per session run")
        axes.set_ylabel("share of runs")
        axes.grid(alpha=0.3, axis="y")
        axes.legend(fontsize=8)
    return _save(figure, path)


def _panels(count: int, height: float) -> tuple[Any, Any]:
    return pyplot.subplots(1, count, figsize=(5.2 * count, height), squeeze=False)


def _rows(results: dict[str, Any], model: str, variant: str) -> list[dict[str, Any]]:
    rows = [r for r in results["server"] if r["model"] == model and r["variant"] == variant]
    return sorted(rows, key=lambda r: r["concurrency"])


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)
    return path
