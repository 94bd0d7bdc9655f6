"""The compiled decode step against the eager one: step time and start-up, side by side (issue 18).

Each variant starts a fresh Python process (so nothing compiled in memory carries over) that builds
``LLM(quantization=q, torch_compile=...)`` with early exit off and the default ``full`` mode, reports
its start-up time (engine construction: weights, KV cache, and for compiled engines the warm-up that
compiles the decode graphs), then times decode steps at each ``--batch-sizes`` value: a batch of
chat prompts is prefilled, then ``--steps`` decode iterations of ``engine.step()`` are timed and the
median kept. Variants, per quantization:

* ``eager``: ``torch_compile=False``;
* ``compiled, cold``: ``torch_compile=True`` with an empty Inductor cache (a fresh temporary
  ``TORCHINDUCTOR_CACHE_DIR``): the first start on a machine;
* ``compiled, cached``: the same again with that cache filled: every later start;
* ``compiled, aten GEMMs`` (cold and cached): the compiled step with the CPU's GEMM templates off
  (``EESERVE_GEMM_TEMPLATES=0``): the graphs call PyTorch's int4 / int8 kernels, as they do on CUDA
  (``--no-aten-variant`` leaves it out).

Rounds alternate eager and cached processes (``--rounds``, best step time kept); the cold starts run
once. Output: a table, ``bench/results/<name>.json``.

    python -m bench.compile_step --quantization int4 none --batch-sizes 1 16 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common.results import print_table, save
from cluster.model.compile import TEMPLATES_ENV

TEXTS = ["Name three planets and say one thing about each.", "Explain how bread is made.",
         "Write a haiku about rivers.", "What is a bicycle?"]


def child(args) -> dict:
    """One process: start an engine, time its decode steps; returns the measurements."""
    import torch

    from bench.common.prompts import chat_prompts
    from bench.profile_step import _decode_steps
    from cluster import LLM

    t = time.perf_counter()
    llm = LLM(args.model, quantization=args.quantization, torch_compile=args.compiled, early_exit=None,
              enable_prefix_caching=False, kv_cache_memory_bytes=256 << 20)
    out = {"startup_s": round(time.perf_counter() - t, 1), "threads": torch.get_num_threads()}
    try:
        for b in args.batch_sizes:
            prompts = chat_prompts(llm, TEXTS, b)
            _decode_steps(llm, prompts, 4)  # warm-up
            ms = statistics.median(_decode_steps(llm, prompts, args.steps)) * 1e3
            out[f"b{b}_step_ms"] = round(ms, 2)
            out[f"b{b}_tok_s"] = round(b * 1e3 / ms, 1)
    finally:
        llm.shutdown()
    return out


def run_child(args, quantization: str, compiled: bool, cache: str, templates: bool = True) -> dict:
    cmd = [sys.executable, "-m", "bench.compile_step", "--child", "--quantization", quantization,
           "--batch-sizes", *map(str, args.batch_sizes), "--steps", str(args.steps)]
    cmd += ["--compiled"] if compiled else []
    cmd += ["--model", args.model] if args.model else []
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, **{TEMPLATES_ENV: "1" if templates else "0"})
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", nargs="+", default=["int4", "none"], choices=["none", "int8", "int4"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size (median)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating eager / cached rounds (best kept)")
    ap.add_argument("--no-aten-variant", action="store_true",
                    help="leave out the compiled variant without the CPU's GEMM templates")
    ap.add_argument("--name", default="compile-step")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.quantization = args.quantization[0]
        print(json.dumps(child(args)))
        return

    rows = []
    for q in args.quantization:
        # (variant, compiled, templates)
        variants = [("eager", False, True), ("compiled", True, True)]
        variants += [] if args.no_aten_variant else [("compiled, aten GEMMs", True, False)]
        with tempfile.TemporaryDirectory(prefix="eeserve-inductor-") as cache:
            cold, runs = {}, {"eager": []}
            for name, compiled, templates in variants[1:]:
                cold[name] = run_child(args, q, True, cache, templates)
                runs[f"{name}, cached"] = []
                print(f"  {q}: {name}, cold start {cold[name]['startup_s']} s", flush=True)
            for _ in range(args.rounds):
                for name, compiled, templates in variants:
                    key = f"{name}, cached" if compiled else name
                    runs[key].append(run_child(args, q, compiled, cache, templates))
                    print(f"  {q}: {key} {runs[key][-1]}", flush=True)
        best = {name: {k: (min if k.endswith("_ms") else max)(r[k] for r in rs) for k in rs[0]}
                for name, rs in runs.items()}
        order = ["eager"]
        for name, r in cold.items():
            best[f"{name}, cached"]["startup_s"] = min(x["startup_s"] for x in runs[f"{name}, cached"])
            best[f"{name}, cold"] = dict(r)
            order += [f"{name}, cold", f"{name}, cached"]
        for name in order:
            row = {"quantization": q, "variant": name, **best[name]}
            for b in args.batch_sizes:
                row[f"b{b}_vs_eager"] = round(best["eager"][f"b{b}_step_ms"] / row[f"b{b}_step_ms"], 2)
            rows.append(row)
    cols = ["quantization", "variant", "startup_s"]
    for b in args.batch_sizes:
        cols += [f"b{b}_step_ms", f"b{b}_tok_s", f"b{b}_vs_eager"]
    print_table(rows, cols)
    path = save(args.name, {"args": {k: v for k, v in vars(args).items() if k not in ("child", "compiled")},
                            "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
