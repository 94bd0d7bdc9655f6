"""Timing on a noisy, shared machine: interleaved best-of rounds and per-call timings."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable, TypeVar

R = TypeVar("R")


def interleaved_best(runs: dict[Hashable, Callable[[], R]], rounds: int,
                     score: Callable[[R], float] = lambda r: r[1]) -> dict[Hashable, R]:
    """Call every variant's ``run()`` once per round, ``rounds`` times, and keep each variant's best
    result by ``score`` (default: element 1, tokens/s, of :func:`bench.common.engines.run_engine`'s tuple).

    Rounds interleave the variants (and reverse their order every other round) so that a noisy,
    shared machine's drift hits every variant alike; the best round is the least disturbed one.
    """
    best: dict = {}
    keys = list(runs)
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            res = runs[key]()
            if key not in best or score(res) > score(best[key]):
                best[key] = res
    return {k: best[k] for k in keys if k in best}


def time_ms(fn: Callable[[], object], n: int = 50) -> float:
    """Mean milliseconds per call of ``fn()`` over ``n`` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def time_calls(fns: dict, x, rounds: int) -> dict:
    """``{name: (min ms, median ms)}`` of single calls ``fn(x)``, interleaved over ``rounds`` rounds so
    that a shared machine's load hits every variant alike (the minimum is the undisturbed cost)."""
    samples = {k: [] for k in fns}
    for fn in fns.values():
        fn(x)  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            samples[k].append(time.perf_counter() - t)
    return {k: (min(v) * 1e3, statistics.median(v) * 1e3) for k, v in samples.items()}
