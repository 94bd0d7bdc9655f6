"""Engine runs and their timing: offline :class:`~cluster.LLM` batches, continuous batching through
the engine, transformers ``generate``; quantization variants timed in interleaved rounds and their rows.

Every run here (and every peer of :mod:`bench.common.peers`) has the shape
``run(prompt_ids, batch, max_tokens) -> (outputs, tokens_per_s, mean_exit_layer, exit_layer_counts)``:
greedy, EOS ignored (every prompt gets ``max_tokens`` tokens), prefill included in the wall time,
one warm-up call first.
"""
from __future__ import annotations

import collections
import functools
import itertools
import time
from typing import Optional

import torch

from bench.common.quality import free_agreement
from bench.common.timing import interleaved_best
from cluster import LLM, SamplingParams


def engine_kwargs(dtype: str = "float32", kv_cache_memory_bytes: int = 256 << 20) -> dict:
    """The benchmarks' :class:`LLM` settings: ``dtype``, prefix caching off (repeated prompts do not
    skip prefill; transformers has no prefix cache either), a ``kv_cache_memory_bytes`` KV cache."""
    return dict(dtype=dtype, enable_prefix_caching=False, kv_cache_memory_bytes=kv_cache_memory_bytes)


def run_engine(llm: LLM, prompt_ids, batch: int, max_tokens: int, exit_threshold=None):
    """``llm.generate`` over ``prompt_ids`` in batches of ``batch``: ``(outputs, tokens/s, mean exit
    layer, Counter of exit layers)``; ``exit_threshold`` as in :meth:`LLM.generate` (> 1: full model)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompt_ids[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompt_ids), batch):
        outs += llm.generate(prompt_ids[i:i + batch], params, exit_threshold=exit_threshold)
    dt = time.perf_counter() - t0
    toks = sum(len(o.token_ids) for o in outs)
    layers = [l for o in outs for l in o.exit_layers]
    return outs, toks / dt, sum(layers) / len(layers), collections.Counter(layers)


_ids = itertools.count()


def run_batch(llm: LLM, prompts: list[list[int]], batch: int, sp: SamplingParams, **mode):
    """Generate for every prompt with at most ``batch`` requests in flight (continuous batching through
    ``llm.engine``; ``mode``: :class:`~cluster.engine.protocol.EngineRequest` fields such as
    ``exit_mode``): ``(outputs in prompt order, wall seconds)``. No warm-up."""
    from cluster.engine.protocol import EngineRequest
    from cluster.frontend.outputs import CompletionOutput

    eng = llm.engine
    todo = list(enumerate(prompts))
    outs: dict[str, CompletionOutput] = {}
    order: list[str] = []
    t0 = time.perf_counter()
    running = 0
    while todo or running:
        while todo and running < batch:
            i, ids = todo.pop(0)
            rid = f"spec-{next(_ids)}"
            eng.add_request(EngineRequest(request_id=rid, prompt_token_ids=ids, sampling_params=sp, **mode))
            outs[rid] = CompletionOutput(rid, ids)
            order.append(rid)
            running += 1
        for d in eng.step():
            outs[d.request_id].add(d)
            if d.finished:
                running -= 1
    return [outs[r] for r in order], time.perf_counter() - t0


def load_hf(model_dir: str, dtype: str):
    """transformers ``AutoModelForCausalLM`` of ``model_dir`` in ``dtype`` (a torch dtype name), eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def run_hf(model, prompt_ids, batch: int, max_tokens: int):
    """transformers ``generate`` (greedy, left padding, exactly ``max_tokens`` new tokens) in batches
    of ``batch``: ``(generated id lists, tokens/s)``."""
    with torch.no_grad():  # warm-up
        model.generate(torch.tensor([prompt_ids[0]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            y = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                               do_sample=False, pad_token_id=0)
        outs += y[:, width:].tolist()
    dt = time.perf_counter() - t0
    return outs, sum(map(len, outs)) / dt


def make_variants(model, quantizations, early_exit: bool = True, **kw) -> dict:
    """One :class:`LLM` per ``(quantization, mode)``: mode ``full`` (no exits) and, with
    ``early_exit``, ``ee`` (the model's own exit config)."""
    variants = {}
    for q in quantizations:
        variants[(q, "full")] = LLM(model, early_exit=None, quantization=q, **kw)
        if early_exit:
            variants[(q, "ee")] = LLM(model, quantization=q, **kw)
    return variants


def time_variants(variants: dict, prompts: list[list[int]], batch: int, max_tokens: int, rounds: int,
                  extra: Optional[dict] = None) -> dict:
    """Best-of-``rounds`` :func:`run_engine` result of each variant, interleaved with the ``extra``
    runs (key -> ``run(prompts, batch, max_tokens)`` returning the same tuple, e.g. :mod:`bench.common.peers`)."""
    runs = {key: functools.partial(run_engine, llm, prompts, batch, max_tokens) for key, llm in variants.items()}
    runs.update({key: functools.partial(run, prompts, batch, max_tokens) for key, run in (extra or {}).items()})
    return interleaved_best(runs, rounds)


def token_ids(outs) -> list[list[int]]:
    """Generated token ids of each output (:class:`CompletionOutput` or a plain id list)."""
    return [list(getattr(o, "token_ids", o)) for o in outs]


def speed_rows(best: dict, batch: int, ref: list[list[int]]) -> list[dict]:
    """Rows of the ``(quantization, mode)`` keys of ``best``: tokens/s, ratios to the float32 variant
    of the same mode and to the float32 full model, mean exit layer, free-running agreement with ``ref``."""
    rows = []
    base = {mode: best[("none", mode)][1] for mode in ("full", "ee") if ("none", mode) in best}
    for key, (outs, tps, mean_layer, _) in best.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            continue
        q, mode = key
        row = {"quantization": q, "mode": mode, "batch": batch, "tokens_per_s": round(tps, 2),
               "mean_exit_layer": round(mean_layer, 2),
               "agreement_free": round(free_agreement(token_ids(outs), ref), 4)}
        if mode in base:
            row["speedup_vs_none"] = round(tps / base[mode], 3)
        if ("none", "full") in best:
            row["speedup_vs_float_full"] = round(tps / best[("none", "full")][1], 3)
        rows.append(row)
        print(f"  batch {batch:3d} {q:5s} {mode:4s} {tps:8.2f} tok/s  mean exit layer {mean_layer:5.2f}", flush=True)
    return rows


def shutdown_all(*llms) -> None:
    """Shut down every distinct :class:`LLM` of ``llms`` once."""
    for llm in {id(v): v for v in llms}.values():
        llm.shutdown()
