"""Weight-only quantization: quality and speed of ``none`` / ``int8`` / ``int4`` side by side.

Quality (full model, no exits), along the float32 model's greedy answers to held-out prompts
(the exit heads' test split, as in ``bench.offline``):

* ``agreement_tf``: teacher-forced greedy agreement: share of answer positions where the quantized
  model's argmax equals the float32 model's token (one packed forward per prompt + answer);
* ``nll``: mean negative log-likelihood per token of the float32 model's answers under each model.

Speed: tokens/s (greedy, EOS ignored, prefill included) at each batch size for every quantization,
full model and the model's own early-exit config (its float-calibrated thresholds, not re-calibrated),
in interleaved rounds (best of ``--repeats``), with ``agreement_free`` (free-running agreement with the
float32 full model) and the mean exit layer. Also the weight bytes each model holds per rank.

    python -m bench.quant --quantization none int8 int4 --batch-sizes 1 16 --max-tokens 32
"""
from __future__ import annotations

import argparse
import functools
from typing import Optional

import torch

from bench.common import interleaved_best, print_table, save
from bench.offline import free_agreement, held_out_prompts, own_exit_config, run_engine
from bench.weights import held_bytes
from cluster import LLM
from cluster.model.loader import resolve_model_dir


@torch.inference_mode()
def teacher_forced(model, prompts: list[list[int]], answers: list[list[int]]) -> dict:
    """Greedy agreement and mean NLL of ``answers`` (the reference's tokens) under ``model``."""
    from cluster.training.features import full_sequence_hidden

    L = model.config.num_layers
    same = total = 0
    nll = 0.0
    for p, a in zip(prompts, answers):
        ids = list(p) + list(a)
        rows = torch.arange(len(p) - 1, len(ids) - 1)  # positions predicting each answer token
        h = full_sequence_hidden(model, [ids], [rows], [L])[L]
        logits = model.lm_head.full_logits(model.final_local_logits(h.to(next(model.parameters()).dtype))).float()
        target = torch.tensor(a)
        same += int((logits.argmax(-1) == target).sum())
        nll += float(-torch.log_softmax(logits, -1).gather(1, target[:, None]).sum())
        total += len(a)
    return {"agreement_tf": same / total, "nll": nll / total}


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
    runs (key -> ``run(prompts, batch, max_tokens)`` returning the same tuple, e.g. :mod:`bench.peers`)."""
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quality-prompts", type=int, default=8)
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts timed at batch 1 (larger: one batch)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; each variant reports its best")
    ap.add_argument("--group-size", type=int, default=None, help="int4 group size (default: the engine's)")
    ap.add_argument("--no-early-exit", action="store_true", help="full model only")
    ap.add_argument("--name", default="quant", help="JSON name under bench/results")
    args = ap.parse_args(argv)

    kw = dict(dtype="float32", enable_prefix_caching=False, kv_cache_memory_bytes=256 << 20)
    if args.group_size:
        kw["quant_group_size"] = args.group_size
    variants = make_variants(args.model, args.quantization, not args.no_early_exit, **kw)
    ref_llm = variants.get(("none", "full")) or LLM(args.model, early_exit=None, **kw)
    L = ref_llm.engine.model_config.num_layers
    ec, _ = own_exit_config(resolve_model_dir(args.model), L)
    texts, source = held_out_prompts(ec)
    print(f"prompts: {len(texts)} from {source}; exit config: {ec.confidence} at layers {ec.exit_layers}")
    chat = lambda n: [ref_llm.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}])  # noqa: E731
                      for i in range(n)]
    runner = lambda llm: llm.engine.workers.local.runner  # noqa: E731

    # ---- quality: teacher-forced along the float32 full model's greedy answers
    qp = chat(args.quality_prompts)
    ref_outs, _, _, _ = run_engine(ref_llm, qp, len(qp), args.max_tokens)
    answers = [o.token_ids for o in ref_outs]
    quality = []
    for q in args.quantization:
        llm = variants[(q, "full")]
        model = runner(llm).model
        st = teacher_forced(model, qp, answers)
        quality.append({"quantization": q, "agreement_tf": round(st["agreement_tf"], 4), "nll": round(st["nll"], 4),
                        "weight_MB": round(held_bytes(model) / 1e6, 1)})
        print(f"  quality {q:5s} agreement_tf {st['agreement_tf']:.4f}  nll {st['nll']:.4f}", flush=True)

    # ---- speed: interleaved rounds
    rows = []
    for batch in args.batch_sizes:
        prompts = chat(args.batch1_prompts if batch == 1 else batch)
        ref = token_ids(run_engine(ref_llm, prompts, batch, args.max_tokens)[0])
        rows += speed_rows(time_variants(variants, prompts, batch, args.max_tokens, args.repeats), batch, ref)
    print("quality (full model, teacher-forced along float32 greedy answers):")
    print_table(quality, ["quantization", "agreement_tf", "nll", "weight_MB"])
    print("speed:")
    print_table(rows, ["quantization", "mode", "batch", "tokens_per_s", "speedup_vs_none", "speedup_vs_float_full",
                       "mean_exit_layer", "agreement_free"])
    path = save(args.name, {"args": vars(args), "prompts": source, "num_layers": L,
                            "int4_group_size": ref_llm.engine.model_config.quant_group_size,
                            "torch_threads": torch.get_num_threads(), "exit_config": {
                                "confidence": ec.confidence, "exit_layers": list(ec.exit_layers)},
                            "quality": quality, "rows": rows})
    print(f"saved {path}")
    for llm in {id(v): v for v in [*variants.values(), ref_llm]}.values():
        llm.shutdown()


if __name__ == "__main__":
    main()
