"""Threshold calibration for early exit (teacher-forced, on a calibration split).

Policy (as served by :func:`cluster.model.exits.forward_with_exits`): a token is emitted by the first
exit layer whose confidence reaches that layer's threshold, else by the last layer. Along the full
model's greedy output, the emitted token *agrees* when it equals the full model's token.

:func:`choose_thresholds` minimises the expected compute per token (a multiply-add count model, see
:class:`CostModel`) subject to ``agreement >= target`` on the calibration positions, by a greedy
search: starting from "never exit", it repeatedly lowers one exit layer's threshold (or enables a
layer) choosing the move with the best compute saved per extra disagreement, while the
constraint holds. Layers it never enables are dropped from the exit config.

Free-running target (``eeserve calibrate --metric rouge_l``): :func:`search_blend` raises those
thresholds toward 1.0 (:func:`blend_thresholds`) by the least amount at which the early-exit answers'
ROUGE-L against the full model's answers meets the target (generation is the caller's, see
:func:`cluster.training.calibration.calibrate_config`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cluster.config import ModelConfig
from cluster.training.evaluate import ExitPredictions


@dataclass(frozen=True)
class CostModel:
    """Multiply-adds per token (attention over the context is left out: it is the same either way)."""

    num_layers: int
    layer: float  # one decoder layer
    kv_fill: float  # K/V projections of one skipped layer (KV fill)
    lm_head: float  # final norm + LM head
    adapter: float  # trained head adapter
    classifier: float  # exit classifier

    @classmethod
    def for_model(cls, mc: ModelConfig, rank: int = 128, classifier_width: int = 64) -> "CostModel":
        H, q, kv = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        return cls(mc.num_layers, H * (q + 2 * kv) + q * H + 3 * H * mc.intermediate_size, 2 * H * kv,
                   mc.vocab_size * H, 2 * H * rank, H * classifier_width + classifier_width)

    @property
    def full(self) -> float:
        return self.num_layers * self.layer + self.lm_head

    def check_cost(self, measure: str) -> float:
        """One exit test: the classifier alone, or the exit's full logits for softmax measures."""
        return self.classifier if measure == "classifier" else self.adapter + self.lm_head

    def exit_logits_cost(self, measure: str) -> float:
        """Extra work once a token exits: its logits (softmax measures already have them)."""
        return self.adapter + self.lm_head if measure == "classifier" else 0.0


