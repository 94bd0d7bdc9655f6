"""Offline throughput: full model vs early exit (each confidence measure x each batching policy, at
calibrated thresholds) vs Hugging Face transformers ``generate`` on the same weights and dtype.

Every variant generates greedily ``--max-tokens`` new tokens (EOS ignored, so all variants produce the
same token counts) for the same chat prompts at each batch size, in one process and one run, so the
ratios are comparable on a noisy machine. Prompts are the held-out *test* split recorded in the exit
heads' metadata (never used for training or calibration), repeated as needed; prefix caching is off
so that repeats do not skip prefill (HF has no prefix cache either).

Reported per (variant, batch):

* ``tokens_per_s``: generated tokens / wall seconds (prefill included), and ``speedup_vs_full``;
* ``mean_exit_layer`` (decoder layers run per generated token; L = full model);
* ``agreement_tf``: teacher-forced greedy agreement with the full model (the calibration's measure,
  see ``cluster/training/calibrate.py``): along the full model's output, the share of positions whose
  early-exit token equals the full model's token; the same for every batch size and policy, because
  with KV fill a token never depends on its batch-mates;
* ``agreement_free``: free-running: share of positions where the variant's own generated token equals
  the full model's (strict: one early difference changes every later position);
* free-running quality against the full model's answer to the same prompt (greedy, same
  ``--max-tokens``; :mod:`cluster.training.quality`): ``exact_match`` (share of answers identical
  token for token), ``rouge_l`` (mean LCS F-measure, CALM's textual consistency), ``prefix_fraction``
  (mean shared-prefix share) and ``nll_full``: the mean negative log-likelihood per token (nats) of
  the variant's answers under the full model (transformers on the same checkpoint, ``--dtype``; the
  ``full`` row's own answers are the baseline; ``--no-nll`` skips it). EOS is ignored here as for
  speed, so every answer is ``--max-tokens`` long and tokens past the point where the model would
  have stopped count too: quality of fixed-length continuations, not of the served answers;
* ``--modes verified self_speculative``: one more variant per measure and mode (``ee-<measure>-<mode>``,
  the lossless modes of ``ExitConfig.mode``; skipped with a note where ExitConfig has no ``mode``),
  with ``acceptance_rate`` (accepted / drafted tokens) and ``tokens_per_verify`` (generated tokens
  per verification pass) when the outputs carry ``num_draft_tokens``, ``num_accepted_tokens`` and
  ``num_verify_steps``; their ``agreement_tf`` is None (lossless: every emitted token is the full
  model's);
* at batch 1: ``weight_GBps`` (weight bytes the token's forward reads: layers run, KV-fill
  projections of skipped layers, exit heads and classifiers checked, LM head) and
  ``bandwidth_fraction`` = that / the machine's measured read bandwidth (``torch.sum`` over 1 GiB).

Also times the parts of a decode step at batch 1 and 16 (one decoder layer, one KV fill, LM head,
exit head adapter, exit classifier): the per-check cost breakdown.

    python -m bench.offline --batch-sizes 1 4 16 32 --max-tokens 64 --hf
    python -m bench.offline --sweep 0.3 0.5 0.7 0.8 0.9 --batch-sizes 1 16    # speed vs agreement
    python -m bench.offline --batch-sizes 1 4 16 --modes verified self_speculative   # + lossless modes
"""
from __future__ import annotations

import argparse
import dataclasses

