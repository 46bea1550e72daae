"""Bench results as a table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from .bench import LevelResult

COLUMNS = (
    "concurrency", "rate", "requests", "ok", "errors", "seconds", "req_per_s", "img_per_s",
    "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "client_cpu_s", "client_cpu_pct",
)


def row(result: LevelResult) -> dict[str, Any]:
    latency = result.latency_ms()
    return {
        "concurrency": result.concurrency,
        "rate": result.rate,
        "requests": result.requests,
        "ok": result.ok,
        "errors": dict(sorted(result.errors.items())),
        "seconds": round(result.seconds, 3),
        "req_per_s": round(result.throughput, 2),
        "img_per_s": round(result.images_per_second, 2),
        **{f"{name}_ms": round(value, 2) for name, value in latency.items()},
        "client_cpu_s": round(result.cpu_seconds, 3),
        "client_cpu_pct": round(result.cpu_percent, 1),
    }


def as_json(config: dict[str, Any], results: list[LevelResult]) -> str:
    return json.dumps({"config": config, "levels": [row(r) for r in results]}, indent=2)


def as_csv(results: list[LevelResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        values = row(result)
        values["errors"] = ";".join(f"{code}={n}" for code, n in values["errors"].items())
        values["rate"] = "" if values["rate"] is None else values["rate"]
        writer.writerow(values)
    return buffer.getvalue()


def as_table(config: dict[str, Any], results: list[LevelResult]) -> str:
    lines = [" ".join(f"{key}={value}" for key, value in config.items()), ""]
    header = ("conc", "rate", "ok", "err", "req/s", "img/s", "p50 ms", "p90 ms", "p99 ms",
              "max ms", "cpu %")
    widths = (5, 7, 7, 5, 8, 8, 8, 8, 8, 8, 6)
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for result in results:
        r = row(result)
        cells = (
            r["concurrency"], "-" if r["rate"] is None else f"{r['rate']:g}", r["ok"],
            sum(r["errors"].values()), f"{r['req_per_s']:.1f}", f"{r['img_per_s']:.1f}",
            f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}",
            f"{r['max_ms']:.1f}", f"{r['client_cpu_pct']:.0f}",
        )
        lines.append("  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)))
    failed = [(result, row(result)["errors"]) for result in results if result.errors]
    if failed:
        lines.append("")
        for result, errors in failed:
            counts = ", ".join(f"{code} {n}" for code, n in errors.items())
            lines.append(f"errors at concurrency {result.concurrency}: {counts}")
    lines.append("")
    lines.append("cpu %: the client's own CPU time over wall time (100 = one core)")
    return "\n".join(lines)
