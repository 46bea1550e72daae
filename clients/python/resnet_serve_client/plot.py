"""Latency against throughput, one point per level (needs matplotlib: the `plot` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bench import LevelResult


def plot(results: list[LevelResult], path: Path, title: str) -> None:
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    throughput = [r.throughput for r in results]
    for name, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        axes.plot(throughput, [r.latency_ms()[name] for r in results], style, label=name)
    for result, x in zip(results, throughput, strict=True):
        label = f"c={result.concurrency}" + (f" r={result.rate:g}" if result.rate else "")
        axes.annotate(label, (x, result.latency_ms()["p50"]), textcoords="offset points",
                      xytext=(4, -10), fontsize=8)
    axes.set_xlabel("throughput (successful requests/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "--plot needs matplotlib: pip install 'resnet-serve-client[plot]'"
        ) from error
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot
