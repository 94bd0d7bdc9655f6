"""Lossless early exit vs the full model vs lossy exits: speed and free-running quality, side by side.

One engine (the default model, its shipped exit heads and calibration, ``quantization=auto``) serves
every variant through per-request modes, so all variants share weights, caches and machine noise;
variants are interleaved per batch and repeated (``--repeats``), the best run is kept. Prompts: the
held-out test split of the exit heads (never used for training or calibration), as chat; greedy,
``--max-tokens`` tokens each, EOS ignored (every variant generates the same number of tokens).

Variants: ``full`` (the full model), ``lossy`` (the exit config's policy at its calibrated
thresholds), ``verified`` (AdaDecode-style), ``self_spec`` (LayerSkip-style at the default draft
layer with the adaptive draft length), ``layer_skip`` (SWIFT-style: the model minus ``--skip-layers``,
default the exit config's or every other middle layer, adaptive draft length), ``layer_skip_online``
(the same starting set re-chosen online, CLaSp), ``layer_skip_k1`` / ``layer_skip_online_k1`` (one
draft on every iteration where drafting is allowed, ``--spec-max-batch``: what drafting costs where
the draft control switches it off), and ``self_spec@E`` (fixed draft length, every exit layer E, and
the skip set; batch 1 only: the per-draft-layer acceptance that bounds the speed-up).

Reported per (variant, batch): tokens/s (generated tokens / wall time, prefill included) and the
ratio to ``full``; acceptance rate (accepted / proposed drafts); verified tokens per verification
iteration; mean exit layer; exact-match rate and ROUGE-L (LCS F-measure) of the answers against the
full model's (same batch). The per-draft-layer table adds the draft cost ``c`` of the engine's cost
model (:meth:`cluster.engine.engine.LLMEngine.draft_cost`) and the speed-up bound
``max_k (1 - a^(k+1)) / ((1 - a)(1 + k c))`` (Leviathan et al. 2023) at the measured acceptance ``a``.

    python -m bench.spec --batch-sizes 1 4 16 --max-tokens 64 --repeats 2
    python -m bench.spec --batch-sizes 1 --skip-layers 8 10 12 14 16 18 20 22
    python -m bench.spec --batch-sizes 1 4 16 32 --repeats 3 --skip-layers 4 5 6 7 8 18 26 28 \
        --engine-mode layer_skip --spec-max-batch 64 --lossy-thresholds \
        --variants default verified self_spec layer_skip layer_skip_online layer_skip_k1 layer_skip_online_k1
"""
from __future__ import annotations

import argparse
from typing import Optional

from bench.common.engines import run_batch
from bench.common.plots import plot_frontier
from bench.common.prompts import chat_prompts, held_out_prompts
from bench.common.results import print_table, results_dir, save
from cluster import LLM, SamplingParams
from cluster.core.draft_control import DraftLengthController
from cluster.frontend.outputs import CompletionOutput
from cluster.request import default_skip_layers
from cluster.training.quality import exact_match, rouge_l