from bench.common.engines import engine_kwargs, run_engine, run_hf, shutdown_all
from bench.common.exits import LOSSLESS, cfg_json, measure_configs, mode_configs, speculative_stats
from bench.common.limits import part_costs, read_bandwidth_gbps, weight_bytes_per_token
from bench.common.prompts import chat_prompts, held_out_setup
from bench.common.quality import NLLCache, TeacherForced, free_agreement, quality_columns
from bench.common.results import print_table, save
from cluster import LLM, ExitConfig
from cluster.request import LOSSY_MODES
from cluster.training.quality import load_hf_causal_lm


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=None, help="default: max(8, 2 x batch) at batch <= 4, else one batch")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--measures", nargs="+", default=None, help="default: every calibrated measure")
    ap.add_argument("--policies", nargs="+", default=list(LOSSY_MODES))
    ap.add_argument("--hf", action="store_true", help="also run transformers generate")
    ap.add_argument("--modes", nargs="*", default=[], choices=list(LOSSLESS),
                    help="also these lossless modes (ExitConfig.mode), one variant per measure each")
    ap.add_argument("--no-nll", action="store_true",
                    help="skip nll_full (it loads the full model in transformers)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds over all variants (interleaved); each variant reports its best round")
    ap.add_argument("--sweep", type=float, nargs="*", default=None,
                    help="instead: one threshold at every exit layer, these values (plus the calibrated one), "
                         "for the model's own measure with the per_sequence policy")
    ap.add_argument("--name", default=None, help="JSON name under bench/results (default: offline / offline-sweep)")
    args = ap.parse_args(argv)

    kw = engine_kwargs(args.dtype)
    full = LLM(args.model, early_exit=None, **kw)
    model = full.engine.workers.local.runner.model
    L = full.engine.model_config.num_layers
    ec, alternatives, texts, source = held_out_setup(args.model, L)
    configs = measure_configs(ec, alternatives)
    if args.measures:
        configs = {m: c for m, c in configs.items() if m in args.measures}

    if args.sweep is not None:
        return sweep(args, full, model, ec, texts, source, kw)

    variants, notes = {"full": (full, None)}, []
    for m, c in configs.items():
        for policy in args.policies:
            variants[f"ee-{m}-{policy}"] = (LLM(args.model, early_exit=dataclasses.replace(c, policy=policy), **kw),
                                            dataclasses.replace(c, policy=policy))
    for name, c in mode_configs(configs, args.modes, notes).items():
        variants[name] = (LLM(args.model, early_exit=c, **kw), c)
    for n in notes:
        print(f"note: {n}")
    rows, hist, tf_cache = [], {}, {}
    hf_full = load_hf_causal_lm(args.model, args.dtype) if (args.hf or not args.no_nll) else None
    hf_model = hf_full if args.hf else None
    nll = NLLCache(hf_full) if hf_full is not None and not args.no_nll else None
    bw = read_bandwidth_gbps()
    print(f"measured read bandwidth: {bw:.1f} GB/s")
    for batch in args.batch_sizes:
        n = args.num_prompts or (max(8, 2 * batch) if batch <= 4 else batch)
        chat = chat_prompts(full, texts, n)
        best = {}  # variant -> (outputs, tokens/s, mean exit layer, counts): best of the interleaved rounds
        for _ in range(args.repeats):
            for name, (llm, _cfg) in variants.items():
                res = run_engine(llm, chat, batch, args.max_tokens)
                if name not in best or res[1] > best[name][1]:
                    best[name] = res
            if hf_model is not None:
                outs, tps = run_hf(hf_model, chat, batch, args.max_tokens)
                if "hf-generate" not in best or tps > best["hf-generate"][1]:
                    best["hf-generate"] = (outs, tps, float(L), None)
        ref = [o.token_ids for o in best["full"][0]]
        for name, (llm, cfg) in variants.items():
            outs, tps, mean_layer, counts = best[name]
            toks = [o.token_ids for o in outs]
            row = {"variant": name, "batch": batch, "tokens_per_s": round(tps, 2),
                   "mean_exit_layer": round(mean_layer, 2), "agreement_free": round(free_agreement(toks, ref), 4),
                   **quality_columns(toks, ref, chat, nll), **speculative_stats(outs, cfg)}
            if getattr(cfg, "mode", None) in LOSSLESS:
                row["agreement_tf"] = None  # lossless: every emitted token is the full model's
            elif cfg is not None:
                key = (cfg.confidence, batch)
                if key not in tf_cache:
                    tf_cache[key] = TeacherForced(model, cfg, chat, ref).stats(cfg)
                row["agreement_tf"] = round(tf_cache[key]["agreement"], 4)
            else:
                row["agreement_tf"] = 1.0
            if batch == 1:
                gbps = weight_bytes_per_token(model, llm.engine.workers.local.runner.heads, mean_layer) * tps / 1e9
                row.update(weight_GBps=round(gbps, 2), bandwidth_fraction=round(gbps / bw, 3))
            rows.append(row)
            hist[f"{name}@{batch}"] = {str(k): v for k, v in sorted(counts.items())}
            print(f"  batch {batch:3d}  {name:28s} {tps:8.2f} tok/s  mean exit layer {mean_layer:5.2f}", flush=True)
        if hf_model is not None:
            outs, tps = best["hf-generate"][:2]
            rows.append({"variant": "hf-generate", "batch": batch, "tokens_per_s": round(tps, 2),
                         "mean_exit_layer": L, "agreement_free": round(free_agreement(outs, ref), 4),
                         "agreement_tf": None, **quality_columns(outs, ref, chat, nll)})
            print(f"  batch {batch:3d}  {'hf-generate':28s} {tps:8.2f} tok/s", flush=True)
        full_tps = next(r["tokens_per_s"] for r in rows if r["variant"] == "full" and r["batch"] == batch)
        hf_tps = next((r["tokens_per_s"] for r in rows if r["variant"] == "hf-generate" and r["batch"] == batch), None)
        for r in rows:
            if r["batch"] == batch:
                r["speedup_vs_full"] = round(r["tokens_per_s"] / full_tps, 3)
                if hf_tps:
                    r["speedup_vs_hf"] = round(r["tokens_per_s"] / hf_tps, 3)
    costs = part_costs(model, variants[next(k for k in variants if k != "full")][0].engine.workers.local.runner.heads
                       if len(variants) > 1 else None)
    cols = ["variant", "batch", "tokens_per_s", "speedup_vs_full", "speedup_vs_hf", "mean_exit_layer",
            "agreement_tf", "agreement_free", "exact_match", "rouge_l", "nll_full", "acceptance_rate",
            "tokens_per_verify", "weight_GBps", "bandwidth_fraction"]
    print_table(rows, cols)
    print("per-part cost (ms per call):")
    print_table(costs, list(costs[0].keys()))
    path = save(args.name or "offline", {
        "args": vars(args), "prompts": source, "num_layers": L, "read_bandwidth_GBps": round(bw, 2),
        "exit_configs": {m: cfg_json(c) for m, c in configs.items()}, "rows": rows,
        "exit_layer_counts": hist, "part_costs_ms": costs, "notes": notes})
    print(f"saved {path}")
    shutdown_all(*(llm for llm, _ in variants.values()))


