"""Self-distillation of exit heads and exit classifiers (EE-LLM, Kangaroo, CALM).

Head at exit layer ``l``: ``h -> h + up(down(norm(h)))`` (:class:`TrainedExitHead`, ``up`` starts at
zero so training starts from the shared head), then the frozen final norm and tied LM head. Loss:
``KL(p_final || p_exit)`` of the token distributions, the teacher being the model's own last layer.

Cost: every step needs the LM head forward and backward for the student. On a small CPU the full
49k-row vocabulary dominates, so by default the softmax runs over a *candidate vocabulary*: every
token that is the generated token or in the teacher's top-k anywhere in the training data, plus
``negatives`` tokens drawn uniformly from the rest at every step (sampled softmax; their logits get
``+log(rest / negatives)`` on both sides so that they stand for the whole rest). ``full_vocab=True``
trains on the exact full-vocabulary KL.

Exit classifier at layer ``l`` (:class:`ExitClassifier`): trained with binary cross-entropy to
predict, from the exit hidden state alone, whether the trained head's argmax equals the full
model's greedy token.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cluster.model.exits import ExitClassifier, TrainedExitHead
from cluster.model.llama import LlamaForCausalLM
from cluster.training.features import Features


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 128
    epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    full_vocab: bool = False
    negatives: int = 2048
    classifier_width: int = 64
    classifier_epochs: int = 8
    classifier_lr: float = 3e-3
    val_positions: int = 1024  # calibration positions sampled for the before/after statistics
    candidate_topk: int = 8  # teacher top-k tokens per position that enter the candidate vocabulary
    classifier_fraction: float = 0.25  # share of training sequences held out from heads for the classifier
    init: str = "regression"  # "regression": least-squares (reduced-rank) fit of the last layer; "zero": shared head
    seed: int = 0

    def key(self) -> dict:
        return asdict(self)


def candidate_vocab(feats: Features, vocab_size: int, topk: int = 8) -> torch.Tensor:
    """Sorted token ids: generated next tokens and the teacher's top-k over the training data."""
    ids = torch.cat([feats.target, feats.topk[:, :topk].flatten()]).unique()
    return ids[(ids >= 0) & (ids < vocab_size)]


class _LMHeadSlice:
    """The frozen final norm + tied LM head restricted to ``vocab`` plus sampled negatives."""

    def __init__(self, model: LlamaForCausalLM, vocab: Optional[torch.Tensor], negatives: int, gen: torch.Generator):
        self.norm = model.model.norm
        W = model.lm_head.weight.detach()[: model.config.vocab_size].float()
        self.W = W
        self.gen = gen
        if vocab is None:
            self.W_vocab, self.rest, self.negatives = W, None, 0
        else:
            mask = torch.ones(W.shape[0], dtype=torch.bool)
            mask[vocab] = False
            self.W_vocab = W[vocab]
            self.rest = mask.nonzero().squeeze(1)
            self.negatives = min(negatives, self.rest.numel())

    def sample(self) -> tuple[Optional[torch.Tensor], float]:
        if not self.negatives:
            return None, 0.0
        pick = torch.randperm(self.rest.numel(), generator=self.gen)[: self.negatives]
        return self.W[self.rest[pick]], math.log(self.rest.numel() / self.negatives)

    def logits(self, h: torch.Tensor, neg: Optional[torch.Tensor], corr: float) -> torch.Tensor:
        x = self.norm(h)
        z = F.linear(x, self.W_vocab)
        if neg is not None:
            z = torch.cat([z, F.linear(x, neg) + corr], dim=-1)
        return z


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(teacher) || softmax(student))``."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


@torch.no_grad()
def full_vocab_stats(model: LlamaForCausalLM, head: Optional[TrainedExitHead], h: torch.Tensor, final: torch.Tensor,
                     target: torch.Tensor, chunk: int = 512) -> dict:
    """Exact full-vocabulary mean KL to the last layer and top-1 agreement with ``target``."""
    kl, agree = 0.0, 0
    for i in range(0, h.shape[0], chunk):
        x = h[i:i + chunk]
        x = head(x) if head is not None else x
        s = model.final_local_logits(x)
        t = model.final_local_logits(final[i:i + chunk])
        kl += float(kl_div(t, s).sum())
        agree += int((s.argmax(-1) == target[i:i + chunk]).sum())
    n = max(1, h.shape[0])
    return {"kl": kl / n, "agreement": agree / n}