def summarize(outs: list[CompletionOutput], ref: Optional[list[CompletionOutput]], seconds: float, L: int) -> dict:
    n = sum(len(o.token_ids) for o in outs)
    drafts = sum(o.num_draft_tokens for o in outs)
    acc = sum(o.num_accepted_tokens for o in outs)
    steps = sum(o.num_verify_steps for o in outs)
    row = {"tokens": n, "seconds": round(seconds, 3), "tokens_per_s": round(n / seconds, 2),
           "mean_exit_layer": round(sum(sum(o.exit_layers) for o in outs) / max(1, n), 2),
           "acceptance_rate": round(acc / drafts, 3) if drafts else None,
           "tokens_per_verify": round((acc + steps) / steps, 3) if steps else None,
           "drafts_per_token": round(drafts / max(1, n), 3)}
    if ref is not None:
        row["exact_match"] = round(sum(exact_match(o.token_ids, r.token_ids) for o, r in zip(outs, ref)) / len(outs), 3)
        row["rouge_l"] = round(sum(rouge_l(o.token_ids, r.token_ids) for o, r in zip(outs, ref)) / len(outs), 3)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=16, help="prompts per batch size (at least the batch size)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant; the fastest is kept")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--skip-layers", type=int, nargs="+", default=None,
                    help="layer_skip variant: decoder layers its drafts leave out (default: the exit config's, else "
                         "every other layer of the middle half)")
    ap.add_argument("--layer-prompts", type=int, default=8, help="prompts for the per-draft-layer table (batch 1)")
    ap.add_argument("--lossy-thresholds", type=float, nargs="*", default=[0.5, 0.9, 0.99],
                    help="extra lossy variants at one threshold for every exit layer (the frontier's lossy points)")
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                    help="weights (auto: int4 for the default model's Q4 GGUF on the CPU; none: float32)")
    ap.add_argument("--engine-mode", default=None, choices=["full", "layer_skip"],
                    help="the engine's default mode (default: the exit config's). The compiled decode step builds "
                         "its graphs for the default mode only, so `layer_skip` compiles the drafts' kept layers "
                         "(with --skip-layers) as well as the full model, and the layer_skip row is not run eagerly")
    ap.add_argument("--spec-max-batch", type=int, default=None,
                    help="the engine's spec_max_batch (default: the exit config's, 1): with more, lossless modes may "
                         "draft at larger batches where the batch-aware draft control lets them")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="run only these variants (and `full`), e.g. `layer_skip layer_skip_k1`")
    ap.add_argument("--name", default="spec")
    args = ap.parse_args(argv)

    skip_arg = tuple(sorted(set(args.skip_layers))) if args.skip_layers else None
    early_exit = {}
    if args.engine_mode or args.spec_max_batch is not None:
        from cluster.engine.factory import model_exit_config_with
        skip_cfg = skip_arg if args.engine_mode == "layer_skip" else None
        early_exit = dict(early_exit=model_exit_config_with(args.model, mode=args.engine_mode, skip_layers=skip_cfg,
                                                            spec_max_batch=args.spec_max_batch))
    llm = LLM(args.model, quantization=args.quantization, **early_exit)
    eng = llm.engine
    ec = eng.exit_config
    L = eng.model_config.num_layers
    texts, source = held_out_prompts(ec)
    prompts = chat_prompts(llm, texts, len(texts))
    sp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    k = args.num_draft_tokens
    skip = skip_arg or tuple(sorted(set(ec.skip_layers or default_skip_layers(L))))
    variants = {
        "full": dict(early_exit=False),
        "default": dict(),  # what a request that names no mode gets (the exit config's mode)
        "lossy": dict(exit_mode=ec.policy),
        **{f"lossy@{t}": dict(exit_mode=ec.policy, exit_threshold=t) for t in args.lossy_thresholds},
        "verified": dict(exit_mode="verified", num_draft_tokens=k),  # a cap; draft control stays on
        "self_spec": dict(exit_mode="self_speculative"),  # adaptive draft length (the config's)
        "layer_skip": dict(exit_mode="layer_skip", skip_layers=skip),  # adaptive draft length (the config's)
        # CLaSp's online re-selection from the same starting set (its re-chosen kept runs are not among the
        # compiled graphs: they run eagerly)
        "layer_skip_online": dict(exit_mode="layer_skip", skip_layers=skip, skip_selection="online"),
        # one draft per verification on every iteration where drafting is allowed (spec_max_batch): what
        # drafting costs where the draft control would switch it off
        "layer_skip_k1": dict(exit_mode="layer_skip", skip_layers=skip, num_draft_tokens=1),
        "layer_skip_online_k1": dict(exit_mode="layer_skip", skip_layers=skip, skip_selection="online",
                                     num_draft_tokens=1),
    }
    if args.variants:
        unknown = set(args.variants) - set(variants)
        if unknown:
            ap.error(f"--variants: unknown {sorted(unknown)}; choose from {list(variants)}")
        variants = {n: m for n, m in variants.items() if n == "full" or n in args.variants}
    rows = []
    for B in args.batch_sizes:
        ps = (prompts * (1 + max(B, args.num_prompts) // len(prompts)))[:max(B, args.num_prompts)]
        best: dict[str, tuple[list, float]] = {}
        run_batch(llm, ps[:B], B, SamplingParams(max_tokens=8, ignore_eos=True), early_exit=False)  # warm-up
        names = list(variants)
        for r in range(args.repeats):  # the order rotates each repeat: no variant always runs first (cold)
            for name in names[r % len(names):] + names[:r % len(names)]:
                mode = variants[name]
                outs, dt = run_batch(llm, ps, B, sp, **mode)
                if name not in best or dt < best[name][1]:
                    best[name] = (outs, dt)
        full_outs, full_dt = best["full"]
        for name in variants:
            outs, dt = best[name]
            row = {"variant": name, "batch": B, **summarize(outs, full_outs, dt, L)}
            row["speedup_vs_full"] = round(full_dt / dt, 3)
            rows.append(row)
        eng.check_integrity()
    print_table(rows, ["variant", "batch", "tokens_per_s", "speedup_vs_full", "acceptance_rate", "tokens_per_verify",
                       "drafts_per_token", "mean_exit_layer", "exact_match", "rouge_l"])

    # per draft layer: fixed-length drafts (no adaptive control) at batch 1, and the cost model's bound
    layer_rows = []
    ps = prompts[:args.layer_prompts]
    if args.layer_prompts:  # a per-request num_draft_tokens is a fixed draft length
        for E in ec.exit_layers:
            outs, dt = run_batch(llm, ps, 1, sp, exit_mode="self_speculative", draft_layer=E, num_draft_tokens=1)
            a = sum(o.num_accepted_tokens for o in outs) / max(1, sum(o.num_draft_tokens for o in outs))
            c = eng.draft_cost(E)
            gain = max(DraftLengthController.gain(a, kk, c) for kk in range(0, 9))
            best_k = max(range(0, 9), key=lambda kk: DraftLengthController.gain(a, kk, c))
            layer_rows.append({"draft_layer": E, "acceptance_k1": round(a, 3), "draft_cost": round(c, 3),
                               "bound_speedup": round(gain, 3), "best_k": best_k})
        # the skip set of the layer_skip variant, the same way
        outs, dt = run_batch(llm, ps, 1, sp, exit_mode="layer_skip", skip_layers=skip, num_draft_tokens=1)
        a = sum(o.num_accepted_tokens for o in outs) / max(1, sum(o.num_draft_tokens for o in outs))
        c = eng.draft_cost(None, skip)
        best_k = max(range(0, 9), key=lambda kk: DraftLengthController.gain(a, kk, c))
        layer_rows.append({"draft_layer": f"skip {list(skip)} ({len(skip) / L:.0%} of layers)", "acceptance_k1": round(a, 3),
                           "draft_cost": round(c, 3), "best_k": best_k,
                           "bound_speedup": round(DraftLengthController.gain(a, best_k, c), 3)})
    if layer_rows:
        print_table(layer_rows, ["draft_layer", "acceptance_k1", "draft_cost", "best_k", "bound_speedup"])
    plot_frontier(rows, results_dir() / f"{args.name}-frontier.png")
    save(args.name, {"rows": rows, "draft_layers": layer_rows, "prompts": source, "max_tokens": args.max_tokens,
                     "num_draft_tokens": k, "skip_layers": list(skip),
                     "exit_config": {"exit_layers": list(ec.exit_layers), "policy": ec.policy,
                                     "confidence": ec.confidence},
                     "quantization": eng.model_config.quantization, "engine_mode": ec.mode,
                     "torch_compile": eng.model_config.torch_compile, "spec_max_batch": ec.spec_max_batch,
                     "skip_draft_cost": round(eng.draft_cost(None, skip), 3)})


if __name__ == "__main__":
    main()
