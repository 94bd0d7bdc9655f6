"""The OpenAI-API load of :mod:`bench.serving` (see its docstring for the method and the metrics):
streamed chat requests with Poisson arrivals, timed as in vLLM's ``benchmark_serving``, our server
with early exit off and on and any peers as variants, alternating per rate. :mod:`bench.speed` runs
the same load for its HTTP target."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm import tqdm

from bench.common.prompts import load_prompts
from bench.common.results import print_table, save

COLS = ["rate", "concurrency", "variant", "ok", "duration_s", "req_per_s", "out_tok_per_s", "ttft_p50", "ttft_p99", "tpot_p50",
        "tpot_p99", "itl_p50", "itl_p99", "e2el_p50", "e2el_p99", "tpot_speedup", "mean_exit_layer", "mean_out_toks",
        "toks_per_chunk"]


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # s
    latency: float = 0.0  # s
    itl: list[float] = field(default_factory=list)  # s
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    early_exit: Optional[dict] = None
    chunks: int = 0  # content chunks received
    finish_reason: Optional[str] = None


async def send_request(client, model: str, prompt: str, max_tokens: int, temperature: float,
                       extra_body: Optional[dict], pbar: Optional[tqdm] = None) -> RequestResult:
    """One streamed chat completion, timed as in vLLM's ``async_request_openai_chat_completions``."""
    res = RequestResult()
    st = time.perf_counter()
    last = st
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=temperature, stream=True, stream_options={"include_usage": True}, extra_body=extra_body)
        async for chunk in stream:
            ts = time.perf_counter()
            if chunk.choices and chunk.choices[0].finish_reason:
                res.finish_reason = chunk.choices[0].finish_reason
            if chunk.choices and chunk.choices[0].delta.content:
                res.chunks += 1
                if res.ttft == 0.0:
                    res.ttft = ts - st
                else:
                    res.itl.append(ts - last)
                last = ts
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
                res.prompt_tokens = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                res.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
                res.early_exit = (chunk.model_extra or {}).get("early_exit")
        res.latency = time.perf_counter() - st
        if res.output_tokens == 0:  # no usage in the stream (llama-cpp-python's server)
            res.output_tokens = max_tokens if res.finish_reason == "length" else res.chunks
        res.ok = res.ttft > 0.0 and res.output_tokens > 0
        if not res.ok:
            res.error = "no content or no usage in the stream"
    except Exception as e:  # counted as failed, as in vLLM
        res.error = f"{type(e).__name__}: {e}"[:300]
    if pbar is not None:
        pbar.update(1)
    return res


async def run_load(client, model: str, prompts: list[str], rate: float, seed: int, max_tokens: int,
                   temperature: float, extra_body: Optional[dict], max_concurrency: Optional[int],
                   desc: str) -> tuple[list[RequestResult], float]:
    """Send ``prompts`` with Poisson arrivals at ``rate`` req/s; returns the results and the wall time (s)."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    pbar = tqdm(total=len(prompts), desc=desc, leave=False)

    async def limited(prompt: str) -> RequestResult:
        if sem is None:
            return await send_request(client, model, prompt, max_tokens, temperature, extra_body, pbar)
        async with sem:
            return await send_request(client, model, prompt, max_tokens, temperature, extra_body, pbar)

    tasks = []
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.create_task(limited(prompt)))
        if math.isfinite(rate) and i < len(prompts) - 1:
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    pbar.close()
    return list(results), duration


def _ms(values: list[float], q: float) -> Optional[float]:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def summarize(results: list[RequestResult], duration: float) -> dict:
    """vLLM's metrics (ms, req/s, tok/s) plus early-exit statistics over the completed requests."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    e2el = [r.latency for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    out_toks = sum(r.output_tokens for r in ok)
    counts: Counter = Counter()
    num_layers = 0
    for r in ok:
        if r.early_exit:
            counts.update({str(k): int(v) for k, v in r.early_exit.get("exit_layer_counts", {}).items()})
            num_layers = r.early_exit.get("num_layers", num_layers)
    n_layers_seen = sum(counts.values())
    row = {
        "ok": len(ok), "failed": len(results) - len(ok), "duration_s": round(duration, 2),
        "req_per_s": round(len(ok) / duration, 3), "out_tok_per_s": round(out_toks / duration, 2),
        "total_output_tokens": out_toks, "mean_out_toks": round(out_toks / max(1, len(ok)), 1),
        "content_chunks": sum(r.chunks for r in ok),
        "toks_per_chunk": round(out_toks / max(1, sum(r.chunks for r in ok)), 3),
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "mean_exit_layer": (round(sum(int(k) * v for k, v in counts.items()) / n_layers_seen, 2)
                            if n_layers_seen else None),
        "num_layers": num_layers, "exit_layer_counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
    }
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        row[f"{name}_mean"] = round(float(np.mean(vals)) * 1000, 1) if vals else None
        row[f"{name}_p50"] = _ms(vals, 50)
        row[f"{name}_p99"] = _ms(vals, 99)
    errors = [r.error for r in results if not r.ok]
    if errors:
        row["errors"] = sorted(set(errors))[:5]
    return row


