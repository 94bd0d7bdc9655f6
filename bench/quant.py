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

import torch

from bench.common.engines import (engine_kwargs, make_variants, run_engine, shutdown_all, speed_rows,
                                  time_variants, token_ids)
from bench.common.limits import held_bytes
from bench.common.prompts import chat_prompts, held_out_setup
from bench.common.quality import teacher_forced
from bench.common.results import print_table, save
from cluster import LLM


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

    kw = engine_kwargs()
    if args.group_size:
        kw["quant_group_size"] = args.group_size
    variants = make_variants(args.model, args.quantization, not args.no_early_exit, **kw)
    ref_llm = variants.get(("none", "full")) or LLM(args.model, early_exit=None, **kw)
    L = ref_llm.engine.model_config.num_layers
    ec, _, texts, source = held_out_setup(args.model, L)
    chat = lambda n: chat_prompts(ref_llm, texts, n)  # noqa: E731
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
    shutdown_all(*variants.values(), ref_llm)


if __name__ == "__main__":
    main()
