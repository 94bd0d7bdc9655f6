"""Benchmark prompts: the shared instruction sets, the exit heads' held-out test split, chat prompts."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

PROMPT_DIR = Path(os.environ.get("EESERVE_PROMPTS",
                                 Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts"))


def load_prompts(n: int, offset: int = 0) -> list[str]:
    """``n`` instruction prompts from the shared vicuna_bench + alpaca seed sets (first turns), from
    ``offset`` on, the sets repeated as needed."""
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


def held_out_prompts(exit_config) -> tuple[list[str], str]:
    """``(texts, source)``: the test split of the prompts the exit heads were trained with (an
    :class:`~cluster.config.ExitConfig` with trained heads whose metadata records the splits), else
    64 prompts of :func:`load_prompts`."""
    if exit_config is not None and exit_config.head == "trained":
        from cluster.training.data import default_prompts_dir, load_prompts as load_all, split_prompts
        from cluster.training.workspace import read_heads_metadata

        sp = json.loads(read_heads_metadata(exit_config.heads_path).get("splits", "{}"))
        if sp:
            splits = split_prompts(load_all(default_prompts_dir()), sp["seed"], sp["num_calib"], sp["num_test"])
            return [p.text for p in splits["test"]], "test split of the exit heads (held out)"
    return load_prompts(64), "bench.common.load_prompts"  # the recorded source name, kept as results have it


def chat_prompts(llm, texts: list[str], n: int) -> list[list[int]]:
    """Token ids of ``n`` one-turn user chats (``texts`` cycled), through ``llm``'s chat template."""
    return [llm.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}]) for i in range(n)]


def report_prompts(texts: list[str], source: str, ec) -> None:
    """Print where the prompts come from and the exit config they are measured with."""
    print(f"prompts: {len(texts)} from {source}; exit config: {ec.confidence} at layers {ec.exit_layers}")


def held_out_setup(model: Optional[str], num_layers: int):
    """``(exit_config, alternatives, texts, source)`` for ``model`` (None: the default model): its own
    exit config (:func:`bench.common.exits.own_exit_config`) and its held-out prompts, reported."""
    from bench.common.exits import own_exit_config
    from cluster.model.loader import resolve_model_dir

    ec, alternatives = own_exit_config(resolve_model_dir(model), num_layers)
    texts, source = held_out_prompts(ec)
    report_prompts(texts, source, ec)
    return ec, alternatives, texts, source
