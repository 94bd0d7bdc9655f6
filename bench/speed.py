"""Decode speed side by side in one run: eeserve against its targets and its peers (issue 12).

In one process, with interleaved rounds (each variant reports its best round, see
:func:`bench.common.timing.interleaved_best`), on the same chat prompts (the exit heads' held-out test split,
as in :mod:`bench.quant`), greedy, ``--tokens`` new tokens per prompt with EOS ignored, prefill
included in the wall time:

* eeserve: quantization ``none`` / ``int8`` / ``int4`` x ``full`` model / ``ee`` (the model's own
  early-exit config) at each ``--batch-sizes`` value (float32 activations for ``none``);
* transformers ``generate`` on the same weights in float32 (the GGUF dequantized by transformers, or
  the safetensors directory), at each batch size (:class:`bench.common.peers.HFGenerate`);
* llama-cpp-python on the model's GGUF at batch 1 (:class:`bench.common.peers.LlamaCppRun`, the machine's
  cores as threads); skipped with a note when it is not installed or the model has no GGUF.

Memory traffic: ``weight_MB_per_token`` is what one decode step reads (:mod:`bench.common.limits`:
packed quantized weights + scales, the layers run, the KV-fill projections of skipped layers, exit
checks, LM head; llama.cpp: the GGUF's tensor sizes) divided by the batch size; ``weight_GBps`` is the
step's bytes x steps/s and ``bw_fraction`` that over the machine's read bandwidth, measured here
(:func:`bench.common.limits.read_bandwidth_gbps`). Early exit at batch > 1 is left out: a step runs as deep
as its deepest row, which the mean exit layer does not give.

Per-step overhead: the median decode-step time (ms) at batch 1 of the full model cut to each of
``--layers`` decoder layers (a copy of the config with ``num_hidden_layers`` changed, the same
weights), fitted by least squares as ``t = fixed_ms + per_layer_ms * n`` for every quantization.

Targets (on this kind of machine, issue 12), with a pass/miss column:

* int4 batch 1 >= 3x float32 batch 1 (full model; measured in this run, and against the issue's
  float32 baseline of 18.5 tok/s);
* fixed per-step overhead <= 3 ms (each quantization);
* batch 16 >= 1.5x transformers ``generate`` on the same float32 weights;
* 16 concurrent streaming chat requests over HTTP >= 2x llama-cpp-python's server, aggregate
  output tok/s (``--http``: :mod:`bench.serving` with ``--peer llama-cpp``, int4, 16 prompts at once).

    python -m bench.speed                                   # the full run (about 15 minutes on 2 cores)
    python -m bench.speed --rounds 3 --tokens 64 --http     # also the concurrent HTTP comparison
    python -m bench.speed --quick --model <dir>             # seconds: a smoke run (tests)
    python -m bench.speed --eager                           # the eager engines beside the compiled ones
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Optional

import torch

from bench.common import serving
from bench.common.engines import engine_kwargs, make_variants, shutdown_all, speed_rows, time_variants, token_ids
from bench.common.limits import add_traffic, overhead_fits, read_bandwidth_gbps, weight_bytes_per_token
from bench.common.peers import gguf_path, llama_cpp_available, make_peers, peer_rows
from bench.common.prompts import chat_prompts, held_out_setup
from bench.common.results import print_table, save
from cluster import LLM
from cluster.model.loader import resolve_model_dir

ISSUE_FLOAT32_BATCH1 = 18.5  # tok/s, eeserve float32 batch 1 when issue 12 was filed (2-core EPYC)
TARGETS = {"int4_vs_float32_b1": 3.0, "fixed_overhead_ms": 3.0, "b16_vs_transformers": 1.5,
           "http16_vs_llama_cpp": 2.0}
# issue 18: an engine bound by its weights (int4, the default engine: compiled decode step)
TARGETS_18 = {"int4_b1_vs_llama_cpp": 1.0, "fixed_cost_ms": 1.0, "int4_b1_bw_fraction": 0.5,
              "int4_b16_vs_transformers": 3.0}
COLS = ["engine", "quantization", "mode", "batch", "tokens_per_s", "speedup_vs_float_full", "mean_exit_layer",
        "agreement_free", "weight_MB_per_token", "weight_GBps", "bw_fraction"]


# --------------------------------------------------------------------------------------- targets
def target_rows(rows: list[dict], fits: list[dict], http: Optional[dict]) -> list[dict]:
    """The issue's targets: measured ratio or value, the target, pass/miss (None: not measured)."""
    def tps(engine, q, mode, batch):
        return next((r["tokens_per_s"] for r in rows if r["engine"] == engine and r["quantization"] == q
                     and r["mode"] == mode and r["batch"] == batch), None)

    out = []

    def add(name, value, target, higher_is_better=True, note=""):
        ok = None if value is None else (value >= target if higher_is_better else value <= target)
        out.append({"target": name, "measured": None if value is None else round(value, 3),
                    "goal": f"{'>=' if higher_is_better else '<='} {target}",
                    "result": {None: "not measured", True: "pass", False: "miss"}[ok], "note": note})

    i4, f32 = tps("eeserve", "int4", "full", 1), tps("eeserve", "none", "full", 1)
    add("int4 b1 / float32 b1 (full, same run)", i4 / f32 if i4 and f32 else None, TARGETS["int4_vs_float32_b1"])
    add(f"int4 b1 / issue-12 float32 b1 ({ISSUE_FLOAT32_BATCH1} tok/s)", i4 / ISSUE_FLOAT32_BATCH1 if i4 else None,
        TARGETS["int4_vs_float32_b1"])
    for f in fits:
        add(f"fixed per-step overhead, {f['quantization']} (ms)", f.get("fixed_ms"), TARGETS["fixed_overhead_ms"],
            higher_is_better=False)
    batches = sorted({r["batch"] for r in rows if r["batch"] > 1})
    for b in batches:
        hf = tps("transformers", "none", "full", b)
        for mode in ("full", "ee"):
            ours = tps("eeserve", "none", mode, b)
            add(f"float32 {mode} b{b} / transformers b{b}", ours / hf if ours and hf else None,
                TARGETS["b16_vs_transformers"])
    # issue 18's targets, for the default engine (int4; compiled unless --no-compile)
    lc = tps("llama-cpp", "int4", "full", 1) or next((r["tokens_per_s"] for r in rows if r["engine"] == "llama-cpp"
                                                      and r["batch"] == 1), None)
    add("int4 b1 / llama.cpp b1 (same GGUF, threads)", i4 / lc if i4 and lc else None, TARGETS_18["int4_b1_vs_llama_cpp"])
    for f in fits:
        add(f"fixed per-step cost, {f['quantization']} (ms, issue 18)", f.get("fixed_ms"), TARGETS_18["fixed_cost_ms"],
            higher_is_better=False)
    bw = next((r.get("bw_fraction") for r in rows if r["engine"] == "eeserve" and r["quantization"] == "int4"
               and r["mode"] == "full" and r["batch"] == 1), None)
    add("int4 b1 weight read rate / machine bandwidth", bw, TARGETS_18["int4_b1_bw_fraction"])
    for b in batches:
        hf, ours = tps("transformers", "none", "full", b), tps("eeserve", "int4", "full", b)
        add(f"int4 b{b} / transformers b{b}", ours / hf if ours and hf else None, TARGETS_18["int4_b16_vs_transformers"])
    if http is not None:
        for r in http.get("peer_ratios", []):
            add(f"HTTP {http['num_prompts']} streams {http['quantization']} {r['variant']} / {r['peer']} server "
                f"(tok/s)", r["tok_per_s_ratio"], TARGETS["http16_vs_llama_cpp"], note=f"rate {r['rate']}")
    else:
        add("HTTP 16 streams / llama-cpp server (tok/s)", None, TARGETS["http16_vs_llama_cpp"], note="run with --http")
    return out


