"""Where a decode step's time goes (torch.profiler), at batch 1 by default.

One engine per variant (quantization x full model / early exit). After a warm-up, ``--steps``
decode iterations of ``engine.step()`` run under ``torch.profiler``; every top-level aten op is put
in the category of the code that called it (the benchmark wraps these functions in
``record_function`` labels; the engine itself is unchanged):

* ``decoder_matmul``: the decoder layers' projections (float, int8 or int4 kernels);
* ``attention``: KV-cache writes, block-table gathers and SDPA (``write_kv``, ``paged_attention``);
* ``lm_head``: final norm + LM head (``final_local_logits``) and the vocab gather;
* ``exit_checks``: exit heads / classifiers and their decisions (``ExitHeads.decide``);
* ``sampler``: :func:`cluster.model.layers.sampler.sample` and its host transfer;
* ``other_ops``: every other aten op (norms, RoPE, residual adds, casts, embedding ...);
* ``python``: the rest of the profiled step (Python, scheduler, detokenizer, dispatcher).

It also reports the step's median wall time without the profiler and the number of aten ops per
step (the dispatcher cost grows with it).

    python -m bench.profile_step --quantization none int8 int4 --early-exit
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common.prompts import chat_prompts
from bench.common.results import print_table, save
from cluster import LLM, SamplingParams

LABELS = {  # (module, qualified attribute) -> category
    ("cluster.model.llama", "write_kv"): "attention",
    ("cluster.model.llama", "paged_attention"): "attention",
    ("cluster.model.llama", "LlamaForCausalLM.final_local_logits"): "lm_head",
    ("cluster.model.layers.embedding", "ParallelLMHead.full_logits"): "lm_head",
    ("cluster.model.exits", "ExitHeads.decide"): "exit_checks",
    ("cluster.model.exits", "ExitHeads.exit_state"): "exit_checks",
    ("cluster.worker.model_runner", "sample"): "sampler",
}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int4pack_mm"}
CATEGORIES = ["decoder_matmul", "attention", "lm_head", "exit_checks", "sampler", "other_ops", "python"]


@contextlib.contextmanager
def labelled():
    """Wrap the functions of :data:`LABELS` in ``record_function(category)`` for the duration."""
    import importlib

    saved = []
    for (mod_name, attr), cat in LABELS.items():
        mod = importlib.import_module(mod_name)
        owner, name = (mod, attr) if "." not in attr else (getattr(mod, attr.split(".")[0]), attr.split(".")[1])
        fn = getattr(owner, name)

        def wrap(fn=fn, cat=cat):
            @functools.wraps(fn)
            def inner(*a, **k):
                with record_function(f"eeserve::{cat}"):
                    return fn(*a, **k)
            return inner
        saved.append((owner, name, fn))
        setattr(owner, name, wrap())
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _category(event) -> str:
    p = event.cpu_parent
    while p is not None:
        if p.name.startswith("eeserve::"):
            return p.name[len("eeserve::"):]
        p = p.cpu_parent
    return "decoder_matmul" if event.name in MATMUL_OPS else "other_ops"


def _decode_steps(llm: LLM, prompts: list[list[int]], steps: int, ctx=None) -> list[float]:
    """Add ``prompts`` (one batch), run their prefill, then time ``steps`` decode iterations (inside
    the context manager ``ctx`` if given, e.g. the profiler)."""
    eng = llm.engine
    for p in prompts:
        llm.add_request(p, SamplingParams(max_tokens=steps + 8, ignore_eos=True))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()
    times = []
    with ctx if ctx is not None else contextlib.nullcontext():
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
    while eng.has_unfinished_requests():
        eng.step()
    return times


def profile_variant(llm: LLM, prompts: list[list[int]], steps: int) -> dict:
    wall = statistics.median(_decode_steps(llm, prompts, steps))
    prof = profile(activities=[ProfilerActivity.CPU])
    with labelled():
        prof_wall = sum(_decode_steps(llm, prompts, steps, ctx=prof)) / steps
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    ms = collections.Counter()
    for e in top:
        ms[_category(e)] += e.cpu_time_total / 1e3 / steps
    ms["python"] = max(0.0, prof_wall * 1e3 - sum(ms.values()))
    total = sum(ms.values())
    return {"step_ms": round(wall * 1e3, 2), "tokens_per_s": round(len(prompts) / wall, 1),
            "profiled_step_ms": round(prof_wall * 1e3, 2), "aten_ops_per_step": round(len(events) / steps),
            **{f"{c}_ms": round(ms[c], 2) for c in CATEGORIES},
            **{f"{c}_pct": round(100 * ms[c] / total, 1) for c in CATEGORIES}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--early-exit", action="store_true", help="also profile the model's own exit config")
    ap.add_argument("--torch-compile", action="store_true", help="also profile torch_compile=True")
    ap.add_argument("--name", default="profile-step")
    args = ap.parse_args(argv)

    rows = []
    kw = dict(dtype=args.dtype, enable_prefix_caching=False, kv_cache_memory_bytes=128 << 20)
    for q in args.quantization:
        modes = [("full", None, False)] + ([("ee", "default", False)] if args.early_exit else [])
        modes += [("full+compile", None, True)] if args.torch_compile else []
        for mode, ee, compiled in modes:
            extra = {} if ee else {"early_exit": None}
            llm = LLM(args.model, quantization=q, torch_compile=compiled, **extra, **kw)
            try:
                texts = ["Name three planets and say one thing about each.", "Explain how bread is made.",
                         "Write a haiku about rivers.", "What is a bicycle?"]
                prompts = chat_prompts(llm, texts, args.batch)
                _decode_steps(llm, prompts, 4)  # warm-up (and compilation)
                row = {"quantization": q, "mode": mode, "batch": args.batch, **profile_variant(llm, prompts, args.steps)}
            finally:
                llm.shutdown()
            rows.append(row)
            print(f"  {q:5s} {mode:12s} {row['step_ms']:7.2f} ms/step", flush=True)
    cols = ["quantization", "mode", "step_ms", "tokens_per_s", "aten_ops_per_step"] + [f"{c}_ms" for c in CATEGORIES]
    print_table(rows, cols)
    print_table(rows, ["quantization", "mode"] + [f"{c}_pct" for c in CATEGORIES])
    path = save(args.name, {"args": vars(args), "torch_threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
