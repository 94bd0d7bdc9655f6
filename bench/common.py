"""Shared benchmark helpers: prompt loading, interleaved timing rounds, result saving, table printing."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Hashable, TypeVar

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


R = TypeVar("R")


def interleaved_best(runs: dict[Hashable, Callable[[], R]], rounds: int,
                     score: Callable[[R], float] = lambda r: r[1]) -> dict[Hashable, R]:
    """Call every variant's ``run()`` once per round, ``rounds`` times, and keep each variant's best
    result by ``score`` (default: element 1, tokens/s, of :func:`bench.offline.run_engine`'s tuple).

    Rounds interleave the variants (and reverse their order every other round) so that a noisy,
    shared machine's drift hits every variant alike; the best round is the least disturbed one.
    """
    best: dict = {}
    keys = list(runs)
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            res = runs[key]()
            if key not in best or score(res) > score(best[key]):
                best[key] = res
    return {k: best[k] for k in keys if k in best}


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


def shipped_heads_workspace():
    """The default model's shipped exit config and the exit-training workspace of its heads' data
    splits (the ones recorded in the heads file): ``(model_dir, exit_config, workspace)``."""
    from cluster.engine.factory import model_exit_config_path, read_exit_config
    from cluster.model.loader import resolve_model_dir
    from cluster.training.pipeline import DataSettings, Workspace, read_heads_metadata

    model_dir = resolve_model_dir(None)
    cfg = read_exit_config(model_exit_config_path(model_dir))
    sp = json.loads(read_heads_metadata(cfg.heads_path).get("splits", "{}"))
    return model_dir, cfg, Workspace.open(None, DataSettings.from_splits_meta(sp))