# ------------------------------------------------------------------------------------- server
def launch_server(args) -> str:
    """Start a fresh local Ray instance and deploy the app in-process; returns the ``/v1`` base URL."""
    import ray

    from deployments.testing import deploy

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=args.verbose,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve_args = {"model": args.model, "dtype": args.dtype, "quantization": args.quantization}
    if args.torch_threads:
        serve_args["torch_threads"] = args.torch_threads
    print(f"deploying {serve_args} on a local Ray instance ...", flush=True)
    t0 = time.perf_counter()
    url = deploy(serve_args, args.app_name) + "/v1"
    print(f"ready at {url} after {time.perf_counter() - t0:.1f} s", flush=True)
    return url


def shutdown_server() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------- main
def variants(args, base_url: str, peers: dict[str, str]) -> dict[str, tuple[str, Optional[dict]]]:
    """Variant name -> (base URL, extra request body): ours with early exit off and on, then each
    peer (``llama-cpp``: greedy without llama.cpp's default repeat penalty)."""
    ours = {"ignore_eos": True} if args.ignore_eos else {}
    on = {} if args.threshold is None else {"early_exit": {"threshold": args.threshold}}
    vs = {"ee-off": (base_url, {"early_exit": False, **ours}), "ee-on": (base_url, {**on, **ours} or None)}
    for name, url in peers.items():
        if name == "llama-cpp":
            body = {"repeat_penalty": 1.0}
            if args.ignore_eos:
                body["logit_bias"] = {str(t): -100.0 for t in args.peer_eog_ids}
        elif name == "llama-server":  # llama.cpp's server takes ignore_eos as ours does
            body = {"repeat_penalty": 1.0, **({"ignore_eos": True} if args.ignore_eos else {})}
        else:
            body = {"ignore_eos": True} if args.ignore_eos else None
        vs[name] = (url, body)
    return vs


async def benchmark(args, vs: dict[str, tuple[str, Optional[dict]]]) -> tuple[str, list[dict]]:
    """Run every variant of ``vs`` (name -> (base URL, extra body)) at each request rate, the order
    alternating from one rate to the next; returns our served model's name and the rows."""
    from openai import AsyncOpenAI

    clients, models = {}, {}
    try:
        for url in dict.fromkeys(url for url, _ in vs.values()):
            clients[url] = AsyncOpenAI(base_url=url, api_key=args.api_key, max_retries=0,
                                       timeout=args.request_timeout)  # a number: openai 3 takes httpx2 types
            models[url] = (await clients[url].models.list()).data[0].id
        prompts = load_prompts(args.num_prompts, args.prompt_offset)
        for name, (url, body) in vs.items():  # warm-up, untimed
            r = await send_request(clients[url], models[url], f"[warm-up {name}] Say hello.", 4, args.temperature,
                                   body)
            if not r.ok:
                raise RuntimeError(f"warm-up request ({name}) failed: {r.error}")
        rows, run = [], 0
        for k, (rate, conc) in enumerate(load_points(args)):
            order = list(vs) if k % 2 == 0 else list(vs)[::-1]
            n = conc * args.rounds if conc else args.num_prompts
            point = load_prompts(n, args.prompt_offset) if conc else prompts
            for name in order:
                run += 1
                url, body = vs[name]
                tagged = [f"[run {run}] {p}" for p in point] if args.tag_prompts else point
                label = f"concurrency {conc}" if conc else f"rate {rate:g}"
                results, duration = await run_load(clients[url], models[url], tagged, rate, args.seed,
                                                   args.max_tokens, args.temperature, body,
                                                   conc or args.max_concurrency, desc=f"{label} {name}")
                row = {"rate": "inf" if math.isinf(rate) else rate, "concurrency": conc, "variant": name,
                       "order": run, **summarize(results, duration)}
                rows.append(row)
                print(f"{label} {name}: {row['ok']} ok, {row['failed']} failed, {row['duration_s']} s, "
                      f"{row['out_tok_per_s']} tok/s, mean exit layer {row['mean_exit_layer']}", flush=True)
            key = (rows[-1]["rate"], rows[-1]["concurrency"])
            off = next((r for r in rows if (r["rate"], r["concurrency"]) == key and r["variant"] == "ee-off"), None)
            for r in rows:
                if off is not None and (r["rate"], r["concurrency"]) == key:
                    r["tpot_speedup"] = (round(off["tpot_p50"] / r["tpot_p50"], 3)
                                         if off["tpot_p50"] and r["tpot_p50"] else None)
        return models[next(iter(vs.values()))[0]], rows
    finally:
        for c in clients.values():
            await c.close()


