"""Teacher-forced exit statistics of loaded exit heads (the inference code path, :class:`ExitHeads`).

Along the full model's greedy output, at every decode position and every exit layer: the exit's
full-vocabulary argmax, its ``max_prob`` and ``top2_margin`` confidence, the exit classifier's
probability, and whether the argmax equals the full model's token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from cluster.model.exits import ExitHeads, confidence_from_local_logits
from cluster.training.features import Features
from cluster.training.train import kl_div


@dataclass
class ExitPredictions:
    """``[N, E]`` arrays over ``N`` positions and the ``E`` exit layers ``layers``."""

    layers: tuple[int, ...]
    num_layers: int
    agree: np.ndarray  # bool: exit argmax == full model's token
    conf: dict[str, np.ndarray]  # measure -> float confidence
    kl: np.ndarray  # KL(final || exit)
    seq: np.ndarray  # [N] sequence index

    def agreement(self) -> dict[int, float]:
        return {l: float(self.agree[:, j].mean()) if len(self.agree) else 0.0 for j, l in enumerate(self.layers)}

    def mean_kl(self) -> dict[int, float]:
        return {l: float(self.kl[:, j].mean()) if len(self.kl) else 0.0 for j, l in enumerate(self.layers)}


@torch.inference_mode()
def exit_predictions(heads: ExitHeads, feats: Features, chunk: int = 512) -> ExitPredictions:
    """Run every exit head (and classifier, if loaded) on every position of ``feats``."""
    model = heads.model[0]
    dtype = next(model.parameters()).dtype
    layers = tuple(heads.cfg.exit_layers)
    N, E = feats.num_positions, len(layers)
    agree = np.zeros((N, E), dtype=bool)
    kl = np.zeros((N, E), dtype=np.float32)
    conf = {m: np.zeros((N, E), dtype=np.float32) for m in ("max_prob", "top2_margin")}
    if heads.classifiers:
        conf["classifier"] = np.zeros((N, E), dtype=np.float32)
    for i in range(0, N, chunk):
        sl = slice(i, min(N, i + chunk))
        teacher = model.final_local_logits(feats.final[sl].to(dtype))
        tgt = feats.target[sl]
        for j, l in enumerate(layers):
            h = feats.hidden[l][sl].to(dtype)
            local = heads.local_logits(l, h)
            agree[sl, j] = (local.argmax(-1) == tgt).numpy()
            kl[sl, j] = kl_div(teacher, local).numpy()
            for m in ("max_prob", "top2_margin"):
                conf[m][sl, j] = confidence_from_local_logits(local, m).numpy()
            if heads.classifiers:
                conf["classifier"][sl, j] = heads.classifiers[str(l)](h).float().numpy()
    return ExitPredictions(layers, model.config.num_layers, agree, conf, kl, feats.seq.numpy())


def eval_sequences_json(seqs) -> str:
    """The fixed evaluation set, stored in the heads' metadata: ``[[prompt_len, ids...], ...]``."""
    return json.dumps([[len(s.prompt_ids), *s.ids] for s in seqs], separators=(",", ":"))


def sequences_from_json(text: str):
    from cluster.training.data import Sequence

    rows = json.loads(text)
    return [Sequence(f"eval-{i}", tuple(r[1:1 + r[0]]), tuple(r[1 + r[0]:])) for i, r in enumerate(rows)]


def recorded_agreement(heads_path: str) -> tuple[dict[int, float], list]:
    """The per-layer agreement recorded at training time and its fixed evaluation sequences."""
    from safetensors import safe_open

    with safe_open(heads_path, framework="pt") as f:
        meta = f.metadata() or {}
    rec = {int(k): v for k, v in json.loads(meta["agreement"]).items()}
    return rec, sequences_from_json(meta["agreement_eval_sequences"])


def measure_agreement(model, heads_path: str, seqs, layers: Optional[tuple[int, ...]] = None) -> dict[int, float]:
    """Per-layer top-1 agreement of the heads in ``heads_path`` with the full model on ``seqs``."""
    from cluster.config import ExitConfig
    from cluster.training.features import extract_features

    if layers is None:
        layers = heads_layers(heads_path)
    heads = ExitHeads(model, ExitConfig(exit_layers=tuple(layers), head="trained", heads_path=heads_path))
    feats = extract_features(model, seqs, layers, topk=1, progress=False)
    return exit_predictions(heads, feats).agreement()


def heads_layers(heads_path: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(heads_path, framework="pt") as f:
        return tuple(sorted({int(k.split(".")[1]) for k in f.keys() if k.startswith("exits.")}))
