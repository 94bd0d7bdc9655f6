"""Soak benchmark: N concurrent clients for M minutes against the Serve app, with random client
disconnects, a share of invalid requests and one LLMServer replica killed midway.

    python -m bench.soak --minutes 10 --concurrency 8                 # own local Ray + app (default model)
    python -m bench.soak --minutes 1 --model /path/to/tiny --replicas 2
    python -m bench.soak --address <gcs host:port> --url http://host:8000 --app eeserve   # a running app

Every request ends as ``ok``, ``error`` (answered with an OpenAI error object: the invalid requests'
400s, and the requests of the killed replica), ``disconnected`` (closed by the client on purpose),
``cut`` (ended without an error object) or ``hung`` (no answer in ``--timeout``); see
:mod:`bench.loadgen`. After the load ends it waits for the replicas to go idle and reports the KV
blocks still in use (``num_blocks - num_free_blocks`` of every replica; the block manager's integrity
check runs too) and each replica's resident memory (``rss_bytes``) from its first to its last sample.

Pass: ``hung == 0``, ``cut == 0``, KV blocks in use after the load ``== 0``; the exit status is 1 otherwise.
Prints a table and saves ``bench/results/soak.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Optional

from bench.common.results import save
from bench.loadgen import LoadGenerator, summarize

APP = "soak"


def _replica_stats(handle) -> list[dict]:
    res = handle.broadcast("stats").results(timeout_s=30, return_exceptions=True)
    return [r for r in res if isinstance(r, dict)]


def _kill_one(handle) -> Optional[str]:
    """Kill one LLMServer replica's actor (as ``kill -9`` would); returns its replica id."""
    import ray

    stats = _replica_stats(handle)
    if not stats:
        return None
    victim = max(stats, key=lambda s: s.get("num_active", 0))
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    return victim["replica"]


def run(args) -> dict:
    import ray
    from ray import serve

    from deployments.testing import deploy, start_http, wait_healthy

    own = args.url is None
    if own:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        start_http()
        app_args = {"num_replicas": args.replicas, "replica_num_cpus": 0.1, "ingress_num_cpus": 0.1,
                    "health_check_period_s": 1.0, "health_check_timeout_s": 20.0, "max_num_seqs": 16,
                    "routing_stats_period_s": 0.5, "served_model_name": "soak", "kv_cache_memory_bytes": 256 << 20}
        if args.model:
            app_args["model"] = args.model
        url, app, model = deploy(app_args, APP, timeout_s=600), APP, "soak"
    else:
        ray.init(address=args.address, log_to_driver=False)
        url, app, model = args.url.rstrip("/"), args.app, args.served_model_name
        wait_healthy(url, 120)
    handle = serve.get_deployment_handle("LLMServer", app_name=app)
    t0 = time.monotonic()
    memory: dict[str, list] = {}
    samples: list[dict] = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            try:
                for s in _replica_stats(handle):
                    memory.setdefault(s["replica"], []).append((round(time.monotonic() - t0, 1), s["rss_bytes"]))
                    samples.append({"t": round(time.monotonic() - t0, 1), "replica": s["replica"],
                                    "num_active": s["num_active"], "kv_usage": s.get("kv_usage"),
                                    "mean_exit_layer": s.get("mean_exit_layer")})
            except Exception as e:  # noqa: BLE001 - a replica dying mid-call
                print("stats failed:", repr(e), flush=True)
            stop.wait(args.sample_s)

    threading.Thread(target=sampler, daemon=True).start()
    gen = LoadGenerator(url, model, concurrency=args.concurrency, max_tokens=args.max_tokens,
                        stream_share=args.stream_share, bad_share=args.bad_share,
                        disconnect_share=args.disconnect_share, timeout_s=args.timeout, seed=args.seed).start()
    duration = args.minutes * 60
    killed, kill_t = None, None
    while time.monotonic() - t0 < duration:
        if killed is None and args.kill and time.monotonic() - t0 >= duration / 2:
            killed, kill_t = _kill_one(handle), round(time.monotonic() - t0, 1)
            print(f"[{kill_t}s] killed replica {killed}", flush=True)
        time.sleep(1)
    results = gen.stop()
    load_end = time.monotonic()
    # idle: no request in flight on any replica, then count the KV blocks still held
    kv_in_use, idle = None, []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        idle = _replica_stats(handle)
        if idle and all(s["num_active"] == 0 and s.get("num_running", 0) == 0 and s.get("num_waiting", 0) == 0
                        for s in idle):
            break
        time.sleep(1)
    time.sleep(2)  # the engine frees an aborted request's blocks on its next step
    integrity = handle.broadcast("check_integrity").results(timeout_s=60, return_exceptions=True)
    idle = [s for s in integrity if isinstance(s, dict)]
    kv_in_use = sum(s["num_blocks"] - s["num_free_blocks"] for s in idle)
    stop.set()
    summary = summarize(results)
    growth = {rep: {"first_mb": round(v[0][1] / 2**20, 1), "last_mb": round(v[-1][1] / 2**20, 1),
                    "growth_mb": round((v[-1][1] - v[0][1]) / 2**20, 1), "first_t": v[0][0], "last_t": v[-1][0]}
              for rep, v in memory.items()}
    out = {"config": {k: v for k, v in vars(args).items()}, "url": url, "summary": summary,
           "killed_replica": killed, "killed_at_s": kill_t, "kv_blocks_in_use_after": kv_in_use,
           "integrity_errors": [repr(e) for e in integrity if isinstance(e, BaseException)],
           "replicas_after": [{"replica": s["replica"], "num_blocks": s["num_blocks"],
                               "num_free_blocks": s["num_free_blocks"], "num_active": s["num_active"]} for s in idle],
           "memory": growth, "idle_wait_s": round(time.monotonic() - load_end, 1),
           "errors_by_status": _by_status(results), "bad_examples": [r.as_dict() for r in results
                                                                     if r.outcome in ("cut", "hung")][:10],
           "duration_s": round(load_end - t0, 1)}
    out["passed"] = (summary["hung"] == 0 and summary["cut"] == 0 and kv_in_use == 0 and not out["integrity_errors"])
    if own:
        serve.shutdown()
        ray.shutdown()
    return out


