"""``eeserve calibrate-skip`` end to end: the skip-set search (:mod:`cluster.training.skip_search`) on the
calibration split of the model's prompts, checked with the real engine, written into the exit config.

* Prompts: the calibration split of :mod:`cluster.training.data` (the one the model's exit heads were
  calibrated on, from the heads file's metadata; never the held-out test split), with the full
  model's greedy answers from the exit-training workspace cache (generated once if missing).
* Model: built as the engine serves it (``quantization`` as for :class:`cluster.llm.LLM`; the int4 GGUF
  for the default model on the CPU), with the engine's exit heads (their FR-Spec draft head).
* Draft cost: the engine's own :meth:`~cluster.engine.engine.LLMEngine.draft_cost`.
* Confirmation: the winner runs in the engine (mode ``layer_skip``, ``adaptive_drafts=False``, batch 1)
  on the first calibration prompts; its measured acceptance (accepted drafts over drafts) and tokens
  per verification are recorded next to what the estimate predicts.
* Written: ``skip_layers`` and a ``skip_calibration`` block (acceptance, draft cost, skip ratio,
  modelled speedup, the confirmation, runners-up) in the exit config; a model without one gets
  ``exit_config.json`` in its directory holding its default exit config plus these.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

from cluster.config import ExitConfig
from cluster.request import default_skip_layers
from cluster.training.skip_search import (SkipScorer, acceptance_from_ratio, best_per_size, predicted_engine_stats,
                                          search_skip_sets)
from cluster.training.workspace import DataSettings, Workspace, kv_cache_bytes, read_heads_metadata, write_exit_config

TABLE_SIZES = (2, 4, 6, 8, 10, 13)


def calibrate_skip(model: Optional[str] = None, config_path: Optional[str] = None, quantization: str = "auto",
                   trials: int = 120, seed: int = 0, num_prompts: int = 16, max_new_tokens: int = 128,
                   data: Optional[DataSettings] = None, work_dir: Optional[str] = None, confirm_prompts: int = 4,
                   write: bool = True, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Search the skip set, confirm it in the engine and write it into the exit config.

    Args:
        config_path: exit config to update (default: the model's own, else ``<model dir>/exit_config.json``).
        quantization: the engine's (``auto``: int4 for the default Q4 GGUF on the CPU).
        trials: skip sets scored at most; seed: the TPE sampler's seed.
        num_prompts, max_new_tokens: calibration prompts and continuation tokens scored per prompt.
        data: the prompt splits when the exit config names none (its trained heads' metadata wins).
        confirm_prompts: calibration prompts the engine generates with the winner (0: no confirmation).
        write: False: only return the result.

    Returns:
        The ``skip_calibration`` record (see the module docstring) with ``skip_layers``.

    Raises:
        ValueError: the model has fewer than 3 layers (nothing between the first and the last to skip).
    """
    from cluster.engine.factory import model_exit_config_path, read_exit_config
    from cluster.llm import LLM
    from cluster.model.loader import resolve_model_dir
    from cluster.training.data import GenerationCache, generate_answers

    t0 = time.monotonic()
    model_dir = resolve_model_dir(model)
    config_path = config_path or model_exit_config_path(model_dir) or os.path.join(model_dir, "exit_config.json")
    ec, raw = _read_or_default(config_path, model_dir, read_exit_config)
    if ec.head == "trained" and ec.heads_path:
        data = DataSettings.from_splits_meta(json.loads(read_heads_metadata(ec.heads_path).get("splits", "{}")))
    ws = Workspace.open(model_dir, data or DataSettings(), work_dir, log=log)
    L = ws.model_config.num_layers
    if L < 3:
        raise ValueError(f"calibrate-skip: a {L}-layer model has no layer between the first and the last to skip")
    k = ec.num_draft_tokens
    # one engine: the full model's answers (cached), the draft cost, the confirmation (one request at a time:
    # speculation runs at batch 1, spec_max_batch)
    base = dataclasses.replace(ec, mode="layer_skip", adaptive_drafts=False, skip_layers=())
    prompts = ws.splits["calib"][:num_prompts]
    llm = LLM(model_dir, early_exit=base, quantization=quantization, max_num_seqs=16,
              kv_cache_memory_bytes=kv_cache_bytes(ws.model_config, [512 + ws.data.max_new_tokens] * 16))
    try:
        seqs = generate_answers(lambda: _FullModel(llm), prompts, GenerationCache(ws.work_dir),
                                ws.data.max_new_tokens, chunk_size=16, progress=progress)
        seqs = [dataclasses.replace(s, output_ids=s.output_ids[:max_new_tokens]) for s in seqs]
        mc = llm.engine.model_config
        record = _search(llm, model_dir, mc, ec, seqs, k, max_new_tokens, trials, seed, progress, log)
        if confirm_prompts:
            record["engine"] = _confirm(llm, record["skip_layers"], seqs[:confirm_prompts], max_new_tokens,
                                        record["skip_acceptance"], k)
    finally:
        llm.shutdown()
    record = {**record, "split": {"name": "calib", **ws.data.splits_meta()}, "total_s": round(time.monotonic() - t0, 1)}
    if write:
        raw["skip_layers"] = record["skip_layers"]
        raw["skip_calibration"] = record
        write_exit_config(config_path, raw)
        log(f"calibrate-skip: wrote skip_layers {record['skip_layers']} into {config_path}")
    return record


