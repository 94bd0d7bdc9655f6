"""``layer_skip`` with an online skip set (CLaSp) against the static one and the full model (issue 17).

One engine per quantization (the default model), held-out prompts at batch 1, greedy, EOS ignored;
the variants run interleaved (best of ``--rounds``): the full model, ``layer_skip`` with the static
skip set (the exit config's, else the default rule) and with ``skip_selection="online"`` (same size,
re-chosen every ``RESELECT_EVERY`` verifications), each with a fixed draft length ``--k`` (acceptance
measured on every iteration) and with the adaptive draft control. Reported: acceptance, verified
tokens per verification, tok/s and its ratio to the full model, and token-for-token equality.

    PYTHONPATH=$PWD python -m bench.skip_online --quantizations none int4 --prompts 8 --max-tokens 32
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from bench.common.engines import engine_kwargs, run_batch
from bench.common.prompts import chat_prompts, held_out_prompts
from bench.common.results import print_table, save
from bench.common.timing import interleaved_best
from cluster import LLM, SamplingParams
from cluster.llm import model_exit_config
from cluster.model.skip_select import RESELECT_EVERY
from cluster.request import default_skip_layers


def variants(k: int) -> dict[str, dict]:
    ls = dict(exit_mode="layer_skip")
    return {"full": dict(early_exit=False),
            f"static-k{k}": dict(ls, skip_selection="static", num_draft_tokens=k),
            f"online-k{k}": dict(ls, skip_selection="online", num_draft_tokens=k),
            "static-adaptive": dict(ls, skip_selection="static"),
            "online-adaptive": dict(ls, skip_selection="online")}


def measure(quant: str, n_prompts: int, max_tokens: int, k: int, rounds: int,
            skip_layers: Optional[tuple[int, ...]] = None) -> tuple[list[dict], dict]:
    from cluster.model.loader import resolve_model_dir

    model_dir = resolve_model_dir(None)
    shipped = model_exit_config(model_dir, 30)
    # layer_skip as the engine's default mode: the compiled decode step builds graphs for the default
    # mode's segments, so the static set's drafts run compiled like the full model (online sets run the
    # layers they keep eagerly when their segments differ)
    ec = dataclasses.replace(shipped, spec_max_batch=1, mode="layer_skip",
                             skip_layers=skip_layers or shipped.skip_layers)
    llm = LLM(None, quantization=quant, early_exit=ec, **engine_kwargs("float32"))
    try:
        texts, source = held_out_prompts(llm.engine.exit_config)
        prompts = chat_prompts(llm, texts, n_prompts)
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        run_batch(llm, prompts[:1], 1, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        runs = {name: (lambda m=mode: run_batch(llm, prompts, 1, sp, **m)) for name, mode in variants(k).items()}
        best = interleaved_best(runs, rounds, score=lambda r: -r[1])
        ref = [o.token_ids for o in best["full"][0]]
        full_tps = sum(len(t) for t in ref) / best["full"][1]
        L = llm.engine.model_config.num_layers
        skip = llm.engine.exit_config.skip_layers or default_skip_layers(L)
        rows = []
        for name, (outs, secs) in best.items():
            drafts = sum(o.num_draft_tokens for o in outs)
            acc = sum(o.num_accepted_tokens for o in outs)
            ver = sum(o.num_verify_steps for o in outs)
            tps = sum(len(o.token_ids) for o in outs) / secs
            rows.append({"quant": quant, "variant": name, "equal_to_full": [o.token_ids for o in outs] == ref,
                         "acceptance": round(acc / drafts, 3) if drafts else None,
                         "tokens_per_verify": round((acc + ver) / ver, 3) if ver else None,
                         "verifications": ver, "tok_s": round(tps, 2), "x_full": round(tps / full_tps, 3)})
        return rows, {"prompts_source": source, "skip_layers": list(skip), "num_layers": L}
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantizations", nargs="+", default=["none", "int4"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=3, help="fixed draft length of the -k variants")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip-layers", type=int, nargs="+", default=None,
                    help="the static skip set (default: the exit config's, else the default rule)")
    args = ap.parse_args()
    rows, meta = [], {}
    skip = tuple(sorted(set(args.skip_layers))) if args.skip_layers else None
    for q in args.quantizations:
        r, meta[q] = measure(q, args.prompts, args.max_tokens, args.k, args.rounds, skip)
        rows += r
        print_table(r, list(r[0]))
    print_table(rows, list(rows[0]))
    print(save("skip_online", {"args": vars(args), "reselect_every": RESELECT_EVERY, "meta": meta,
                               "note": "batch 1, one engine per quantization, variants interleaved (best of rounds); "
                                       "shared 2-core machine: tok/s ratios are noisy, acceptance is exact",
                               "rows": rows}))


if __name__ == "__main__":
    main()
