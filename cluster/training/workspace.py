"""The exit-training workspace shared by ``eeserve train-exits`` and ``eeserve calibrate``: data
settings and splits, the cached answers and hidden states (:class:`Workspace`), the heads file's
metadata and the atomically written exit config."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from safetensors import safe_open

from cluster.config import ModelConfig
from cluster.training.data import (GenerationCache, Prompt, default_prompts_dir, generate_answers, load_prompts,
                                   prompts_digest, split_prompts)

HEADS_FILE = "exit_heads.safetensors"
FORMAT = "eeserve-exit-heads-v1"


def default_exit_layers(num_layers: int) -> tuple[int, ...]:
    """Every tenth of the depth from 1/5 to 4/5 (30 layers: 6, 9, ..., 24)."""
    step = max(1, round(num_layers / 10))
    lo, hi = max(1, round(num_layers / 5)), min(num_layers - 1, round(num_layers * 4 / 5))
    return tuple(range(lo, hi + 1, step))


@dataclass
class DataSettings:
    prompts_dir: Optional[str] = None
    max_new_tokens: int = 192
    num_calib: int = 40
    num_test: int = 24
    max_train: int = 0  # 0: every remaining prompt
    split_seed: int = 0
    num_agreement_eval: int = 4  # test prompts whose agreement is recorded in the heads' metadata
    max_num_seqs: int = 64

    def splits_meta(self) -> dict:
        return {"seed": self.split_seed, "num_calib": self.num_calib, "num_test": self.num_test,
                "max_train": self.max_train, "max_new_tokens": self.max_new_tokens}

    @classmethod
    def from_splits_meta(cls, sp: dict) -> "DataSettings":
        """The settings whose splits a heads file records (:meth:`splits_meta`); defaults where absent."""
        d = cls()
        return cls(max_new_tokens=sp.get("max_new_tokens", d.max_new_tokens),
                   num_calib=sp.get("num_calib", d.num_calib), num_test=sp.get("num_test", d.num_test),
                   max_train=sp.get("max_train", d.max_train), split_seed=sp.get("seed", d.split_seed))


@dataclass
class Workspace:
    """Resolved model and data for one run."""

    model_dir: str
    model_config: ModelConfig
    fingerprint: str
    data: DataSettings
    prompts: list[Prompt]
    splits: dict[str, list[Prompt]]
    work_dir: str
    log: Callable[[str], None] = print
    timings: dict = field(default_factory=dict)
    _model: object = None

    @classmethod
    def open(cls, model: Optional[str], data: DataSettings, work_dir: Optional[str] = None,
             log: Callable[[str], None] = print) -> "Workspace":
        from cluster.engine.factory import model_fingerprint
        from cluster.model.loader import cache_dir, load_hf_config, resolve_model_dir

        model_dir = resolve_model_dir(model)
        mc = ModelConfig.from_hf_config(load_hf_config(model_dir), dtype="float32")
        fp = model_fingerprint(model_dir)
        data.prompts_dir = data.prompts_dir or default_prompts_dir()
        prompts = load_prompts(data.prompts_dir)
        splits = split_prompts(prompts, data.split_seed, data.num_calib, data.num_test, data.max_train or None)
        gen_key = hashlib.sha256(json.dumps([prompts_digest(prompts), data.max_new_tokens]).encode()).hexdigest()[:12]
        root = work_dir or str(cache_dir() / "exit-training" / fp.replace(":", "-"))
        return cls(model_dir, mc, fp, data, prompts, splits, os.path.join(root, f"gen-{gen_key}"), log)

    def _engine(self):
        from cluster.llm import LLM

        return LLM(self.model_dir, early_exit=None, max_num_seqs=self.data.max_num_seqs,
                   max_num_batched_tokens=max(2048, self.data.max_num_seqs * 16),
                   kv_cache_memory_bytes=kv_cache_bytes(self.model_config,
                                                        [512 + self.data.max_new_tokens] * self.data.max_num_seqs))

    def sequences(self, splits: tuple[str, ...], progress: bool = True) -> dict:
        """Greedy answers for the prompts of ``splits`` (generated once, all splits in one batch run)."""
        t = time.monotonic()
        cache = GenerationCache(self.work_dir)
        todo = [p for s in splits for p in self.splits[s]]
        generate_answers(self._engine, todo, cache, self.data.max_new_tokens, progress=progress)
        self.timings["generate_s"] = self.timings.get("generate_s", 0.0) + time.monotonic() - t
        return {s: cache.get(self.splits[s]) for s in splits}

    def model(self):
        if self._model is None:
            from cluster.model.loader import build_model

            self._model = build_model(self.model_dir, self.model_config)
        return self._model

    def features(self, split: str, seqs, layers, topk: int = 16, progress: bool = True):
        from cluster.training.features import cached_features

        t = time.monotonic()
        key = {"split": split, "ids": [s.id for s in seqs], "n": sum(len(s.ids) for s in seqs), "topk": topk}
        path = os.path.join(self.work_dir, f"features-{split}.pt")
        feats = cached_features(path, self.model(), seqs, layers, key, topk=topk, progress=progress,
                                desc=f"hidden states ({split})")
        self.timings["features_s"] = self.timings.get("features_s", 0.0) + time.monotonic() - t
        return feats


def kv_cache_bytes(mc: ModelConfig, seq_lens: list[int], cap: int = 1 << 30) -> int:
    """A CPU KV cache (float32) for sequences of ``seq_lens`` tokens, twice the need, 16 MiB to ``cap``:
    the engine's 1 GiB default takes seconds to allocate, which small models and test runs feel."""
    need = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4 * sum(n + 32 for n in seq_lens)
    return int(min(cap, max(16 << 20, 2 * need)))


def read_heads_metadata(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def write_exit_config(path: str, data: dict) -> None:
    """Write ``data`` atomically after validating it exactly as it will be read back
    (:func:`cluster.llm.read_exit_config`: extra keys are notes). Raises ValueError if invalid."""
    from cluster.engine.factory import read_exit_config

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    try:
        read_exit_config(tmp)
    except Exception:
        os.remove(tmp)
        raise
    os.replace(tmp, path)
