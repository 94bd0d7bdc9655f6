"""``eeserve calibrate`` end to end: thresholds chosen on the calibration split of the exit heads'
training data (teacher-forced agreement, or free-running ROUGE-L against the full model), written into
the exit config. The threshold search itself is :mod:`cluster.training.calibrate`; the workspace,
the splits and the exit-config file are :mod:`cluster.training.workspace`'s.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional

from safetensors import safe_open

from cluster.config import ExitConfig
from cluster.training.workspace import DataSettings, Workspace, kv_cache_bytes, read_heads_metadata, write_exit_config


def calibrate_config(config_path: str, ws: Optional[Workspace] = None, model: Optional[str] = None,
                     target: float = 0.95, measure: Optional[str] = None, per_layer: bool = True,
                     work_dir: Optional[str] = None, progress: bool = True,
                     log: Callable[[str], None] = print, z: float = 2.326, metric: str = "agreement",
                     search_steps: int = 4) -> dict:
    """Choose thresholds on the calibration split and write them into ``config_path``.

    The search asks for ``target + z * sqrt(target * (1 - target) / N)`` agreement on the ``N``
    calibration positions (a one-sided binomial margin, ``z = 2.326``: 99%), so that the target
    still holds on prompts the calibration did not see; ``z = 0`` searches for the bare target.

    The heads file's metadata names the splits it was trained with, so the calibration split is
    disjoint from the training prompts; the test split is reported as held out.

    ``metric='rouge_l'`` (CALM's textual consistency): starting from those agreement-calibrated
    thresholds, raise them toward 1.0 by the least amount (:func:`~cluster.training.calibrate.search_blend`,
    ``search_steps`` bisection steps, each a greedy generation of the calibration prompts with the
    candidate exit config) at which the early-exit answers' mean ROUGE-L against the full model's
    cached answers, less ``z`` standard errors, is at least ``target``; if even thresholds of 1.0 miss
    it, exits are disabled. The metric, target and measured ROUGE-L go into the ``calibration`` block.
    """
    from cluster.engine.factory import read_exit_config
    from cluster.model.exits import ExitHeads
    from cluster.training.calibrate import CostModel, choose_thresholds, oracle_stats, policy_stats, single_threshold
    from cluster.training.evaluate import exit_predictions, heads_layers

    with open(config_path) as f:
        raw = json.load(f)
    cfg = read_exit_config(config_path)
    if cfg.head != "trained":
        raise ValueError(f"calibrate: {config_path} has no trained heads (head={cfg.head!r}); run train-exits first")
    meta = read_heads_metadata(cfg.heads_path)
    sp = json.loads(meta.get("splits", "{}"))
    if ws is None:
        ws = Workspace.open(model, DataSettings.from_splits_meta(sp), work_dir, log=log)
    if meta.get("base_model_fingerprint") not in (None, ws.fingerprint):
        raise ValueError(f"calibrate: heads {cfg.heads_path} were trained for {meta['base_model_fingerprint']}, "
                         f"not for this model ({ws.fingerprint})")
    layers = heads_layers(cfg.heads_path)
    has_clf = "exit_classifiers" in "".join(_keys(cfg.heads_path))
    measure = measure or ("classifier" if has_clf else cfg.confidence)
    t = time.monotonic()
    seqs = ws.sequences(("calib", "test"), progress)
    heads = ExitHeads(ws.model(), ExitConfig(exit_layers=layers, head="trained", heads_path=cfg.heads_path,
                                             confidence="classifier" if has_clf else "max_prob"))
    pred = {s: exit_predictions(heads, ws.features(s, seqs[s], layers, progress=progress)) for s in ("calib", "test")}
    cost = CostModel.for_model(ws.model_config, rank=int(meta.get("rank", 128)),
                               classifier_width=int(meta.get("classifier_width", 64)))
    n = max(1, pred["calib"].conf[measure].shape[0])
    search = min(1.0, target + z * math.sqrt(target * (1.0 - target) / n))
    shared = single_threshold(pred["calib"], measure, search)
    if per_layer:
        thr = choose_thresholds(pred["calib"], measure, search, cost)
    else:
        thr = {l: shared for l in layers} if shared is not None else {}
    free_running = None
    if metric == "rouge_l":
        thr, shared, free_running = _rouge_l_thresholds(ws, cfg, measure, thr, shared, seqs["calib"], target, z,
                                                        search_steps, log)
    elif metric != "agreement":
        raise ValueError(f"calibrate: metric must be 'agreement' or 'rouge_l', got {metric!r}")
    result = {"metric": metric, "target": target, "search_target": search, "measure": measure,
              "thresholds": {str(l): v for l, v in thr.items()},
              "single_threshold": shared,
              "teacher_forced_agreement": {s: p.agreement() for s, p in pred.items()},
              "calib": policy_stats(pred["calib"], measure, thr, cost),
              "test": policy_stats(pred["test"], measure, thr, cost),
              "oracle_test": oracle_stats(pred["test"], cost)}
    if free_running is not None:
        result["rouge_l"] = free_running
    for other in sorted(pred["calib"].conf):  # what the other measures would give (for comparison)
        if other != measure:
            o = choose_thresholds(pred["calib"], other, search, cost)
            kind = "per_layer"
            if not o:  # no layer pays for its check under the cost model: one threshold at every layer
                one = single_threshold(pred["calib"], other, search)
                o, kind = ({l: one for l in layers} if one is not None else {}), "single"
            result.setdefault("alternatives", {})[other] = {
                "kind": kind, "thresholds": {str(l): v for l, v in o.items()},
                "test": policy_stats(pred["test"], other, o, cost)}
    enabled = tuple(sorted(thr))
    raw.update({"exit_layers": list(enabled), "head": "trained", "confidence": measure,
                "threshold": shared if shared is not None else 1.0,
                "layer_thresholds": [thr[l] for l in enabled],
                "model_fingerprint": ws.fingerprint,
                "calibration": {**{k: result[k] for k in ("metric", "target", "search_target", "measure", "calib", "test",
                                                          "rouge_l") if k in result},
                                # per-layer thresholds the other measures need for the same target
                                # (bench/offline.py runs each measure at its calibrated thresholds)
                                "alternatives": {m: {"kind": a["kind"], "exit_layers": sorted(int(l) for l in a["thresholds"]),
                                                     "layer_thresholds": [a["thresholds"][l] for l in sorted(
                                                         a["thresholds"], key=int)],
                                                     "test": a["test"]}
                                                 for m, a in result.get("alternatives", {}).items()}}})
    raw["heads_path"] = os.path.relpath(cfg.heads_path, os.path.dirname(os.path.abspath(config_path)))
    write_exit_config(config_path, raw)
    ws.timings["calibrate_s"] = time.monotonic() - t
    c, te = result["calib"], result["test"]
    log(f"calibrate: {measure} thresholds {json.dumps({l: round(v, 4) for l, v in thr.items()})}; calib agreement "
        f"{c['agreement']:.2%} (target {target:.0%}), test agreement {te['agreement']:.2%}, test exits "
        f"{te['exit_fraction']:.1%}, mean exit layer {te['mean_exit_layer']:.1f}/{ws.model_config.num_layers}, "
        f"modelled compute {te['compute_fraction']:.1%} (an oracle exit decision with these heads: "
        f"{result['oracle_test']['compute_fraction']:.1%}); wrote {config_path}")
    if free_running is not None:
        log(f"calibrate: free-running ROUGE-L on the calibration prompts {free_running['rouge_l']:.4f} (lower bound "
            f"{free_running['lower_bound']:.4f}, target {target}) at thresholds blended {free_running['alpha']} toward 1.0")
    return result


def _rouge_l_thresholds(ws: Workspace, cfg: ExitConfig, measure: str, thr: dict, shared: Optional[float],
                        calib: list, target: float, z: float, steps: int, log: Callable[[str], None]):
    """``(thresholds, single threshold, record)`` meeting a free-running ROUGE-L target (see
    :func:`calibrate_config`): the agreement-calibrated ``thr`` blended toward 1.0."""
    import dataclasses

    from cluster.llm import LLM
    from cluster.sampling import SamplingParams
    from cluster.training.calibrate import blend_thresholds, search_blend
    from cluster.training.quality import mean_lower_bound, rouge_l

    prompts = [list(s.prompt_ids) for s in calib]
    params = SamplingParams(max_tokens=ws.data.max_new_tokens, temperature=0.0)  # as the cached answers
    lossy = {"mode": None} if "mode" in {f.name for f in dataclasses.fields(ExitConfig)} else {}
    measured: dict[float, dict] = {}
    kv_bytes = kv_cache_bytes(ws.model_config, [len(p) + params.max_tokens for p in prompts])
    # references: the full model's answers from the same engine set-up (weights as served, e.g. int4 for
    # the default model: the cached training answers may come from another precision)
    full = LLM(ws.model_dir, early_exit=None, max_num_seqs=ws.data.max_num_seqs,
               max_num_batched_tokens=max(2048, ws.data.max_num_seqs * 16), kv_cache_memory_bytes=kv_bytes)
    try:
        refs = [o.token_ids for o in full.generate(prompts, params)]
    finally:
        full.shutdown()

    def score(alpha: float) -> float:
        t = blend_thresholds(thr, alpha)
        layers = tuple(sorted(t))
        ec = dataclasses.replace(cfg, exit_layers=layers, confidence=measure, layer_thresholds=tuple(t[l] for l in layers),
                                 threshold=max(t.values()), **lossy)
        llm = LLM(ws.model_dir, early_exit=ec, max_num_seqs=ws.data.max_num_seqs,
                  max_num_batched_tokens=max(2048, ws.data.max_num_seqs * 16), kv_cache_memory_bytes=kv_bytes)
        try:
            outs = llm.generate(prompts, params)
        finally:
            llm.shutdown()
        r = [rouge_l(o.token_ids, ref) for o, ref in zip(outs, refs)]
        layers_run = [l for o in outs for l in o.exit_layers]
        measured[alpha] = {"alpha": alpha, "rouge_l": float(sum(r) / max(1, len(r))),
                           "lower_bound": mean_lower_bound(r, z),
                           "mean_exit_layer": sum(layers_run) / max(1, len(layers_run))}
        log(f"calibrate: ROUGE-L search: thresholds blended {alpha:.4f} toward 1.0: ROUGE-L "
            f"{measured[alpha]['rouge_l']:.4f} (lower bound {measured[alpha]['lower_bound']:.4f}, target {target}), "
            f"mean exit layer {measured[alpha]['mean_exit_layer']:.2f}")
        return measured[alpha]["lower_bound"]

    record = {"target": target, "z": z, "prompts": len(prompts), "max_new_tokens": ws.data.max_new_tokens,
              "start": "agreement-calibrated thresholds", "start_thresholds": {str(l): v for l, v in thr.items()}}
    if not thr:  # no exit layer pays off even for agreement: the full model's answers, ROUGE-L 1
        return thr, shared, {**record, "alpha": 0.0, "rouge_l": 1.0, "lower_bound": 1.0, "history": []}
    res = search_blend(score, target, steps)
    record["history"] = [measured[a] for a, _ in res.history]
    if res.alpha is None:
        log(f"calibrate: ROUGE-L target {target} is missed even at thresholds 1.0: exits disabled")
        return {}, None, {**record, "alpha": None, "rouge_l": 1.0, "lower_bound": 1.0}
    out = blend_thresholds(thr, res.alpha)
    if shared is not None:
        shared = blend_thresholds({0: shared}, res.alpha)[0]
    return out, shared, {**record, "alpha": res.alpha, "rouge_l": measured[res.alpha]["rouge_l"],
                         "lower_bound": measured[res.alpha]["lower_bound"]}


def _keys(path: str) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())
