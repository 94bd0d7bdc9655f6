"""Offline throughput: full model vs early exit (each batching policy) vs HF transformers generate.

Every variant runs the same chat prompts, greedy, ``--max-tokens`` new tokens each (EOS ignored so
all variants produce the same token counts), at each batch size, in one process and one run, so
the ratios are comparable on a noisy machine. Reports output tokens/s, mean exit layer, greedy
agreement with the full model (share of positions whose token equals the full model's, over each
sequence), and speed-up over the full model.

    python -m bench.offline --batch-sizes 1 16 --max-tokens 64
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import load_prompts, print_table, save
from cluster import LLM, ExitConfig, SamplingParams



def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b):
        total += len(y)
        same += sum(int(p == q) for p, q in zip(x, y))
    return same / max(1, total)


def run_engine(llm: LLM, prompt_ids, batch: int, max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompt_ids[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompt_ids), batch):
        outs += llm.generate(prompt_ids[i:i + batch], params)
    dt = time.perf_counter() - t0
    toks = sum(len(o.token_ids) for o in outs)
    layers = [l for o in outs for l in o.exit_layers]
    return outs, toks / dt, sum(layers) / len(layers)


def run_hf(model_dir: str, prompt_ids, batch: int, max_tokens: int, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=None, help="default: 2 batches of the largest size")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threshold", type=float, default=None, help="override the exit threshold")
    ap.add_argument("--hf", action="store_true", help="also run transformers generate")
    ap.add_argument("--name", default="offline")
    args = ap.parse_args(argv)

    full = LLM(args.model, early_exit=None, dtype=args.dtype)
    from cluster.llm import model_exit_config
    from cluster.model.loader import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    ec = model_exit_config(model_dir, full.engine.model_config.num_layers)
    if args.threshold is not None:
        ec = ExitConfig(**{**ec.__dict__, "threshold": args.threshold})
    variants = {"full": full}
    for policy in ("paper", "per_sequence"):
        variants[f"ee-{policy}"] = LLM(args.model, early_exit=ExitConfig(**{**ec.__dict__, "policy": policy}),
                                       dtype=args.dtype)
    rows = []
    for batch in args.batch_sizes:
        n = args.num_prompts or max(2 * batch, 4)
        prompt_ids = [full.apply_chat_template([{"role": "user", "content": p}]) for p in load_prompts(n)]
        ref = None
        for name, llm in variants.items():
            outs, tps, mean_layer = run_engine(llm, prompt_ids, batch, args.max_tokens)
            toks = [o.token_ids for o in outs]
            ref = toks if name == "full" else ref
            rows.append({"variant": name, "batch": batch, "tokens_per_s": round(tps, 2),
                         "mean_exit_layer": round(mean_layer, 2), "agreement": round(agreement(toks, ref), 4)})
        if args.hf:
            outs, tps = run_hf(model_dir, prompt_ids, batch, args.max_tokens, args.dtype)
            rows.append({"variant": f"hf-generate", "batch": batch, "tokens_per_s": round(tps, 2),
                         "mean_exit_layer": full.engine.model_config.num_layers,
                         "agreement": round(agreement(outs, ref), 4)})
        full_tps = next(r["tokens_per_s"] for r in rows if r["variant"] == "full" and r["batch"] == batch)
        for r in rows:
            if r["batch"] == batch:
                r["speedup_vs_full"] = round(r["tokens_per_s"] / full_tps, 3)
    print_table(rows, ["variant", "batch", "tokens_per_s", "speedup_vs_full", "mean_exit_layer", "agreement"])
    path = save(args.name, {"args": vars(args), "exit_config": {k: v for k, v in ec.__dict__.items()},
                            "num_layers": full.engine.model_config.num_layers, "rows": rows})
    print(f"saved {path}")
    for llm in variants.values():
        llm.shutdown()


if __name__ == "__main__":
    main()
