"""Benchmark results: JSON files under ``bench/results`` and printed tables."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def results_dir() -> Path:
    """Where results go: ``$EESERVE_BENCH_RESULTS`` (read at each call), else ``bench/results``."""
    return Path(os.environ.get("EESERVE_BENCH_RESULTS", Path(__file__).resolve().parents[1] / "results"))


def save(name: str, payload: dict) -> Path:
    """Write ``payload`` as ``<results_dir>/<name>.json`` with ``benchmark``, ``time`` and ``machine``
    (CPU count, platform) keys first; returns the path."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **payload}
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    """Print ``rows`` as left-aligned columns ``cols`` (a missing value prints empty)."""
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in cols))
