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
import collections
import dataclasses
import json
import time
from typing import Optional

import torch

from bench.common import load_prompts, print_table, save
from bench.weights import weight_bytes_per_token
from cluster import LLM, ExitConfig, SamplingParams
from cluster.training.quality import answers_nll, load_hf_causal_lm, quality_report

LOSSLESS = ("verified", "self_speculative")


# ----------------------------------------------------------------------------------------- prompts
def held_out_prompts(exit_config: Optional[ExitConfig]) -> tuple[list[str], str]:
    """The test split of the prompts the exit heads were trained with, else the bench prompt set."""
    if exit_config is not None and exit_config.head == "trained":
        from cluster.training.data import default_prompts_dir, load_prompts as load_all, split_prompts
        from cluster.training.pipeline import read_heads_metadata

        sp = json.loads(read_heads_metadata(exit_config.heads_path).get("splits", "{}"))
        if sp:
            splits = split_prompts(load_all(default_prompts_dir()), sp["seed"], sp["num_calib"], sp["num_test"])
            return [p.text for p in splits["test"]], "test split of the exit heads (held out)"
    return load_prompts(64), "bench.common.load_prompts"


# -------------------------------------------------------------------------------------- variants
def measure_configs(ec: ExitConfig, alternatives: dict) -> dict[str, ExitConfig]:
    """One exit config per confidence measure at its calibrated thresholds.

    The model's own config gives its measure; ``calibration.alternatives`` in its exit_config.json
    (written by ``eeserve calibrate``) gives the others. Without them: the config's threshold.
    """
    out = {ec.confidence: ec}
    for m, a in alternatives.items():
        if a.get("exit_layers"):
            out[m] = dataclasses.replace(ec, confidence=m, exit_layers=tuple(a["exit_layers"]),
                                         layer_thresholds=tuple(a["layer_thresholds"]),
                                         threshold=float(a["layer_thresholds"][0]))
    if ec.head == "shared":
        for m in ("max_prob", "top2_margin"):
            out.setdefault(m, dataclasses.replace(ec, confidence=m))
    return out


def own_exit_config(model_dir: str, num_layers: int) -> tuple[ExitConfig, dict]:
    """The model's own exit config and the calibrated ``alternatives`` recorded in the same file
    (located once: finding shipped heads fingerprints the model's weights)."""
    from cluster.engine.factory import model_exit_config_path, read_exit_config

    path = model_exit_config_path(model_dir)
    if path is None:
        return ExitConfig.default_for(num_layers), {}
    with open(path) as f:
        alternatives = json.load(f).get("calibration", {}).get("alternatives", {})
    return read_exit_config(path), alternatives


# ---------------------------------------------------------------------------------------- running
def run_engine(llm: LLM, prompt_ids, batch: int, max_tokens: int, exit_threshold=None):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompt_ids[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompt_ids), batch):
        outs += llm.generate(prompt_ids[i:i + batch], params, exit_threshold=exit_threshold)
    dt = time.perf_counter() - t0
    toks = sum(len(o.token_ids) for o in outs)
    layers = [l for o in outs for l in o.exit_layers]
    return outs, toks / dt, sum(layers) / len(layers), collections.Counter(layers)


