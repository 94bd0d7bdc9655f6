"""Exit configs of the benchmark variants: the model's own and its calibrated alternatives, one per
confidence measure, the lossless modes; the shipped heads' workspace; speculative statistics."""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from cluster import ExitConfig
from cluster.request import LOSSLESS_MODES

LOSSLESS = LOSSLESS_MODES  # ("verified", "self_speculative", "layer_skip")


def own_exit_config(model_dir: str, num_layers: int) -> tuple[ExitConfig, dict]:
    """The model's own exit config and the calibrated ``alternatives`` recorded in the same file
    (located once: finding shipped heads fingerprints the model's weights); without an
    exit_config.json, :meth:`ExitConfig.default_for` ``num_layers`` and no alternatives."""
    from cluster.engine.factory import model_exit_config_path, read_exit_config

    path = model_exit_config_path(model_dir)
    if path is None:
        return ExitConfig.default_for(num_layers), {}
    with open(path) as f:
        alternatives = json.load(f).get("calibration", {}).get("alternatives", {})
    return read_exit_config(path), alternatives


def measure_configs(ec: ExitConfig, alternatives: dict) -> dict[str, ExitConfig]:
    """One exit config per confidence measure at its calibrated thresholds.

    The model's own config gives its measure; ``calibration.alternatives`` in its exit_config.json
    (written by ``eeserve calibrate``) gives the others. Without them: the config's threshold.
    """
    out = {ec.confidence: ec}
    for m, a in alternatives.items():
        if a.get("exit_layers"):
            out[m] = dataclasses.replace(ec, confidence=m, exit_layers=tuple(a["exit_layers"]),
                                         layer_thresholds=tuple(a["layer_thresholds"]),
                                         threshold=float(a["layer_thresholds"][0]))
    if ec.head == "shared":
        for m in ("max_prob", "top2_margin"):
            out.setdefault(m, dataclasses.replace(ec, confidence=m))
    return out


def mode_configs(configs: dict[str, ExitConfig], modes: list[str], notes: list[str]) -> dict[str, ExitConfig]:
    """``ee-<measure>-<mode>`` -> ``replace(config, mode=mode)`` (none, with a note appended to
    ``notes``, where ExitConfig has no ``mode`` field or a measure's config cannot take the mode)."""
    if not modes:
        return {}
    if "mode" not in {f.name for f in dataclasses.fields(ExitConfig)}:
        notes.append(f"--modes {modes} skipped: ExitConfig has no 'mode' field")
        return {}
    out = {}
    for m, c in configs.items():
        for mode in modes:
            try:
                out[f"ee-{m}-{mode}"] = dataclasses.replace(c, mode=mode)
            except ValueError as e:
                notes.append(f"ee-{m}-{mode} skipped: {e}")
    return out


def speculative_stats(outs, cfg: Optional[ExitConfig]) -> dict:
    """``acceptance_rate`` (accepted / drafted tokens) and ``tokens_per_verify`` (generated tokens per
    verification pass) of a lossless mode's outputs; None where the outputs do not carry the counts;
    ``{}`` for any other config."""
    if getattr(cfg, "mode", None) not in LOSSLESS:
        return {}
    counts = [(getattr(o, "num_draft_tokens", None), getattr(o, "num_accepted_tokens", None),
               getattr(o, "num_verify_steps", None)) for o in outs]
    if not counts or any(v is None for c in counts for v in c):
        return {"acceptance_rate": None, "tokens_per_verify": None}
    drafts, accepted, verifies = (sum(c[i] for c in counts) for i in range(3))
    toks = sum(len(o.token_ids) for o in outs)
    return {"acceptance_rate": round(accepted / drafts, 4) if drafts else None,
            "tokens_per_verify": round(toks / verifies, 3) if verifies else None}


def cfg_json(c: ExitConfig) -> dict:
    """An exit config as a JSON-ready dict (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(c).items()}


def shipped_heads_workspace():
    """The default model's shipped exit config and the exit-training workspace of its heads' data
    splits (the ones recorded in the heads file): ``(model_dir, exit_config, workspace)``."""
    from cluster.engine.factory import model_exit_config_path, read_exit_config
    from cluster.model.loader import resolve_model_dir
    from cluster.training.workspace import DataSettings, Workspace, read_heads_metadata

    model_dir = resolve_model_dir(None)
    cfg = read_exit_config(model_exit_config_path(model_dir))
    sp = json.loads(read_heads_metadata(cfg.heads_path).get("splits", "{}"))
    return model_dir, cfg, Workspace.open(None, DataSettings.from_splits_meta(sp))
