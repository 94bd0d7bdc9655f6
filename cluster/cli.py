"""``eeserve`` console script.

* ``eeserve generate "prompt"``: offline generation on the default (or given) model; prints the
  completion and its exit statistics.
* ``eeserve train-exits`` / ``eeserve calibrate``: exit-head training and threshold calibration;
  ``eeserve calibrate-skip``: layer_skip's skip-set search.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from cluster.request import DEFAULT_MODES, SKIP_SELECTIONS
from cluster.training.cli import add_calibrate_parser, add_calibrate_skip_parser, add_train_exits_parser


def _stats(exit_layers: list[int], num_layers: int) -> dict:
    counts = collections.Counter(exit_layers)
    mean = sum(exit_layers) / max(1, len(exit_layers))
    return {"num_layers": num_layers, "mean_exit_layer": round(mean, 3),
            "layer_fraction": round(mean / num_layers, 3),
            "exit_layer_counts": {str(k): counts[k] for k in sorted(counts)}}


def cmd_generate(args) -> int:
    from cluster import LLM, SamplingParams
    from cluster.engine.factory import MODEL_DEFAULT, model_exit_config_with

    early_exit = MODEL_DEFAULT
    overrides = dict(mode=args.exit_mode, draft_layer=args.draft_layer, num_draft_tokens=args.num_draft_tokens,
                     adaptive_drafts=args.adaptive_drafts,
                     skip_layers=tuple(args.skip_layers) if args.skip_layers is not None else None,
                     skip_selection=args.skip_selection)
    if args.no_early_exit:
        if any(v is not None for v in overrides.values()):
            raise ValueError("--exit-mode, --draft-layer, --num-draft-tokens, --skip-layers, --skip-selection and "
                             "--[no-]adaptive-drafts "
                             "need early exit (not --no-early-exit)")
        early_exit = None
    elif any(v is not None for v in overrides.values()):
        early_exit = model_exit_config_with(args.model, **overrides)  # the model's exit config, fields replaced
    llm = LLM(args.model, tensor_parallel_size=args.tensor_parallel_size, early_exit=early_exit, dtype=args.dtype,
              device=args.device, gpu_memory_utilization=args.gpu_memory_utilization, quantization=args.quantization,
              torch_compile={"true": True, "false": False}.get(args.torch_compile, "auto"))
    try:
        ec = llm.engine.exit_config
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
        t0 = time.perf_counter()
        if args.raw:
            out = llm.generate(args.prompt, params, exit_threshold=args.threshold)[0]
        else:
            out = llm.chat([{"role": "user", "content": args.prompt}], params, exit_threshold=args.threshold)[0]
        dt = time.perf_counter() - t0
        print(out.text)
        stats = _stats(out.exit_layers, out.num_layers)
        stats.update(num_tokens=len(out.token_ids), finish_reason=out.finish_reason, seconds=round(dt, 3),
                     tokens_per_s=round(len(out.token_ids) / dt, 2),
                     exit_config=None if ec is None else {"exit_layers": list(ec.exit_layers), "head": ec.head,
                                                          "confidence": ec.confidence, "threshold": ec.threshold,
                                                          "mode": ec.mode or ec.policy,
                                                          "draft_layer": ec.default_draft_layer,
                                                          "num_draft_tokens": ec.num_draft_tokens,
                                                          "skip_layers": list(ec.skip_layers),
                                                          "skip_selection": ec.skip_selection})
        if out.num_verify_steps:  # a lossless mode ran
            stats.update(num_draft_tokens=out.num_draft_tokens, num_accepted_tokens=out.num_accepted_tokens,
                         acceptance_rate=None if out.acceptance_rate is None else round(out.acceptance_rate, 3),
                         tokens_per_verify=round(out.tokens_per_verify, 3))
        print(json.dumps(stats, indent=None if args.compact else 2), file=sys.stderr)
    finally:
        llm.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eeserve", description="Early-exit LLM inference and serving")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion offline and print exit statistics")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="safetensors dir or GGUF file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--threshold", type=float, default=None, help="override the exit confidence threshold")
    g.add_argument("--no-early-exit", action="store_true", help="run the full model")
    g.add_argument("--exit-mode", default=None, choices=DEFAULT_MODES,
                   help="early-exit mode (default: the model's exit config's); verified, self_speculative and "
                        "layer_skip are lossless: the full model's output, drafts only speed it up; full: the "
                        "full model")
    g.add_argument("--draft-layer", type=int, default=None,
                   help="self_speculative: the exit layer whose head drafts (default: the first exit layer)")
    g.add_argument("--skip-layers", type=int, nargs="+", default=None, metavar="LAYER",
                   help="layer_skip: the decoder layers (1-based, each below the last) drafts leave out, e.g. "
                        "--skip-layers 3 5 7 (default: the exit config's, else every other middle layer)")
    g.add_argument("--skip-selection", default=None, choices=SKIP_SELECTIONS,
                   help="layer_skip: static keeps the skip set; online re-chooses one of the same size from the "
                        "verified tokens (CLaSp; default: the exit config's, static)")
    g.add_argument("--num-draft-tokens", type=int, default=None,
                   help="lossless modes: drafts per verification (default: the exit config's, 4)")
    g.add_argument("--adaptive-drafts", action=argparse.BooleanOptionalAction, default=None,
                   help="self_speculative: draft only as many tokens as the measured acceptance pays for "
                        "(--no-adaptive-drafts: always --num-draft-tokens; default: the exit config's)")
    g.add_argument("--raw", action="store_true", help="use the prompt as is (no chat template)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantized linear layers and LM head (auto: int4 for a Q4 GGUF such as the "
                        "default model on the CPU, else none)")
    g.add_argument("--torch-compile", nargs="?", const="true", default="auto", choices=["auto", "true", "false"],
                   help="compiled decode graphs (torch.compile; slower first start, faster steps); auto: on "
                        "on the CPU at tensor-parallel size 1")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: fraction of the GPU's memory this engine may use (weights, activations, KV cache)")
    g.add_argument("--compact", action="store_true", help="print statistics on one line")
    g.set_defaults(func=cmd_generate)
    add_train_exits_parser(sub)
    add_calibrate_parser(sub)
    add_calibrate_skip_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