@torch.no_grad()
def regression_init(head: TrainedExitHead, h: torch.Tensor, final: torch.Tensor, ridge: float = 1e-3) -> None:
    """Start the adapter at the reduced-rank least-squares map from ``norm(h)`` to the last layer.

    Target: ``final`` rescaled to ``h``'s norm, minus ``h`` (the final norm removes the scale, so only
    the direction matters). Ridge regression ``B``, then the rank-``r`` projection onto the top right
    singular vectors ``V`` of the fitted values: ``down = (B V)^T``, ``up = V``.
    """
    x = head.norm(h).double()
    y = (final * (h.norm(dim=-1, keepdim=True) / final.norm(dim=-1, keepdim=True).clamp_min(1e-6)) - h).double()
    xtx = x.T @ x
    B = torch.linalg.solve(xtx + ridge * xtx.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    V = torch.linalg.svd(x @ B, full_matrices=False).Vh[: head.down.out_features].T  # [hidden, r]
    r = V.shape[1]  # rank may exceed what the data or the width supports: the rest starts at zero
    head.down.weight.zero_()[:r].copy_((B @ V).T.float())
    head.up.weight.zero_()[:, :r].copy_(V.float())


def _cosine_lr(step: int, total: int, base: float, warmup: float = 0.05) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return base * (step + 1) / w
    return base * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def train_head(model: LlamaForCausalLM, h: torch.Tensor, final: torch.Tensor, vocab: Optional[torch.Tensor],
               settings: TrainSettings, seed: int, progress: bool = True, desc: str = "head") -> tuple[TrainedExitHead, list]:
    """Train one exit head on ``h: [N, hidden]`` against the last layer's ``final: [N, hidden]``.

    Returns the head (float32) and the mean training loss of each epoch.
    """
    mc = model.config
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = TrainedExitHead(mc.hidden_size, settings.rank, mc.rms_norm_eps).float()
    torch.nn.init.zeros_(head.up.weight)
    if settings.init == "regression":
        regression_init(head, h, final)
    for p in head.parameters():
        p.requires_grad_(True)
    lm = _LMHeadSlice(model, vocab, settings.negatives, gen)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.99))
    N, bs = h.shape[0], settings.batch_size
    steps_per_epoch = max(1, -(-N // bs))
    total, step, losses = settings.epochs * steps_per_epoch, 0, []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    for _ in range(settings.epochs):
        order = torch.randperm(N, generator=gen)
        run, cnt = 0.0, 0
        for i in range(0, N, bs):
            idx = order[i:i + bs]
            neg, corr = lm.sample()
            with torch.no_grad():
                t = lm.logits(final[idx], neg, corr)
            loss = kl_div(t, lm.logits(head(h[idx]), neg, corr)).mean()
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(step, total, settings.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run, cnt, step = run + float(loss.detach()) * idx.numel(), cnt + idx.numel(), step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{run / cnt:.3f}")
        losses.append(run / max(1, cnt))
    bar.close()
    for p in head.parameters():
        p.requires_grad_(False)
    return head.eval(), losses


@torch.no_grad()
def head_agrees(model: LlamaForCausalLM, head: TrainedExitHead, h: torch.Tensor, target: torch.Tensor,
                vocab: Optional[torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """``[N]`` bool: the head's argmax (over ``vocab``, or the full vocabulary) equals ``target``."""
    W = model.lm_head.weight[: model.config.vocab_size]
    Wv = W if vocab is None else W[vocab]
    out = []
    for i in range(0, h.shape[0], chunk):
        z = F.linear(model.model.norm(head(h[i:i + chunk]).to(W.dtype)), Wv)
        top = z.argmax(-1)
        out.append((top if vocab is None else vocab[top]) == target[i:i + chunk])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def train_classifier(h: torch.Tensor, labels: torch.Tensor, hidden_size: int, eps: float, settings: TrainSettings,
                     seed: int, progress: bool = True, desc: str = "classifier") -> tuple[ExitClassifier, dict]:
    """Exit classifier ``h -> P(exit argmax == final token)`` (binary cross-entropy)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = ExitClassifier(hidden_size, settings.classifier_width, eps).float()
    for p in clf.parameters():
        p.requires_grad_(True)
    y = labels.float()
    opt = torch.optim.AdamW(clf.parameters(), lr=settings.classifier_lr, weight_decay=1e-4)
    N, bs = h.shape[0], 512
    total = settings.classifier_epochs * max(1, -(-N // bs))
    step = 0
    for _ in tqdm(range(settings.classifier_epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(N, generator=gen)
        for i in range(0, N, bs):
            idx = order[i:i + bs]
            loss = F.binary_cross_entropy_with_logits(clf.logit(h[idx]), y[idx])
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(step, total, settings.classifier_lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    for p in clf.parameters():
        p.requires_grad_(False)
    clf.eval()
    with torch.no_grad():
        p = clf(h)
        bce = float(F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y)) if N else 0.0
    return clf, {"positive_rate": float(y.mean()) if N else 0.0, "train_bce": bce, "train_auc": auc(p, labels)}


def auc(score: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (rank statistic); 0.5 when one class is missing."""
    labels = labels.bool()
    npos, nneg = int(labels.sum()), int((~labels).sum())
    if not npos or not nneg:
        return 0.5
    ranks = torch.empty(score.shape[0], dtype=torch.float64)
    ranks[score.argsort()] = torch.arange(1, score.shape[0] + 1, dtype=torch.float64)
    return float((ranks[labels].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def classifier_positions(feats: Features, fraction: float) -> torch.Tensor:
    """``[N]`` bool: positions of every ``round(1 / fraction)``-th sequence (held out from head training)."""
    if fraction <= 0:
        return torch.zeros(feats.num_positions, dtype=torch.bool)
    every = max(2, round(1 / fraction))
    return feats.seq % every == every - 1


def train_exit_layer(model: LlamaForCausalLM, feats: Features, layer: int, vocab: Optional[torch.Tensor],
                     settings: TrainSettings, ckpt_path: Optional[str], val: Optional[Features] = None,
                     progress: bool = True) -> dict:
    """Head + classifier for one exit layer, checkpointed at ``ckpt_path`` (reused when it matches).

    Returns ``{"head": state_dict, "classifier": state_dict, "stats": {...}}`` (float32 tensors).
    """
    key = {"settings": settings.key(), "layer": layer, "positions": feats.num_positions,
           "data": feats.meta.get("key")}
    if ckpt_path and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=True)
        if ck.get("key") == key:
            return ck
    mc = model.config
    seed = settings.seed * 1000 + layer
    # the classifier learns from positions the head never saw: on its own training positions a head
    # agrees far more often than on new text, which would teach the classifier the wrong odds
    held = classifier_positions(feats, settings.classifier_fraction)
    h, final = feats.hidden[layer][~held], feats.final[~held]
    stats: dict = {"train_positions": int(h.shape[0]), "classifier_positions": int(held.sum())}
    if val is not None and val.num_positions:  # a fixed sample keeps the full-vocabulary passes cheap
        pick = torch.randperm(val.num_positions, generator=torch.Generator().manual_seed(0))[:settings.val_positions]
        vh, vf, vt = val.hidden[layer][pick], val.final[pick], val.target[pick]
        stats["val_before"] = full_vocab_stats(model, None, vh, vf, vt)
    head, losses = train_head(model, h, final, None if settings.full_vocab else vocab, settings, seed,
                              progress, desc=f"head {layer}")
    stats["train_loss"] = losses
    if not held.any():  # no held-out sequences: fall back to the head's own training positions
        held = ~held
    hc = feats.hidden[layer][held]
    labels = head_agrees(model, head, hc, feats.target[held], None)  # exact: full-vocabulary argmax
    clf, cstats = train_classifier(hc, labels, mc.hidden_size, mc.rms_norm_eps, settings, seed, progress,
                                   desc=f"classifier {layer}")
    stats["classifier"] = cstats
    if val is not None and val.num_positions:
        stats["val_after"] = full_vocab_stats(model, head, vh, vf, vt)
        stats["classifier"]["val_auc"] = auc(clf(vh), head_agrees(model, head, vh, vt, None))
    ck = {"key": key, "head": head.state_dict(), "classifier": clf.state_dict(), "stats": stats}
    if ckpt_path:
        os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
        torch.save(ck, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
    return ck