def load_points(args) -> list[tuple[float, Optional[int]]]:
    """``(request rate, concurrency)`` of each load point: with ``--concurrency``, every value ``c``
    sends ``c * --rounds`` requests at once with at most ``c`` in flight (closed loop: ``c``
    concurrent streams); otherwise each ``--request-rates`` value with Poisson arrivals."""
    if args.concurrency:
        return [(math.inf, c) for c in args.concurrency]
    return [(r, None) for r in args.request_rates]


def parse_args(argv=None, description: str = "Online serving benchmark") -> argparse.Namespace:
    """The serving benchmark's command line (``--help`` lists it).

    Raises:
        SystemExit: bad arguments, ``--launch`` with ``--base-url``, or ``--peer llama-cpp`` without a
            GGUF model (argparse's usage error, status 2).
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000/v1; default: --launch")
    ap.add_argument("--launch", action="store_true", help="start Ray + the app in-process (the default "
                                                          "when no --base-url is given)")
    ap.add_argument("--api-key", default=os.environ.get("EESERVE_API_KEY") or "EMPTY")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--prompt-offset", type=int, default=0)
    ap.add_argument("--request-rates", type=float, nargs="+", default=[1.0, 4.0],
                    help="requests/s of the Poisson arrivals; inf sends all requests at once")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threshold", type=float, default=None,
                    help="ee-on's exit threshold (request field early_exit.threshold); default: the server's")
    ap.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (as in vLLM)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="closed-loop load points instead of --request-rates: C concurrent streams, "
                         "C * --rounds requests each")
    ap.add_argument("--rounds", type=int, default=2, help="(--concurrency) requests per stream")
    ap.add_argument("--variants", nargs="+", default=["ee-off", "ee-on"], choices=["ee-off", "ee-on"],
                    help="our variants to run (the peers always run)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inter-arrival times")
    ap.add_argument("--no-tag-prompts", dest="tag_prompts", action="store_false",
                    help="send the prompts unchanged (runs after the first may then hit the prefix cache)")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    ap.add_argument("--ignore-eos", action="store_true", help="every request runs to --max-tokens")
    ap.add_argument("--peer", choices=["llama-cpp", "llama-server"], action="append", default=[],
                    help="start a peer server on the same model and add it as a variant (llama-cpp: "
                         "llama-cpp-python's server on the GGUF, pip install -e '.[peers]'; llama-server: "
                         "llama.cpp's own server with continuous batching, bench/build_llama_server.sh)")
    ap.add_argument("--peer-parallel", type=int, default=16, help="(--peer llama-server) slots, -np")
    ap.add_argument("--peer-url", default=None, help="another OpenAI-compatible server, variant 'peer'")
    ap.add_argument("--peer-threads", type=int, default=None, help="(--peer) threads; default: the cores")
    ap.add_argument("--peer-log", default=None, help="(--peer) file for the peer server's output")
    ap.add_argument("--name", default="serving", help="results file bench/results/<name>.json")
    # --launch only
    ap.add_argument("--model", default=None, help="(--launch) model path; default: SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="float32", help="(--launch)")
    ap.add_argument("--quantization", default="none", choices=["none", "int8", "int4"], help="(--launch)")
    ap.add_argument("--torch-threads", type=int, default=None, help="(--launch) torch threads of the replica")
    ap.add_argument("--ray-cpus", type=int, default=4, help="(--launch) num_cpus of the local Ray instance")
    ap.add_argument("--app-name", default="bench", help="(--launch) Serve application name / route prefix")
    ap.add_argument("--verbose", action="store_true", help="(--launch) show the Ray workers' logs")
    args = ap.parse_args(argv)
    if args.launch and args.base_url:
        ap.error("--launch and --base-url are exclusive")
    for peer in args.peer:
        from bench.common.peers import gguf_path, llama_server_binary

        if gguf_path(args.model) is None:
            ap.error(f"--peer {peer} needs a GGUF model (--model <file.gguf>, or the default model)")
        if peer == "llama-server" and llama_server_binary() is None:
            ap.error("--peer llama-server: no llama-server binary ($EESERVE_LLAMA_SERVER, PATH; "
                     "build it: bash bench/build_llama_server.sh)")
    return args


def run(args: argparse.Namespace) -> dict:
    """Start the peers and (without ``--base-url``) a local server, run every variant at each rate,
    stop what was started; returns the payload that :func:`report` prints and saves (``rows``,
    ``peer_ratios``, ``model``, ``num_layers``, ...)."""
    launch = args.base_url is None
    with contextlib.ExitStack() as stack:
        peers = {"peer": args.peer_url.rstrip("/")} if args.peer_url else {}
        if "llama-cpp" in args.peer:
            from bench.common.peers import eog_token_ids, gguf_path, llama_cpp_server

            gguf = gguf_path(args.model)
            args.peer_eog_ids = eog_token_ids(gguf)
            peers["llama-cpp"] = stack.enter_context(llama_cpp_server(gguf, args.peer_threads, log_path=args.peer_log))
            print(f"llama-cpp-python server on {gguf} at {peers['llama-cpp']}", flush=True)
        if "llama-server" in args.peer:
            from bench.common.peers import gguf_path, llama_server

            gguf = gguf_path(args.model)
            peers["llama-server"] = stack.enter_context(llama_server(
                gguf, args.peer_threads, parallel=args.peer_parallel,
                log_path=args.peer_log and f"{args.peer_log}.llama-server"))
            print(f"llama-server -np {args.peer_parallel} on {gguf} at {peers['llama-server']}", flush=True)
        base_url = launch_server(args) if launch else args.base_url.rstrip("/")
        if launch:
            stack.callback(shutdown_server)
        vs = {k: v for k, v in variants(args, base_url, peers).items()
              if k in peers or k in args.variants}
        model, rows = asyncio.run(benchmark(args, vs))
    num_layers = next((r["num_layers"] for r in rows if r["num_layers"]), None)
    return {"args": {**vars(args), "request_rates": [str(r) for r in args.request_rates]},
            "machine": {"cpus": os.cpu_count(), "note": "shared machine: timings are noisy, compare ratios"},
            "base_url": None if launch else base_url, "model": model, "num_layers": num_layers,
            "peers": peers, "units": {"ttft/tpot/itl/e2el": "ms", "req_per_s": "requests/s",
                                      "out_tok_per_s": "output tokens/s"},
            "rows": rows, "peer_ratios": peer_ratios(rows, peers)}


def report(args: argparse.Namespace, payload: dict):
    """Print the rows (and the peer ratios) of :func:`run`'s payload and save it as ``--name``."""
    print_table(payload["rows"], COLS)
    if payload["peer_ratios"]:
        print_table(payload["peer_ratios"], list(payload["peer_ratios"][0]))
    path = save(args.name, payload)
    print(f"saved {path}")
    return path


def peer_ratios(rows: list[dict], peers: dict[str, str]) -> list[dict]:
    """At each rate, each of our variants against each peer: output tok/s ratio and TPOT p50 ratio
    (peer / ours: > 1 means ours is faster on both)."""
    out = []
    for peer in peers:
        for p in (r for r in rows if r["variant"] == peer):
            for r in rows:
                if (r["rate"], r.get("concurrency")) == (p["rate"], p.get("concurrency")) \
                        and r["variant"] in ("ee-off", "ee-on"):
                    out.append({"rate": r["rate"], "concurrency": r.get("concurrency"), "variant": r["variant"],
                                "peer": peer,
                                "tok_per_s_ratio": (round(r["out_tok_per_s"] / p["out_tok_per_s"], 3)
                                                    if p["out_tok_per_s"] else None),
                                "tpot_p50_ratio": (round(p["tpot_p50"] / r["tpot_p50"], 3)
                                                   if p["tpot_p50"] and r["tpot_p50"] else None)})
    return out
