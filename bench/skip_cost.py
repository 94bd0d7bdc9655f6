"""What a ``layer_skip`` draft pass costs against a full decode step, by batch size (issue 17 part 4).

For each quantization and batch size ``b``: one full step (every layer and the LM head) over ``b``
decode rows, one draft pass (every layer but the skip set, the draft head) over ``b`` rows, and
one verification (a full step over ``b * (k + 1)`` rows), timed interleaved (min over rounds),
beside deterministic counts: the aten ops each pass dispatches and its weight bytes (the engine's
cost model, :meth:`LLMEngine.draft_cost`) and FLOPs (``FlopCounterMode``; the int4 kernel is not counted). The ratios are what the draft control's cost model
(:mod:`cluster.core.draft_control`: ``ridge_rows``) needs.

    PYTHONPATH=$PWD python -m bench.skip_cost --batches 1 4 16 --k 3 --rounds 5
"""
from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.common.results import print_table, save
from cluster import LLM
from cluster.config import ExitConfig
from cluster.model.speculative import skip_draft_forward
from cluster.request import default_skip_layers
from cluster.worker.input_batch import HostBatch


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _inputs(runner, rows: int, ctx: int):
    """``rows`` decode rows, each at position ``ctx`` of its own sequence (blocks 1.. of the cache)."""
    bs = runner.packer.block_size
    per = ctx // bs + 1
    host = HostBatch(ids=[1] * rows)
    for r in range(rows):
        host.decode_row(list(range(1 + r * per, 1 + (r + 1) * per)), ctx)
    dev = runner.packer.pack(host)
    return dev.input_ids, dev.positions, dev.attention_metadata()


def measure(quant: str, batches: list[int], k: int, rounds: int, ctx: int) -> list[dict]:
    llm = LLM(None, quantization=quant, num_blocks=(max(batches) * (k + 1) + 1) * (ctx // 16 + 1) + 1,
              early_exit=ExitConfig(mode="layer_skip"))
    try:
        runner = llm.engine.workers.local.runner
        L = runner.model_config.num_layers
        skip = llm.engine.exit_config.skip_layers or default_skip_layers(L)
        model, heads, caches = runner.model, runner.heads, runner.kv_caches

        def full(rows):
            ids, pos, meta = _inputs(runner, rows, ctx)
            return lambda: skip_draft_forward(model, None, ids, pos, meta, caches, ())

        def draft(rows):
            ids, pos, meta = _inputs(runner, rows, ctx)
            return lambda: skip_draft_forward(model, heads, ids, pos, meta, caches, skip)

        calls = {}
        for b in batches:
            calls[("full", b)] = full(b)
            calls[("draft", b)] = draft(b)
            calls[("verify", b)] = full(b * (k + 1))
        ops, flops = {}, {}
        with torch.inference_mode():
            for key, fn in calls.items():
                fn()
                with _CountOps() as c:
                    fn()
                ops[key] = c.n
                with FlopCounterMode(display=False) as fc:
                    fn()
                flops[key] = fc.get_total_flops()
            best = {key: float("inf") for key in calls}
            import time

            for r in range(rounds):
                for key in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                    t = time.perf_counter()
                    calls[key]()
                    best[key] = min(best[key], (time.perf_counter() - t) * 1e3)
        bytes_frac = llm.engine.draft_cost(None, tuple(skip)) - llm.engine.DRAFT_PASS_OVERHEAD
        rows = []
        for b in batches:
            f1 = best[("full", 1)] if 1 in batches else best[("full", batches[0])]
            rows.append({"quant": quant, "batch": b, "skip": len(skip), "full_ms": round(best[("full", b)], 2),
                         "draft_ms": round(best[("draft", b)], 2), "verify_ms": round(best[("verify", b)], 2),
                         "draft/full": round(best[("draft", b)] / best[("full", b)], 3),
                         "verify/full": round(best[("verify", b)] / best[("full", b)], 3),
                         "full/full@1": round(best[("full", b)] / f1, 3),
                         "weight_bytes_draft/full": round(bytes_frac, 3),
                         "ops_full": ops[("full", b)], "ops_draft": ops[("draft", b)],
                         "gflop_full": round(flops[("full", b)] / 1e9, 3), "gflop_draft": round(flops[("draft", b)] / 1e9, 3),
                         "gflop_verify": round(flops[("verify", b)] / 1e9, 3)})
        return rows
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--quantizations", nargs="+", default=["none", "int4"])
    ap.add_argument("--k", type=int, default=3, help="drafts per verification (verify = b * (k + 1) rows)")
    ap.add_argument("--ctx", type=int, default=64, help="context length of each row")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = [r for q in args.quantizations for r in measure(q, args.batches, args.k, args.rounds, args.ctx)]
    cols = list(rows[0])
    print_table(rows, cols)
    print(save("skip_cost", {"args": vars(args),
                             "note": "shared 2-core machine: timings are noisy (min over interleaved rounds); "
                                     "op counts are deterministic", "rows": rows}))


if __name__ == "__main__":
    main()
