"""Do the shipped exit thresholds still meet their agreement target with quantized weights?

Teacher-forced along the float32 full model's greedy answers to the exit heads' own calibration and
held-out test prompts (the splits recorded in the heads' metadata), for each quantization: the
hidden states come from the quantized model, the shipped trained heads and classifiers run on them,
and the calibrated per-layer thresholds decide the exits (:func:`cluster.training.calibrate.policy_stats`).
Agreement is measured against the quantized full model's own greedy token (what early exit must keep)
and against the float32 model's token. With ``--recalibrate`` the thresholds are also searched again
on the quantized calibration split.

    python -m bench.exits_quant --quantization none int8 int4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

import torch

from bench.common.exits import shipped_heads_workspace
from bench.common.results import print_table, save


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--recalibrate", action="store_true")
    ap.add_argument("--name", default="exits-quant")
    args = ap.parse_args(argv)

    from cluster.config import ExitConfig
    from cluster.engine.factory import model_exit_config_path
    from cluster.model.exits import ExitHeads
    from cluster.model.loader import build_model
    from cluster.training.calibrate import CostModel, choose_thresholds, policy_stats
    from cluster.training.evaluate import exit_predictions
    from cluster.training.features import cached_features
    from cluster.training.workspace import read_heads_metadata

    model_dir, cfg, ws = shipped_heads_workspace()
    meta = read_heads_metadata(cfg.heads_path)
    seqs = ws.sequences(("calib", "test"))
    thr = dict(zip(cfg.exit_layers, cfg.layer_thresholds or [cfg.threshold] * len(cfg.exit_layers)))
    target = float(json.load(open(model_exit_config_path(model_dir))).get("calibration", {}).get("target", 0.95))
    cost = CostModel.for_model(ws.model_config, rank=int(meta.get("rank", 128)),
                               classifier_width=int(meta.get("classifier_width", 64)))
    layers = tuple(sorted(int(k.split(".")[1]) for k in _keys(cfg.heads_path) if k.startswith("exits.")
                          and k.endswith("down.weight")))
    rows = []
    for q in args.quantization:
        model = build_model(model_dir, dataclasses.replace(ws.model_config, quantization=q))
        heads = ExitHeads(model, ExitConfig(exit_layers=layers, head="trained", heads_path=cfg.heads_path,
                                            confidence=cfg.confidence))
        pred = {}
        for split in ("calib", "test"):
            path = os.path.join(ws.work_dir, f"features-{split}-{q}.pt")
            key = {"split": split, "ids": [s.id for s in seqs[split]], "quantization": q}
            feats = cached_features(path, model, seqs[split], layers, key, desc=f"hidden states ({split}, {q})")
            own = dataclasses.replace(feats, target=feats.final_argmax)  # the quantized full model's token
            pred[split] = (exit_predictions(heads, own), exit_predictions(heads, feats))
        own_test, float_test = pred["test"]
        st_own = policy_stats(own_test, cfg.confidence, thr, cost)
        st_float = policy_stats(float_test, cfg.confidence, thr, cost)
        feats_test = torch.load(os.path.join(ws.work_dir, f"features-test-{q}.pt"), weights_only=False)
        full_vs_float = float((feats_test["final_argmax"] == feats_test["target"]).float().mean())
        row = {"quantization": q, "full_model_vs_float": round(full_vs_float, 4),
               "ee_agreement_own": round(st_own["agreement"], 4), "ee_agreement_float": round(st_float["agreement"], 4),
               "target": target, "meets_target": st_own["agreement"] >= target,
               "exit_fraction": round(st_own["exit_fraction"], 4), "mean_exit_layer": round(st_own["mean_exit_layer"], 2)}
        if args.recalibrate:
            calib_own = pred["calib"][0]
            n = max(1, calib_own.conf[cfg.confidence].shape[0])
            search = min(1.0, target + 2.326 * math.sqrt(target * (1 - target) / n))
            new = choose_thresholds(calib_own, cfg.confidence, search, cost)
            st_new = policy_stats(own_test, cfg.confidence, new, cost)
            row.update({"recalibrated_thresholds": {str(k): round(v, 4) for k, v in new.items()},
                        "recalibrated_agreement_own": round(st_new["agreement"], 4),
                        "recalibrated_mean_exit_layer": round(st_new["mean_exit_layer"], 2)})
        rows.append(row)
        print(row, flush=True)
    print_table(rows, ["quantization", "full_model_vs_float", "ee_agreement_own", "ee_agreement_float", "target",
                       "meets_target", "exit_fraction", "mean_exit_layer"])
    print(f"saved {save(args.name, {'args': vars(args), 'exit_layers': list(layers), 'thresholds': thr, 'rows': rows})}")


def _keys(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())


if __name__ == "__main__":
    main()