def run_http(args) -> Optional[dict]:
    """The concurrent HTTP comparison (:mod:`bench.serving`'s load with ``--peer llama-cpp``)."""
    argv = ["--num-prompts", str(args.http_streams), "--request-rates", "inf", "--max-tokens", str(args.tokens),
            "--ignore-eos", "--quantization", args.http_quantization, "--name", f"{args.name}-http",
            "--peer", "llama-cpp", "--peer-log", os.path.join(tempfile.gettempdir(), "eeserve-llama-server.log")]
    if args.model:
        argv += ["--model", args.model]
    sargs = serving.parse_args(argv)
    payload = serving.run(sargs)
    serving.report(sargs, payload)
    return {"num_prompts": args.http_streams, "quantization": args.http_quantization,
            "rows": payload["rows"], "peer_ratios": payload["peer_ratios"]}


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (its GGUF for llama-cpp)")
    ap.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (EOS ignored)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each variant reports its best")
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts timed one by one at batch 1")
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="depths of the overhead fit (default: 2 8 and the model's layer count)")
    ap.add_argument("--fit-steps", type=int, default=32, help="decode steps timed per depth (median)")
    ap.add_argument("--no-early-exit", action="store_true", help="full model only")
    ap.add_argument("--no-peers", action="store_true", help="no transformers / llama-cpp-python")
    ap.add_argument("--http", action="store_true", help="also the 16-stream HTTP comparison with llama-cpp's server")
    ap.add_argument("--http-streams", type=int, default=16)
    ap.add_argument("--http-quantization", default="int4", choices=["none", "int8", "int4"])
    ap.add_argument("--no-compile", action="store_true",
                    help="eager engines only (default: torch_compile='auto', compiled decode graphs on the CPU)")
    ap.add_argument("--eager", action="store_true",
                    help="also the engine before issue 18's step work (eager, no dense copies) beside the default one")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth probe")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 4 tokens, batches 1 and 4, 1 prompt at batch 1, 4 fit steps")
    ap.add_argument("--name", default="speed", help="JSON name under bench/results")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.tokens, args.batch1_prompts, args.fit_steps = 1, 4, 1, 4
        args.batch_sizes, args.bandwidth_gib = [1, 4], 0.125

    t_start = time.perf_counter()
    resolve_model_dir(args.model)  # resolved (a GGUF read, cached) before the engines' start-up is timed
    kw = engine_kwargs()
    if args.no_compile:
        kw["torch_compile"] = False  # else "auto": compiled on the CPU
    t0 = time.perf_counter()
    variants = make_variants(args.model, args.quantization, not args.no_early_exit, **kw)
    if args.eager and not args.no_compile:  # the eager engine beside the default one, same run
        for q in args.quantization:
            variants[(q, "eager")] = LLM(args.model, early_exit=None, quantization=q,
                                         **{**kw, "torch_compile": False, "dense_prefill": False})
    startup_s = time.perf_counter() - t0
    ref_llm = variants.get(("none", "full")) or LLM(args.model, early_exit=None, **kw)
    L = ref_llm.engine.model_config.num_layers
    ec, _, texts, source = held_out_setup(args.model, L)
    chat = chat_prompts(ref_llm, texts, max([args.batch1_prompts, *args.batch_sizes]))
    peers, peer_bytes, notes = make_peers(args.model, args.no_peers)
    for n in notes:
        print(f"note: {n}")
    bw = read_bandwidth_gbps(args.bandwidth_gib)
    print(f"measured read bandwidth: {bw:.1f} GB/s; torch threads {torch.get_num_threads()}", flush=True)

    def step_bytes(key, mean_layer: float, batch: int) -> Optional[float]:
        if isinstance(key, str):
            return peer_bytes.get(key)
        if key[1] == "ee" and batch > 1:
            return None
        runner = variants[key].engine.workers.local.runner
        return weight_bytes_per_token(runner.model, runner.heads, mean_layer)

    rows = []
    for batch in args.batch_sizes:
        prompts = chat[:args.batch1_prompts] if batch == 1 else chat[:batch]
        extra = {k: run for k, run in peers.items() if batch == 1 or k != "llama-cpp"}
        best = time_variants(variants, prompts, batch, args.tokens, args.rounds, extra)
        ref = token_ids(best.get(("none", "full"), next(iter(best.values())))[0])  # float32 full, else the first
        batch_rows = [{"engine": "eeserve", **r} for r in speed_rows(best, batch, ref)]
        batch_rows += peer_rows(best, list(extra), batch, ref)
        for r in batch_rows:
            key = r["engine"] if r["engine"] != "eeserve" else (r["quantization"], r["mode"])
            add_traffic(r, step_bytes(key, r["mean_exit_layer"], batch), bw)
        rows += batch_rows

    depths = args.layers or [2, 8, L]
    fits = overhead_fits(args.model, {q: variants[(q, "full")] for q in args.quantization}, depths, chat[0],
                         args.fit_steps, args.rounds, kw)
    shutdown_all(*variants.values(), ref_llm)
    for p in peers.values():
        if hasattr(p, "close"):
            p.close()
    peers.clear()

    http = None
    if args.http:
        if llama_cpp_available() and gguf_path(args.model):
            http = run_http(args)
        else:
            notes.append("HTTP comparison skipped: llama-cpp-python not installed or no GGUF")
    targets = target_rows(rows, fits, http)

    print("speed (tokens/s, greedy, EOS ignored, prefill included; best of interleaved rounds):")
    print_table(rows, COLS)
    print("per-step overhead at batch 1 (median decode step, ms; t = fixed + per_layer * layers):")
    print_table(fits, list(dict.fromkeys(k for f in fits for k in f)))
    print("targets (issue 12):")
    print_table(targets, ["target", "measured", "goal", "result", "note"])
    for n in notes:
        print(f"note: {n}")
    path = save(args.name, {
        "args": vars(args), "prompts": source, "num_layers": L, "read_bandwidth_GBps": round(bw, 2),
        "torch_threads": torch.get_num_threads(), "exit_config": {"confidence": ec.confidence,
                                                                 "exit_layers": list(ec.exit_layers)},
        "engines_startup_s": round(startup_s, 1), "rows": rows, "overhead": fits, "http": http, "targets": targets, "notes": notes,
        "wall_s": round(time.perf_counter() - t_start, 1)})
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()