class _FullModel:
    """The search's engine as :func:`~cluster.training.data.generate_answers` wants it: full-model
    greedy answers, and no shutdown (the search goes on with it)."""

    def __init__(self, llm):
        self.llm = llm

    def apply_chat_template(self, conversation):
        return self.llm.apply_chat_template(conversation)

    def generate(self, prompts, params, use_tqdm=False):
        return self.llm.generate(prompts, params, use_tqdm, exit_threshold=float("inf"))

    def shutdown(self):
        pass


def _search(llm, model_dir: str, mc, ec: ExitConfig, seqs, k: int, max_new_tokens: int, trials: int, seed: int, progress: bool,
            log: Callable[[str], None]) -> dict:
    """Score skip sets on ``seqs`` (:class:`SkipScorer` on a model built as ``llm``'s, its draft cost)."""
    from cluster.model.exit_heads import ExitHeads
    from cluster.model.loader import build_model
    from cluster.training.features import decode_rows

    L = mc.num_layers
    net = build_model(model_dir, mc)
    heads = ExitHeads(net, ec) if ec.exit_layers else None
    t1 = time.monotonic()
    scorer = SkipScorer(net, heads, [s.ids for s in seqs], [decode_rows(s) for s in seqs])
    log(f"calibrate-skip: {len(seqs)} calibration prompts, {scorer.num_positions} decode positions scored, "
        f"{mc.quantization} weights, k={k}; full-model pass {time.monotonic() - t1:.1f}s")
    given = [default_skip_layers(L)] + ([ec.skip_layers] if ec.skip_layers else [])
    t1 = time.monotonic()
    cands = search_skip_sets(scorer.acceptance, lambda skip: llm.engine.draft_cost(None, skip), L, k,
                             trials=trials, seed=seed, given=given, progress=progress)
    search_s = time.monotonic() - t1
    best = cands[0]
    record = {"method": "SWIFT-style search (arXiv 2410.06916): single-layer skips, greedy by single-skip "
                        "acceptance, then optuna TPE; acceptance = teacher-forced draft argmax agreement with the "
                        "full model", "quantization": mc.quantization, "prompts": len(seqs),
              "max_new_tokens": max_new_tokens, "positions": int(sum(len(decode_rows(s)) for s in seqs)),
              "trials": len(cands), "seed": seed,
              "search_s": round(search_s, 1), "skip_layers": list(best.skip), "skip_acceptance": best.acceptance,
              "skip_draft_cost": best.draft_cost, "skip_ratio": best.skip_ratio, "num_draft_tokens": k,
              "tokens_per_verification": best.tokens_per_verification, "modelled_speedup": best.speedup,
              "source": best.source, "top": [c.as_dict() for c in cands[:5]],
              "by_size": {str(n): (c.as_dict() if c else None) for n, c in best_per_size(cands, TABLE_SIZES).items()},
              "default_rule": next((c.as_dict() for c in cands if c.skip == default_skip_layers(L)), None)}
    return record


def _read_or_default(path: str, model_dir: str, read_exit_config) -> tuple[ExitConfig, dict]:
    """``(ExitConfig, raw JSON)`` of ``path``, or the model's default exit config if it does not exist."""
    if os.path.exists(path):
        with open(path) as f:
            return read_exit_config(path), json.load(f)
    from cluster.config import ModelConfig
    from cluster.model.loader import load_hf_config

    ec = ExitConfig.default_for(ModelConfig.from_hf_config(load_hf_config(model_dir)).num_layers)
    raw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ec).items()}
    return ec, raw


def _confirm(llm, skip: list, seqs, max_new_tokens: int, estimate: float, k: int) -> dict:
    """The engine's measured acceptance of the skip set ``skip`` (``llm``'s ``k`` drafts, fixed, at batch 1:
    one request at a time) on ``seqs``'s prompts, next to what the estimate ``estimate`` predicts
    (:func:`predicted_engine_stats`)."""
    from cluster.frontend.outputs import CompletionOutput
    from cluster.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    outs = []
    t = time.monotonic()
    for s in seqs:
        rid = llm.add_request(list(s.prompt_ids), params, exit_mode="layer_skip", skip_layers=tuple(skip))
        out = CompletionOutput(rid, list(s.prompt_ids))
        while not out.finished:
            for delta in llm.engine.step():
                if delta.request_id == rid:
                    out.add(delta)
        outs.append(out)
    wall = time.monotonic() - t
    drafts = sum(o.num_draft_tokens for o in outs)
    accepted = sum(o.num_accepted_tokens for o in outs)
    verifies = sum(o.num_verify_steps for o in outs)
    ratio = accepted / drafts if drafts else None
    pred = predicted_engine_stats(estimate, k)
    return {"prompts": len(seqs), "tokens": sum(len(o.token_ids) for o in outs), "wall_s": round(wall, 1),
            "num_draft_tokens": drafts, "num_accepted_tokens": accepted, "num_verify_steps": verifies,
            "accepted_per_draft": ratio,
            "tokens_per_verification": (accepted + verifies) / verifies if verifies else None,
            "implied_acceptance": acceptance_from_ratio(ratio, k) if drafts else None,
            "predicted_accepted_per_draft": pred["accepted_per_draft"],
            "predicted_tokens_per_verification": pred["tokens_per_verification"]}
