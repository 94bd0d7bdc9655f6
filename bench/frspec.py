"""FR-Spec reduced-vocabulary LM head on the default model: coverage, LM-head cost, argmax agreement.

The subset is chosen from the full model's own greedy answers to the exit heads' training prompts (the
splits recorded in the shipped heads' metadata): train-exits' cached answers when its work dir holds
them, else generated here (greedy, ``--max-tokens``, at most ``--max-train`` prompts, cached under
``$EESERVE_CACHE_DIR/frspec/``). It reports, for each subset size N:

* coverage: the share of answer tokens in the subset, on the training answers and on the held-out
  test answers (the exit heads' test split);
* the LM head's cost at batch 1 and 16 (``cluster.LLM()``'s default model: ``quantization=auto``, int4
  layers with an int8 LM head on the CPU): the full head vs the reduced head in the full head's own
  format (int8 rows) and as dense float rows;
* argmax agreement of the reduced head with the full head on real hidden states (teacher-forced along
  the test answers): the last layer, and each shipped exit head's output.

    python -m bench.frspec                                  # table + bench/results/frspec.json
    python -m bench.frspec --write 8192 --out /tmp/smollm2-135m-instruct.exit_heads.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from bench.common.exits import shipped_heads_workspace
from bench.common.results import print_table, save
from bench.common.timing import time_calls

SIZES = (2048, 4096, 8192, 16384)


def train_answers(ws, max_tokens: int, max_train: int, log=print):
    """``(train sequences, where they came from)``: train-exits' cached answers if all are there."""
    from cluster.llm import LLM
    from cluster.model.loader import cache_dir
    from cluster.training.data import GenerationCache, generate_answers

    prompts = ws.splits["train"]
    cache = GenerationCache(ws.work_dir)
    if not cache.missing(prompts):
        return cache.get(prompts), f"train-exits cache ({ws.data.max_new_tokens} tokens)"
    prompts = prompts[:max_train]
    own = GenerationCache(os.path.join(str(cache_dir()), "frspec", ws.fingerprint.replace(":", "-"),
                                       os.path.basename(ws.work_dir) + f"-{max_tokens}"))
    if own.missing(prompts):
        log(f"frspec: generating greedy answers for {len(own.missing(prompts))} train prompts into {own.path}")
    seqs = generate_answers(lambda: LLM(ws.model_dir, early_exit=None, max_num_seqs=64, max_num_batched_tokens=2048),
                            prompts, own, max_tokens, progress=False)
    return seqs, f"generated here ({max_tokens} tokens, {len(prompts)} prompts)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--max-tokens", type=int, default=64, help="answer length when generating train answers")
    ap.add_argument("--max-train", type=int, default=200, help="train prompts when generating")
    ap.add_argument("--rounds", type=int, default=200, help="timed calls of each LM head (interleaved)")
    ap.add_argument("--write", type=int, default=0, metavar="N",
                    help="write a copy of the shipped exit heads file with the size-N subset (frspec.token_ids)")
    ap.add_argument("--out", default="/tmp/exit_heads.frspec.safetensors", help="where --write writes")
    ap.add_argument("--name", default="frspec")
    args = ap.parse_args(argv)

    from cluster.config import ExitConfig
    from cluster.engine.factory import resolve_quantization
    from cluster.model.exits import ExitHeads
    from cluster.model.frspec import ReducedLMHead
    from cluster.model.loader import build_model
    from cluster.training.features import cached_features
    from cluster.training.frspec import add_draft_vocab, coverage, select_vocab

    model_dir, cfg, ws = shipped_heads_workspace()
    mc = ws.model_config
    V, eos = mc.vocab_size, tuple(mc.eos_token_ids)
    test = ws.sequences(("test",), progress=False)["test"]
    train, source = train_answers(ws, args.max_tokens, args.max_train)
    train_ids, test_ids = [s.output_ids for s in train], [s.output_ids for s in test]
    subsets, rows = {}, []
    for n in args.sizes:
        ids, cov = select_vocab(train_ids, V, n, always=eos)
        subsets[n] = ids
        rows.append({"N": n, "N/V": round(n / V, 3), "coverage_train": round(cov, 4),
                     "coverage_test": round(coverage(test_ids, ids, V), 4)})
    if args.write:
        ids, cov = select_vocab(train_ids, V, args.write, always=eos)
        info = {"size": int(ids.numel()), "vocab_size": V, "coverage_train": cov,
                "coverage_test": coverage(test_ids, ids, V), "always": list(eos), "order": "frequency rank",
                "source": f"the full model's greedy answers to the train split, {source} (bench/frspec.py)"}
        add_draft_vocab(cfg.heads_path, args.out, ids, info)
        print(f"frspec: wrote {args.out} ({cfg.heads_path} + frspec.token_ids, N={args.write})")

    # the LLM() default model: quantization auto (int4 layers, int8 LM head on the CPU)
    quant = resolve_quantization("auto", model_dir, "cpu")
    model = build_model(model_dir, dataclasses.replace(mc, quantization=quant))
    layers = tuple(cfg.exit_layers)
    heads = ExitHeads(model, ExitConfig(exit_layers=layers, head="trained", heads_path=cfg.heads_path,
                                        confidence=cfg.confidence))
    # same path and key as bench/exits_quant.py: its cached hidden states are reused
    key = {"split": "test", "ids": [s.id for s in test], "quantization": quant}
    feats = cached_features(os.path.join(ws.work_dir, f"features-test-{quant}.pt"), model, test, layers, key,
                            progress=False)
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        normed = {"final": model.model.norm(feats.final.to(dtype))}
        for l in layers:
            normed[f"exit {l}"] = model.model.norm(heads.exit_state(l, feats.hidden[l].to(dtype)))
        full_argmax = {k: model.lm_head.full_logits(model.lm_head.local_logits(h)).argmax(-1) for k, h in normed.items()}
        g = torch.Generator().manual_seed(0)
        x = {b: normed["final"][torch.randperm(normed["final"].shape[0], generator=g)[:b]].contiguous() for b in (1, 16)}
        full_mb = sum(t.numel() * t.element_size() for t in model.lm_head.quantized.buffers()) / 1e6 \
            if model.lm_head.quantized is not None else model.lm_head.weight.numel() * model.lm_head.weight.element_size() / 1e6
        fns, kind = {"full": model.lm_head.local_logits}, None
        for row in rows:
            n = row["N"]
            same = ReducedLMHead(model.lm_head, subsets[n])
            kind = same.qweight.method if same.qweight is not None else "float"
            row["head_MB"] = f"{same.weight_bytes / 1e6:.1f}/{full_mb:.1f}"
            fns.update({(n, kind): same.logits,
                        (n, "bf16"): ReducedLMHead(model.lm_head, subsets[n], quant="none", dtype=torch.bfloat16).logits,
                        (n, "fp32"): ReducedLMHead(model.lm_head, subsets[n], quant="none", dtype=torch.float32).logits})
            agree = {k: float((same.argmax(h) == full_argmax[k]).float().mean()) for k, h in normed.items()}
            row["agree_final"] = round(agree.pop("final"), 4)
            row["agree_exits_mean"] = round(sum(agree.values()) / len(agree), 4)
            row["agree_exits"] = {k.split()[1]: round(v, 4) for k, v in agree.items()}
        for b in (1, 16):
            t = time_calls(fns, x[b], args.rounds)
            for row in rows:
                row[f"full_ms_b{b}"] = round(t["full"][0], 3)
                for v in (kind, "bf16", "fp32"):
                    row[f"{v}_ms_b{b}"] = round(t[(row["N"], v)][0], 3)
                row[f"speedup_b{b}"] = round(t["full"][0] / t[(row["N"], kind)][0], 2)
                row[f"median_ms_b{b}"] = {"full": round(t["full"][1], 3),
                                          **{v: round(t[(row["N"], v)][1], 3) for v in (kind, "bf16", "fp32")}}
    cols = [c for c in rows[0] if not isinstance(rows[0][c], dict)]
    print(f"default model {model_dir}, quantization {quant}; train answers: {source}, "
          f"{sum(map(len, train_ids))} tokens from {len(train_ids)} prompts ({len(set(t for s in train_ids for t in s))} "
          f"distinct ids); test answers: {sum(map(len, test_ids))} tokens, {feats.num_positions} hidden states; "
          f"V={V}, threads {torch.get_num_threads()}")
    print_table(rows, cols)
    path = save(args.name, {"model": model_dir, "quantization": quant, "train_source": source,
                            "train_tokens": sum(map(len, train_ids)), "test_tokens": sum(map(len, test_ids)),
                            "test_positions": feats.num_positions, "threads": torch.get_num_threads(),
                            "rounds": args.rounds, "timing": "min (median in median_ms_*) of single interleaved calls, ms",
                            "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