class _Policy:
    """Vectorised simulation of the exit policy for one measure's ``conf [N, E]`` and ``agree [N, E]``."""

    def __init__(self, conf: np.ndarray, agree: np.ndarray, layers: tuple[int, ...], cost: CostModel, measure: str):
        self.conf, self.agree, self.layers = conf, agree, np.asarray(layers)
        self.N, self.E = conf.shape
        self.check = cost.check_cost(measure)
        self.exit_extra = cost.exit_logits_cost(measure)
        self.cost = cost
        self.exit_base = self.layers * cost.layer + (cost.num_layers - self.layers) * cost.kv_fill + self.exit_extra

    def run(self, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``thr [E]`` (``inf`` = layer disabled) -> (first exit index (E = last layer), correct, cost)."""
        passed = self.conf >= thr[None, :]
        any_ = passed.any(1)
        first = np.where(any_, passed.argmax(1), self.E)
        enabled = np.isfinite(thr)
        checks_upto = np.cumsum(enabled)  # checks made by a token exiting at index j
        correct = np.ones(self.N, dtype=bool)
        ex = first < self.E
        correct[ex] = self.agree[ex, first[ex]]
        cost = np.empty(self.N)
        cost[ex] = self.exit_base[first[ex]] + checks_upto[first[ex]] * self.check
        cost[~ex] = self.cost.full + enabled.sum() * self.check
        return first, correct, cost


def choose_thresholds(pred: ExitPredictions, measure: str, target: float, cost: CostModel,
                      max_iters: int = 100000) -> dict[int, float]:
    """Per-layer thresholds meeting ``agreement >= target`` with the least modelled compute.

    Returns ``{exit layer: threshold}`` for the layers worth enabling (maybe none).
    """
    conf = pred.conf[measure].astype(np.float64)
    pol = _Policy(conf, pred.agree, pred.layers, cost, measure)
    N, E = conf.shape
    max_err = math.floor((1.0 - target) * N + 1e-9)
    thr = np.full(E, np.inf)
    first, correct, cur = pol.run(thr)
    err = int((~correct).sum())
    for _ in range(max_iters):
        best = None  # (score, j, threshold)
        enabled = np.isfinite(thr)
        for j in range(E):
            P = np.nonzero(first > j)[0]
            if not P.size:
                continue
            extra = 0.0 if enabled[j] else pol.check  # newly enabled: everyone still running pays a check
            c = conf[P, j]
            order = np.argsort(-c, kind="stable")
            c_sorted = c[order]
            exit_cost = pol.exit_base[j] + (enabled[:j].sum() + 1) * pol.check
            d_cost = np.cumsum(exit_cost - cur[P][order] - extra)
            d_err = np.cumsum((~pol.agree[P, j]).astype(np.int64)[order] - (~correct[P]).astype(np.int64)[order])
            # a threshold lets through every position with conf >= it: cut after the last of equal values
            last = np.nonzero(np.append(c_sorted[1:] != c_sorted[:-1], True))[0]
            last = last[c_sorted[last] < thr[j]]
            if not last.size:
                continue
            dc = d_cost[last] + extra * P.size
            de = d_err[last]
            ok = (err + de <= max_err) & (dc < 0)
            if not ok.any():
                continue
            score = np.where(de <= 0, 1e30 - dc, -dc / np.maximum(de, 1))
            score[~ok] = -np.inf
            k = int(score.argmax())
            if best is None or score[k] > best[0]:
                # threshold halfway to the next lower confidence: the same positions pass, with a
                # margin against rounding differences between batched and single-row evaluation
                cut = last[k]
                lower = c_sorted[cut + 1] if cut + 1 < c_sorted.size else c_sorted[cut] - 1e-3
                best = (score[k], j, float((c_sorted[cut] + lower) / 2))
        if best is None:
            break
        thr[best[1]] = best[2]
        first, correct, cur = pol.run(thr)
        err = int((~correct).sum())
    return {int(l): float(t) for l, t in zip(pred.layers, thr) if np.isfinite(t)}


def single_threshold(pred: ExitPredictions, measure: str, target: float) -> Optional[float]:
    """The lowest shared threshold (all exit layers) meeting the target; None if none does."""
    conf = pred.conf[measure].astype(np.float64)
    cands = np.unique(conf)[::-1]
    best = None
    lo, hi = 0, len(cands) - 1  # agreement falls (almost) monotonically as the threshold falls
    while lo <= hi:
        mid = (lo + hi) // 2
        if policy_stats(pred, measure, {l: cands[mid] for l in pred.layers})["agreement"] >= target:
            best, lo = float(cands[mid]), mid + 1
        else:
            hi = mid - 1
    return best


def policy_stats(pred: ExitPredictions, measure: str, thresholds: dict[int, float],
                 cost: Optional[CostModel] = None) -> dict:
    """Agreement, exit fractions, mean exit layer (and modelled compute share) under ``thresholds``."""
    thr = np.array([thresholds.get(l, np.inf) for l in pred.layers], dtype=np.float64)
    conf = pred.conf[measure].astype(np.float64)
    N, E = conf.shape
    if cost is None:
        cost = CostModel(pred.num_layers, 1.0, 0.0, 0.0, 0.0, 0.0)
    first, correct, c = _Policy(conf, pred.agree, pred.layers, cost, measure).run(thr)
    layer_of = np.append(np.asarray(pred.layers), pred.num_layers)[first] if N else np.zeros(0)
    return {
        "positions": int(N),
        "agreement": float(correct.mean()) if N else 1.0,
        "exit_fraction": float((first < E).mean()) if N else 0.0,
        "exit_fraction_per_layer": {int(l): float((first == j).mean()) if N else 0.0 for j, l in enumerate(pred.layers)},
        "mean_exit_layer": float(layer_of.mean()) if N else float(pred.num_layers),
        "compute_fraction": float(c.mean() / cost.full) if N else 1.0,
    }


def oracle_stats(pred: ExitPredictions, cost: CostModel) -> dict:
    """Upper bound of the heads themselves: every position leaves at its first exit layer whose token
    agrees with the full model's (checks free, agreement 100%). Returns the exit fraction, mean exit
    layer, modelled compute share (see :class:`CostModel`) and the implied speed-up."""
    N, E = pred.agree.shape
    if not N:
        return {"exit_fraction": 0.0, "mean_exit_layer": float(pred.num_layers), "compute_fraction": 1.0,
                "speedup": 1.0}
    first = np.where(pred.agree.any(1), pred.agree.argmax(1), E)
    layer = np.append(np.asarray(pred.layers), pred.num_layers)[first]
    c = np.where(first < E, layer * cost.layer + (cost.num_layers - layer) * cost.kv_fill + cost.lm_head, cost.full)
    frac = float(c.mean() / cost.full)
    return {"exit_fraction": float((first < E).mean()), "mean_exit_layer": float(layer.mean()),
            "compute_fraction": frac, "speedup": 1.0 / frac}


# ------------------------------------------------------------------- free-running ROUGE-L target
def blend_thresholds(thresholds: dict[int, float], alpha: float) -> dict[int, float]:
    """Every threshold moved a share ``alpha`` of the way to 1.0: ``t + alpha * (1 - t)``."""
    return {l: float(t + alpha * (1.0 - t)) for l, t in thresholds.items()}


@dataclass(frozen=True)
class BlendSearch:
    """Result of :func:`search_blend`: ``alpha`` (None: no blend meets the target, disable exits),
    the score there (``value``), and every ``(alpha, score)`` evaluated, in order."""

    alpha: Optional[float]
    value: Optional[float]
    history: tuple[tuple[float, float], ...]


def search_blend(score, target: float, steps: int = 4) -> BlendSearch:
    """The least ``alpha`` in [0, 1] with ``score(alpha) >= target``, by bisection.

    ``score(alpha)`` is a free-running quality of the exit config whose thresholds are
    :func:`blend_thresholds` of the agreement-calibrated ones (e.g. ROUGE-L against the full model's
    answers, CALM's textual consistency); it is assumed to rise (roughly) with alpha, as higher
    thresholds let fewer tokens exit. ``score(0)`` is tried first (met: keep the calibrated
    thresholds), then ``score(1)`` (missed: None), then ``steps`` bisection steps, keeping the
    lowest alpha seen to meet the target: ``2 + steps`` evaluations at most.
    """
    history = []

    def ev(a: float) -> float:
        v = float(score(a))
        history.append((a, v))
        return v

    v0 = ev(0.0)
    if v0 >= target:
        return BlendSearch(0.0, v0, tuple(history))
    v1 = ev(1.0)
    if v1 < target:
        return BlendSearch(None, None, tuple(history))
    lo, hi, best = 0.0, 1.0, v1
    for _ in range(steps):
        mid = (lo + hi) / 2
        v = ev(mid)
        if v >= target:
            hi, best = mid, v
        else:
            lo = mid
    return BlendSearch(hi, best, tuple(history))
