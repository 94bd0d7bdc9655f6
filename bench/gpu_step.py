"""Decode speed on a CUDA GPU: eeserve's full-model step against transformers ``generate`` on the same
weights, and its fixed cost per step, on random-weight Llama models of two shapes (weights' values do
not change a full-model step's time; the GGUF of the default model is too large to carry to a lent GPU).

* ``smollm2``: the default model's shape (30 layers, hidden 576, GQA 9/3 heads, 49152 vocab), 135M
  parameters: on a GPU a step of it is bound by launch and Python overhead, not by its 270 MB of weights.
* ``llama-1b``: TinyLlama-1.1B's shape (22 layers, hidden 2048, GQA 32/4 heads, 32000 vocab).

For each model, dtype bfloat16, greedy, EOS ignored, ``--tokens`` new tokens, prefill included, best of
``--rounds`` interleaved rounds: eeserve (eager, and ``torch_compile=True`` with ``--compile``) and
transformers at each batch size; ``ms_per_step`` = wall / tokens per row, ``weight_GBps`` = the weight
bytes read per step x steps/s and ``bw_fraction`` that over ``--bandwidth-gbps`` (the H200's
device-to-device copy measured at 4300 GB/s on this workplace's machines, /work/.library/device/KINDS.md).

    python -m bench.gpu_step --tokenizer <dir with tokenizer.json> --name gpu-step
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile

import torch

from bench.common.engines import engine_kwargs, run_engine, run_hf
from bench.common.results import print_table, save
from bench.common.timing import interleaved_best
from cluster import LLM

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}


def make_model(path: str, tokenizer_dir: str, shape: dict, dtype: torch.dtype) -> tuple[str, int]:
    """Save a random Llama of ``shape`` in ``dtype`` with the tokenizer of ``tokenizer_dir`` (its ids
    beyond the shape's vocabulary are never used: prompts are random ids below it). Returns the
    directory and its weight bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.02, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return path, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a directory with tokenizer.json (the default model's)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also torch_compile=True")
    ap.add_argument("--no-hf", action="store_true", help="no transformers peer")
    ap.add_argument("--bandwidth-gbps", type=float, default=4300.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--name", default="gpu-step")
    args = ap.parse_args()

    rows, tmp = [], tempfile.mkdtemp(prefix="eeserve-gpu-step-")
    for name in args.shapes:
        shape = SHAPES[name]
        model_dir, nbytes = make_model(os.path.join(tmp, name), args.tokenizer, shape, torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        n_prompts = max(args.batch_sizes)
        prompts = torch.randint(3, shape["vocab_size"], (n_prompts, args.prompt_len), generator=g).tolist()
        kw = engine_kwargs(dtype="bfloat16", kv_cache_memory_bytes=4 << 30)
        variants = {"eeserve": LLM(model_dir, early_exit=None, device=args.device, **kw)}
        if args.compile:
            variants["eeserve-compiled"] = LLM(model_dir, early_exit=None, device=args.device, torch_compile=True, **kw)
        hf = None
        if not args.no_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(args.device).eval()
        for batch in args.batch_sizes:
            ps = prompts[:batch]
            runs = {k: functools.partial(run_engine, llm, ps, batch, args.tokens) for k, llm in variants.items()}
            if hf is not None:
                def hf_run(ps=ps, batch=batch):
                    with torch.device(args.device):
                        outs, tps = run_hf(hf, ps, batch, args.tokens)
                    return outs, tps, None, None
                runs["transformers"] = hf_run
            best = interleaved_best(runs, args.rounds)
            ref = best.get("transformers", (None, None))[1]
            for key, res in best.items():
                tps = res[1]
                steps_per_s = tps / batch
                rows.append({"model": name, "engine": key, "batch": batch, "tok_per_s": round(tps, 1),
                             "ms_per_step": round(1000 / steps_per_s, 3),
                             "weight_GBps": round(nbytes * steps_per_s / 1e9, 1),
                             "bw_fraction": round(nbytes * steps_per_s / 1e9 / args.bandwidth_gbps, 3),
                             "vs_transformers": round(tps / ref, 2) if ref else None})
        for llm in variants.values():
            llm.shutdown()
        hf = None
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print_table(rows, ["model", "engine", "batch", "tok_per_s", "ms_per_step", "weight_GBps", "bw_fraction",
                       "vs_transformers"])
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(save(args.name, {"device": dev, "torch": torch.__version__, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
