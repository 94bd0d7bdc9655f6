"""Bytes and microseconds of the per-iteration message the driver sends each rank (issue 18 part 2).

* **before** (the old protocol): the whole :class:`~cluster.core.outputs.SchedulerOutput`, every
  scheduled request's full block table, token ids and pydantic sampling params, pickled every step
  (the scheduler with ``encoder=None``, which is main's code path);
* **after**: the diff (:class:`~cluster.core.step_message.StepMessage`: new requests once, then new
  tokens / blocks / counts / finished ids) that each rank applies to its
  :class:`~cluster.worker.persistent_batch.PersistentBatch`.

Host only, no model: two schedulers run the same requests in lockstep (fed the same fake sampled
tokens), ``batch`` requests with ``--context``-token prompts (prefilled in one step), then
``--steps`` decode steps; per step the two protocols are timed back to back, alternating which
goes first. Columns: ``bytes`` per rank (``pickle`` protocol 5, what Ray's serializer does for these
objects), ``build_us`` (``schedule()``, with the encoding after), ``pickle_us`` / ``unpickle_us``
(one rank's copy), ``apply_us`` (the rank rebuilds the iteration from its state; before: nothing),
``total_us``: TP 1 runs in process (build + apply, nothing pickled; ``bytes`` is what a remote rank
would get); TP 2 has two rank actors, so the driver pickles twice: build + 2 x pickle + unpickle +
apply. Medians over the decode steps; ``prefill`` is the first step (every request new).
``engine``: the protocol the engine uses there (in process it keeps the whole output, which costs
nothing to send; ``EESERVE_STEP_DIFF=1`` forces the diff).

    python -m bench.step_protocol               # batch 1 and 32, 1000-token contexts
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import time
import uuid

from bench.common.results import print_table, save
from cluster.config import CacheConfig, SchedulerConfig
from cluster.core.outputs import ModelRunnerOutput, SampledTokens
from cluster.core.scheduler import Scheduler
from cluster.request import ExitPlan, Request
from cluster.sampling import SamplingParams


def make_scheduler(batch: int, context: int, steps: int, block_size: int, diff: bool) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=batch * context,
                          max_model_len=context + steps + 16)
    blocks = batch * (-(-(context + steps + 16) // block_size)) + 8
    s = Scheduler(cfg, CacheConfig(block_size=block_size), blocks)
    if not diff:
        s.encoder = None
    return s


def add_requests(scheds: list[Scheduler], batch: int, context: int, steps: int) -> None:
    for i in range(batch):
        rid = f"cmpl-{uuid.uuid4().hex}"  # the serving layer's id shape
        prompt = [(i * 7919 + j * 31) % 32000 + 10 for j in range(context)]
        sp = SamplingParams(max_tokens=steps + 8, temperature=0.7, top_p=0.9, seed=i, stop=("\n\n",))
        for s in scheds:
            s.add_request(Request(rid, list(prompt), sp, eos_token_ids=(2,), exit_plan=ExitPlan("paper", threshold=0.5)))


def one_step(sched: Scheduler, rank) -> tuple[dict, object]:
    """Schedule one step and move it to a rank (pickle/unpickle; apply when diffing); returns the
    measurements and the scheduler output."""
    t0 = time.perf_counter()
    so = sched.schedule()
    t1 = time.perf_counter()
    step = getattr(so, "step", None)  # (None on main's code, which has no diff)
    msg = step if step is not None else so
    data = pickle.dumps(msg, protocol=5)
    t2 = time.perf_counter()
    got = pickle.loads(data)
    t3 = time.perf_counter()
    if step is not None:
        rank.apply(got)
    t4 = time.perf_counter()
    us = 1e6
    m = {"bytes": len(data), "build_us": (t1 - t0) * us, "pickle_us": (t2 - t1) * us,
         "unpickle_us": (t3 - t2) * us, "apply_us": (t4 - t3) * us}
    return m, so


def finish_step(sched: Scheduler, so, token: int) -> None:
    out = ModelRunnerOutput(tokens={sr.request_id: SampledTokens([token], [30]) for sr in so.scheduled if sr.sample})
    sched.update(so, out)


def total(m: dict, tp: int) -> float:
    if tp == 1:
        return m["build_us"] + m["apply_us"]
    return m["build_us"] + tp * m["pickle_us"] + m["unpickle_us"] + m["apply_us"]


def run(batch: int, context: int, steps: int, block_size: int) -> list[dict]:
    from cluster.worker.persistent_batch import PersistentBatch

    scheds = {"before": make_scheduler(batch, context, steps, block_size, diff=False),
              "after": make_scheduler(batch, context, steps, block_size, diff=True)}
    ranks = {k: PersistentBatch() for k in scheds}
    add_requests(list(scheds.values()), batch, context, steps)
    per = {k: [] for k in scheds}
    order = list(scheds)
    for step in range(steps + 1):
        token = 1000 + step
        outs = {}
        for k in (order if step % 2 == 0 else order[::-1]):
            m, outs[k] = one_step(scheds[k], ranks[k])
            per[k].append(m)
        for k in scheds:
            finish_step(scheds[k], outs[k], token)
        assert [sr.request_id for sr in outs["before"].scheduled] == [sr.request_id for sr in outs["after"].scheduled]
    rows = []
    for k in scheds:
        prefill, decodes = per[k][0], per[k][1:]
        med = {f: statistics.median(d[f] for d in decodes) for f in prefill}
        for tp in (1, 2):
            for kind, m in (("prefill", prefill), ("decode", med)):
                rows.append({"protocol": k, "batch": batch, "tp": tp, "step": kind, "context": context,
                             "bytes": int(m["bytes"]), "max_bytes": max(d["bytes"] for d in decodes) if kind == "decode"
                             else int(m["bytes"]),
                             **{f: round(m[f], 1) for f in ("build_us", "pickle_us", "unpickle_us", "apply_us")},
                             "total_us": round(total(m, tp), 1),
                             "engine": "yes" if (k == "after") == (tp > 1) else ""})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=1000, help="prompt tokens (the decode steps' context)")
    ap.add_argument("--steps", type=int, default=200, help="decode steps measured")
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    rows = [r for b in args.batch for r in run(b, args.context, args.steps, args.block_size)]
    rows.sort(key=lambda r: (r["step"] != "decode", r["batch"], r["tp"], r["protocol"] != "before"))
    for r in rows:  # after vs before, same batch / tp / step
        b = next(x for x in rows if x["protocol"] == "before" and all(x[f] == r[f] for f in ("batch", "tp", "step")))
        r["bytes_x"] = round(b["bytes"] / r["bytes"], 1)
        r["time_x"] = round(b["total_us"] / r["total_us"], 2)
    cols = ["step", "batch", "tp", "protocol", "bytes", "max_bytes", "build_us", "pickle_us", "unpickle_us", "apply_us",
            "total_us", "bytes_x", "time_x", "engine"]
    print_table(rows, cols)
    path = save("step-protocol", {"args": vars(args), "rows": rows,
                                  "note": "bytes_x / time_x: before over after (higher: after is smaller/faster); "
                                          "timings on a shared 2-core machine (noisy), bytes deterministic"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