def load_hf(model_dir: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def run_hf(model, prompt_ids, batch: int, max_tokens: int):
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


def mode_configs(configs: dict[str, ExitConfig], modes: list[str], notes: list[str]) -> dict[str, ExitConfig]:
    """``ee-<measure>-<mode>`` -> ``replace(config, mode=mode)`` (none, with a note, where ExitConfig has
    no ``mode`` field or a measure's config cannot take the mode)."""
    if not modes:
        return {}
    if "mode" not in {f.name for f in dataclasses.fields(ExitConfig)}:
        notes.append(f"--modes {modes} skipped: ExitConfig has no 'mode' field")
        return {}
    out = {}
    for m, c in configs.items():
        for mode in modes:
            try:
                out[f"ee-{m}-{mode}"] = dataclasses.replace(c, mode=mode)
            except ValueError as e:
                notes.append(f"ee-{m}-{mode} skipped: {e}")
    return out


def speculative_stats(outs, cfg: Optional[ExitConfig]) -> dict:
    """``acceptance_rate`` and ``tokens_per_verify`` of a lossless mode's outputs (if they carry the counts)."""
    if getattr(cfg, "mode", None) not in LOSSLESS:
        return {}
    counts = [(getattr(o, "num_draft_tokens", None), getattr(o, "num_accepted_tokens", None),
               getattr(o, "num_verify_steps", None)) for o in outs]
    if not counts or any(v is None for c in counts for v in c):
        return {"acceptance_rate": None, "tokens_per_verify": None}
    drafts, accepted, verifies = (sum(c[i] for c in counts) for i in range(3))
    toks = sum(len(o.token_ids) for o in outs)
    return {"acceptance_rate": round(accepted / drafts, 4) if drafts else None,
            "tokens_per_verify": round(toks / verifies, 3) if verifies else None}


class NLLCache:
    """Mean NLL per token of answers under the full model (transformers), memoised per (prompt, answer)."""

    def __init__(self, hf_model):
        self.model, self.memo = hf_model, {}

    def __call__(self, prompts, answers) -> list[float]:
        keys = [(tuple(p), tuple(a)) for p, a in zip(prompts, answers)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        for k, v in zip(todo, answers_nll(self.model, [k[0] for k in todo], [k[1] for k in todo])):
            self.memo[k] = v
        return [self.memo[k] for k in keys]


def quality_columns(outs, ref, prompts, nll: Optional[NLLCache]) -> dict:
    q = quality_report(outs, ref, nll=nll(prompts, outs) if nll is not None else None)
    row = {"exact_match": round(q["exact_match_rate"], 4), "rouge_l": round(q["rouge_l"], 4),
           "prefix_fraction": round(q["prefix_fraction"], 4)}
    if "nll" in q:
        row["nll_full"] = round(q["nll"], 4)
    return row


def free_agreement(a: list[list[int]], ref: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, ref):
        total += len(y)
        same += sum(int(p == q) for p, q in zip(x, y))
    return same / max(1, total)


class TeacherForced:
    """Teacher-forced exit statistics along the full model's outputs (cluster.training.evaluate)."""

    def __init__(self, model, ec: ExitConfig, prompt_ids, full_outputs):
        from cluster.model.exits import ExitHeads
        from cluster.training.data import Sequence
        from cluster.training.evaluate import exit_predictions, heads_layers
        from cluster.training.features import extract_features

        layers = heads_layers(ec.heads_path) if ec.head == "trained" else ec.exit_layers
        has_clf = ec.confidence == "classifier"
        probe = dataclasses.replace(ec, exit_layers=tuple(layers), layer_thresholds=None,
                                    confidence="classifier" if has_clf else "max_prob")
        seqs = [Sequence(str(i), tuple(p), tuple(o)) for i, (p, o) in enumerate(zip(prompt_ids, full_outputs))]
        with torch.inference_mode():
            feats = extract_features(model, seqs, layers, progress=False)
            self.pred = exit_predictions(ExitHeads(model, probe), feats)

    def stats(self, ec: ExitConfig, threshold: Optional[float] = None) -> dict:
        from cluster.training.calibrate import policy_stats

        thr = {l: (threshold if threshold is not None else ec.threshold_for(l)) for l in ec.exit_layers}
        return policy_stats(self.pred, ec.confidence, thr)


# ------------------------------------------------------------------------------------------ costs
def _time(fn, n: int = 50) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


@torch.inference_mode()
def part_costs(model, heads) -> list[dict]:
    """Milliseconds per call of the parts of a decode step (weights mostly cache-resident here, so
    these are lower bounds next to a real step, which streams every weight from memory)."""
    mc = model.config
    layer = model.model.layers[mc.num_layers // 2]
    rows = []
    for n in (1, 16):
        h = torch.randn(n, mc.hidden_size, dtype=next(model.parameters()).dtype)
        pos = torch.arange(n)
        mlp = _time(lambda: layer.mlp(h))
        qkv = _time(lambda: layer.self_attn.qkv_proj(h))
        row = {"batch": n, "layer_mlp_ms": mlp, "layer_qkv_ms": qkv,
               "kv_fill_ms": _time(lambda: layer.self_attn.project_kv(layer.input_layernorm(h), pos)),
               "lm_head_ms": _time(lambda: model.final_local_logits(h), n=10)}
        if heads is not None and heads.heads:
            k = next(iter(heads.heads))
            row["exit_adapter_ms"] = _time(lambda: heads.heads[k](h))
        if heads is not None and heads.classifiers:
            k = next(iter(heads.classifiers))
            row["exit_classifier_ms"] = _time(lambda: heads.classifiers[k](h))
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return rows


def read_bandwidth_gbps(gib: float = 1.0) -> float:
    """Best-of-5 ``torch.sum`` over a ``gib`` GiB float32 tensor: bytes read per second / 1e9."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=None, help="default: max(8, 2 x batch) at batch <= 4, else one batch")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--measures", nargs="+", default=None, help="default: every calibrated measure")
    ap.add_argument("--policies", nargs="+", default=["paper", "per_sequence"])
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

    from cluster.model.loader import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    kw = dict(dtype=args.dtype, enable_prefix_caching=False, kv_cache_memory_bytes=256 << 20)
    full = LLM(args.model, early_exit=None, **kw)
    model = full.engine.workers.local.runner.model
    L = full.engine.model_config.num_layers
    ec, alternatives = own_exit_config(model_dir, L)
    configs = measure_configs(ec, alternatives)
    if args.measures:
        configs = {m: c for m, c in configs.items() if m in args.measures}
    texts, source = held_out_prompts(ec)
    print(f"prompts: {len(texts)} from {source}; exit config: {ec.confidence} at layers {ec.exit_layers}")

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
        chat = [full.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}]) for i in range(n)]
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
        "exit_configs": {m: _cfg_json(c) for m, c in configs.items()}, "rows": rows,
        "exit_layer_counts": hist, "part_costs_ms": costs, "notes": notes})
    print(f"saved {path}")
    for llm, _ in variants.values():
        llm.shutdown()


def _cfg_json(c: ExitConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(c).items()}


def sweep(args, full: LLM, model, ec: ExitConfig, texts, source, kw) -> None:
    """Speed vs teacher-forced agreement as one threshold (at every exit layer) varies."""
    cfg = dataclasses.replace(ec, policy="per_sequence")
    ee = LLM(args.model, early_exit=cfg, **kw)
    rows = []
    for batch in args.batch_sizes:
        n = args.num_prompts or (max(8, 2 * batch) if batch <= 4 else batch)
        chat = [full.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}]) for i in range(n)]
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
                                               "exit_config": _cfg_json(cfg), "rows": rows})
    print(f"saved {path}")
    ee.shutdown()
    full.shutdown()


if __name__ == "__main__":
    main()
