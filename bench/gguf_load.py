"""GGUF start-up: the GGUF read in place vs the old float32 detour, side by side in one run.

* ``old``: the whole GGUF dequantized by transformers (``load_gguf_checkpoint``) and cached as a
  float32 safetensors directory (what eeserve did before), then the float model built, loaded and
  quantized (``quantize_model``);
* ``new``: :func:`cluster.model.loader.resolve_model_dir` (config, tokenizer, tensor table) and
  :func:`cluster.model.loader.build_model` (int4: Q4 blocks packed as they are; others per layer).

Each variant runs in a fresh process, ``cold`` (empty cache directory: conversion included) then
``warm`` (cached; ``--rounds`` times, interleaved, the least CPU time kept), and reports its peak
RSS (``ru_maxrss``, imports included; ``imports`` is the same process with nothing loaded), wall
times, CPU time (user + system: less disturbed by other load on a shared machine), cache size on
disk, and a sha256 of every parameter and buffer of the built model (equal hashes: the same weights,
so the same tokens).

    python -m bench.gguf_load [--model PATH.gguf] [--quantization int4 int8 none] [--rounds 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common.results import print_table, save


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def _old_convert(gguf: Path, out: Path) -> str:
    """The previous conversion: the whole model dequantized to float32 safetensors (+ config, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if (out / "model.safetensors").exists():
        return str(out)
    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=meta)["tensors"]
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.mkdir(parents=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(out / "model.safetensors"))
    cfg.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def _old_build(model_dir: str, mc):
    """The previous build: float model on the CPU, every weight loaded, then quantized."""
    from cluster.model.layers.quant import quantize_model
    from cluster.model.llama import LlamaForCausalLM
    from cluster.model.loader import load_weights

    model = LlamaForCausalLM(mc)
    load_weights(model, model_dir)
    return quantize_model(model.eval(), mc.quantization, mc.quant_group_size)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(variant: str, quantization: str, model: str, cache: str, threads: str) -> dict:
    """One start-up in this process; returns its measurements."""
    os.environ["EESERVE_CACHE_DIR"] = cache
    import torch

    torch.set_num_threads(int(threads))

    from cluster.config import ModelConfig
    from cluster.model.loader import build_model, load_hf_config, resolve_model_dir

    out = {"variant": variant, "quantization": quantization}
    t0, cpu0 = time.perf_counter(), _cpu_s()
    if variant == "imports":
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    if variant == "old":
        model_dir = _old_convert(Path(model), Path(cache) / "old")
    else:
        model_dir = resolve_model_dir(model)
    t1 = time.perf_counter()
    mc = ModelConfig.from_hf_config(load_hf_config(model_dir), quantization=quantization, dtype="float32")
    m = _old_build(model_dir, mc) if variant == "old" else build_model(model_dir, mc)
    t2, cpu2, peak = time.perf_counter(), _cpu_s(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    h = hashlib.sha256()
    for name, t in m.state_dict().items():
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy())  # no copy
    out.update(peak_rss_mb=round(peak, 1), resolve_s=round(t1 - t0, 2), build_s=round(t2 - t1, 2),
               cpu_s=round(cpu2 - cpu0, 2),
               cache_mb=round(_dir_bytes(cache) / 2**20, 2), weights_sha=h.hexdigest()[:16])
    return out


def _run_child(variant: str, quantization: str, model: str, cache: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.gguf_load", "--child", variant, quantization, model, cache, str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--quantization", nargs="+", default=["int4", "int8"])
    p.add_argument("--rounds", type=int, default=3, help="warm start-ups per variant (interleaved); the "
                   "least CPU time is kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops are not slowed by "
                   "OpenMP waits on a busy machine)")
    p.add_argument("--name", default="gguf_load")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return {}
    from cluster.model.loader import default_model_path

    model = args.model or default_model_path()
    rows = []
    with tempfile.TemporaryDirectory(prefix="eeserve-gguf-bench-") as root:
        rows.append({**_run_child("imports", "-", model, root, args.threads), "cache": "-"})
        for q in args.quantization:
            caches = {v: os.path.join(root, f"{v}-{q}") for v in ("old", "new")}
            for variant in ("old", "new"):  # cold: the conversion included
                rows.append({**_run_child(variant, q, model, caches[variant], args.threads), "cache": "cold"})
                print(f"{q} {variant} cold: {rows[-1]}", file=sys.stderr)
            warm: dict[str, dict] = {}
            for r in range(args.rounds):
                for variant in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    res = {**_run_child(variant, q, model, caches[variant], args.threads), "cache": "warm"}
                    print(f"{q} {variant} warm: {res}", file=sys.stderr)
                    if variant not in warm or res["cpu_s"] < warm[variant]["cpu_s"]:
                        warm[variant] = res
            rows += [warm["old"], warm["new"]]
    ratios = []
    for q in args.quantization:
        for state in ("cold", "warm"):
            old, new = (next(r for r in rows if (r["quantization"], r["variant"], r["cache"]) == (q, v, state))
                        for v in ("old", "new"))
            ratios.append({"quantization": q, "cache": state,
                           "peak_rss_new/old": round(new["peak_rss_mb"] / old["peak_rss_mb"], 3),
                           "cache_new/old": round(new["cache_mb"] / old["cache_mb"], 4),
                           "startup_new/old": round((new["resolve_s"] + new["build_s"])
                                                    / (old["resolve_s"] + old["build_s"]), 3),
                           "cpu_new/old": round(new["cpu_s"] / old["cpu_s"], 3),
                           "same_weights": new["weights_sha"] == old["weights_sha"]})
    print_table(rows, ["quantization", "variant", "cache", "peak_rss_mb", "resolve_s", "build_s", "cpu_s",
                       "cache_mb", "weights_sha"])
    print()
    print_table(ratios, list(ratios[0]))
    payload = {"model": model, "rows": rows, "ratios": ratios}
    print(f"saved {save(args.name, payload)}")
    return payload


if __name__ == "__main__":
    main()
