"""Quality against the full model: free-running agreement, teacher-forced exit statistics, NLL under
the full model and text-quality columns (:mod:`cluster.training.quality`)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from cluster import ExitConfig
from cluster.training.quality import answers_nll, quality_report


def free_agreement(a: list[list[int]], ref: list[list[int]]) -> float:
    """Share of ``ref``'s token positions where ``a`` holds the same token (position by position)."""
    same = total = 0
    for x, y in zip(a, ref):
        total += len(y)
        same += sum(int(p == q) for p, q in zip(x, y))
    return same / max(1, total)


class NLLCache:
    """Mean NLL per token of answers under the full model (transformers), memoised per (prompt, answer)."""

    def __init__(self, hf_model):
        self.model, self.memo = hf_model, {}

    def __call__(self, prompts, answers) -> list[float]:
        keys = [(tuple(p), tuple(a)) for p, a in zip(prompts, answers)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        for k, v in zip(todo, answers_nll(self.model, [k[0] for k in todo], [k[1] for k in todo])):
            self.memo[k] = v
        return [self.memo[k] for k in keys]


def quality_columns(outs, ref, prompts, nll: Optional[NLLCache]) -> dict:
    """``exact_match``, ``rouge_l``, ``prefix_fraction`` of the answers ``outs`` against ``ref`` (and
    ``nll_full`` when ``nll`` is given), rounded to 4 places."""
    q = quality_report(outs, ref, nll=nll(prompts, outs) if nll is not None else None)
    row = {"exact_match": round(q["exact_match_rate"], 4), "rouge_l": round(q["rouge_l"], 4),
           "prefix_fraction": round(q["prefix_fraction"], 4)}
    if "nll" in q:
        row["nll_full"] = round(q["nll"], 4)
    return row


class TeacherForced:
    """Teacher-forced exit statistics along the full model's outputs (cluster.training.evaluate)."""

    def __init__(self, model, ec: ExitConfig, prompt_ids, full_outputs):
        from cluster.model.exits import ExitHeads
        from cluster.training.data import Sequence
        from cluster.training.evaluate import exit_predictions, heads_layers
        from cluster.training.features import extract_features

        layers = heads_layers(ec.heads_path) if ec.head == "trained" else ec.exit_layers
        has_clf = ec.confidence == "classifier"
        probe = dataclasses.replace(ec, exit_layers=tuple(layers), layer_thresholds=None,
                                    confidence="classifier" if has_clf else "max_prob")
        seqs = [Sequence(str(i), tuple(p), tuple(o)) for i, (p, o) in enumerate(zip(prompt_ids, full_outputs))]
        with torch.inference_mode():
            feats = extract_features(model, seqs, layers, progress=False)
            self.pred = exit_predictions(ExitHeads(model, probe), feats)

    def stats(self, ec: ExitConfig, threshold: Optional[float] = None) -> dict:
        """:func:`cluster.training.calibrate.policy_stats` at ``ec``'s thresholds (or one ``threshold``
        at every exit layer)."""
        from cluster.training.calibrate import policy_stats

        thr = {l: (threshold if threshold is not None else ec.threshold_for(l)) for l in ec.exit_layers}
        return policy_stats(self.pred, ec.confidence, thr)


@torch.inference_mode()
def teacher_forced(model, prompts: list[list[int]], answers: list[list[int]]) -> dict:
    """Greedy agreement (``agreement_tf``, share of answer positions where ``model``'s argmax is the
    reference's token) and mean NLL per token (``nll``, nats) of ``answers`` under ``model``'s full depth."""
    from cluster.training.features import full_sequence_hidden

    L = model.config.num_layers
    same = total = 0
    nll = 0.0
    for p, a in zip(prompts, answers):
        ids = list(p) + list(a)
        rows = torch.arange(len(p) - 1, len(ids) - 1)  # positions predicting each answer token
        h = full_sequence_hidden(model, [ids], [rows], [L])[L]
        logits = model.lm_head.full_logits(model.final_local_logits(h.to(next(model.parameters()).dtype))).float()
        target = torch.tensor(a)
        same += int((logits.argmax(-1) == target).sum())
        nll += float(-torch.log_softmax(logits, -1).gather(1, target[:, None]).sum())
        total += len(a)
    return {"agreement_tf": same / total, "nll": nll / total}