def sweep(args, full: LLM, model, ec: ExitConfig, texts, source, kw) -> None:
    """Speed vs teacher-forced agreement as one threshold (at every exit layer) varies."""
    cfg = dataclasses.replace(ec, policy="per_sequence")
    ee = LLM(args.model, early_exit=cfg, **kw)
    rows = []
    for batch in args.batch_sizes:
        n = args.num_prompts or (max(8, 2 * batch) if batch <= 4 else batch)
        chat = chat_prompts(full, texts, n)
        ref, full_tps, _, _ = run_engine(full, chat, batch, args.max_tokens)
        ref = [o.token_ids for o in ref]
        tf = TeacherForced(model, cfg, chat, ref)
        for thr in [None, *sorted(args.sweep)]:
            # full and early exit timed back to back, best of --repeats each: ratios robust to drift
            full_tps = max(full_tps if thr is None else 0.0,
                           *(run_engine(full, chat, batch, args.max_tokens)[1] for _ in range(args.repeats)))
            outs, tps, mean_layer, _ = max((run_engine(ee, chat, batch, args.max_tokens, exit_threshold=thr)
                                            for _ in range(args.repeats)), key=lambda r: r[1])
            st = tf.stats(cfg, thr)
            rows.append({"variant": f"ee-{cfg.confidence}-per_sequence", "batch": batch,
                         "threshold": "calibrated" if thr is None else thr, "tokens_per_s": round(tps, 2),
                         "speedup_vs_full": round(tps / full_tps, 3), "mean_exit_layer": round(mean_layer, 2),
                         "agreement": round(st["agreement"], 4),
                         "agreement_free": round(free_agreement([o.token_ids for o in outs], ref), 4),
                         **quality_columns([o.token_ids for o in outs], ref, chat, None)})
            print(f"  batch {batch:3d} threshold {rows[-1]['threshold']!s:10s} {tps:8.2f} tok/s "
                  f"x{rows[-1]['speedup_vs_full']:.2f}  agreement {st['agreement']:.4f}", flush=True)
    print_table(rows, ["variant", "batch", "threshold", "tokens_per_s", "speedup_vs_full", "mean_exit_layer",
                       "agreement", "agreement_free", "exact_match", "rouge_l"])
    path = save(args.name or "offline-sweep", {"args": vars(args), "prompts": source,
                                               "exit_config": cfg_json(cfg), "rows": rows})
    print(f"saved {path}")
    ee.shutdown()
    full.shutdown()


if __name__ == "__main__":
    main()