def _by_status(results) -> dict:
    """Error outcomes counted by ``"<kind> <HTTP status> <error code or type>"``."""
    out: dict[str, int] = {}
    for r in results:
        if r.outcome == "error":
            key = f"{r.kind} {r.status} {r.code or ''}".strip()
            out[key] = out.get(key, 0) + 1
    return out


def table(out: dict) -> str:
    s = out["summary"]
    rows = [("requests", s["total"]), ("ok", s["ok"]), ("failed with an error object", s["error"]),
            ("client disconnects", s["disconnected"]), ("cut (no error object)", s["cut"]), ("hung", s["hung"]),
            ("KV blocks in use after the load", out["kv_blocks_in_use_after"]),
            ("killed replica (at s)", f"{out['killed_replica']} ({out['killed_at_s']})")]
    rows += [(f"errors: {k}", v) for k, v in sorted(out["errors_by_status"].items())]
    rows += [(f"replica {rep} RSS MB (t={m['first_t']}s -> {m['last_t']}s)",
              f"{m['first_mb']} -> {m['last_mb']} ({m['growth_mb']:+})") for rep, m in out["memory"].items()]
    rows.append(("passed", out["passed"]))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream-share", type=float, default=0.6)
    ap.add_argument("--bad-share", type=float, default=0.1)
    ap.add_argument("--disconnect-share", type=float, default=0.2)
    ap.add_argument("--timeout", type=float, default=60, help="seconds without an answer that make a request hung")
    ap.add_argument("--no-kill", dest="kill", action="store_false", help="do not kill a replica midway")
    ap.add_argument("--model", default=None, help="own app: model dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--replicas", type=int, default=2, help="own app: LLMServer replicas")
    ap.add_argument("--num-cpus", type=int, default=8, help="own app: CPUs of the local Ray instance")
    ap.add_argument("--url", default=None, help="a running app's base URL (with --address)")
    ap.add_argument("--address", default=None, help="its Ray GCS address (to read stats and kill a replica)")
    ap.add_argument("--app", default="eeserve", help="its Serve application name")
    ap.add_argument("--served-model-name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--sample-s", type=float, default=10.0, help="replica stats sampling period")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="soak", help="result name under bench/results/")
    args = ap.parse_args(argv)
    out = run(args)
    print(table(out))
    path = save(args.out, out)
    print(f"saved {path}")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
