"""Shared benchmark helpers: prompt loading, result saving, table printing."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

PROMPT_DIR = Path(os.environ.get("EESERVE_PROMPTS", Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"))
RESULTS = Path(os.environ.get("EESERVE_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def load_prompts(n: int, offset: int = 0) -> list[str]:
    """``n`` instruction prompts from the shared vicuna_bench + alpaca seed sets (first turns)."""
    prompts = []
    with open(PROMPT_DIR / "vicuna_bench.jsonl") as f:
        prompts += [json.loads(line)["turns"][0] for line in f if line.strip()]
    with open(PROMPT_DIR / "alpaca_seed_tasks.jsonl") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                inp = row["instances"][0].get("input", "") if row.get("instances") else ""
                prompts.append(row["instruction"] + (f"\n\n{inp}" if inp else ""))
    if offset + n > len(prompts):
        prompts = prompts * ((offset + n) // len(prompts) + 1)
    return prompts[offset:offset + n]


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in cols))
