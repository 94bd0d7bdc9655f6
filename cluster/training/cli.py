"""``eeserve train-exits``, ``eeserve calibrate`` and ``eeserve calibrate-skip`` (argparse; also
``python -m cluster.training.cli``).

Examples::

    # heads for the default model, shipped in the package
    python -m cluster.training.cli train-exits --output cluster/assets --name smollm2-135m-instruct.
    # heads for a model directory (written next to the weights, picked up as its exit config)
    eeserve train-exits --model /path/to/model
    eeserve calibrate --model /path/to/model --target 0.95
    # layer_skip's skip set for the default model (int4), written into its shipped exit config
    eeserve calibrate-skip --trials 120
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts, got {text!r}")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="safetensors model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--target", type=float, default=0.95,
                   help="share of tokens whose early-exit greedy token must equal the full model's (default 0.95)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_train_exits_parser(subparsers) -> argparse.ArgumentParser:
    """``train-exits``: self-distil exit heads + exit classifiers, write them and calibrate."""
    from cluster.training.workspace import DataSettings
    from cluster.training.train import TrainSettings

    d, t = DataSettings(), TrainSettings()
    p = subparsers.add_parser("train-exits", help="train exit heads for a model by self-distillation",
                              description="Generate the model's own greedy answers to the prompt sets, train one "
                                          "exit head (norm + low-rank adapter before the tied LM head, KL to the last "
                                          "layer) and one exit classifier per exit layer, write "
                                          "<name>exit_heads.safetensors and <name>exit_config.json, then calibrate "
                                          "the thresholds. Resumable: generations, hidden states and per-head "
                                          "checkpoints are cached.")
    _add_common(p)
    p.add_argument("--output", default=None, help="output directory (default: the model directory)")
    p.add_argument("--name", default="", help="file name prefix, e.g. 'smollm2-135m-instruct.'")
    p.add_argument("--exit-layers", type=_layers, default=None, help="e.g. 6,9,12 (default: every tenth of the depth from 1/5 to 4/5)")
    p.add_argument("--prompts-dir", default=None, help="prompt sets (default: ../shared/data/prompts)")
    p.add_argument("--work-dir", default=None, help="cache directory (default: $EESERVE_CACHE_DIR/exit-training/<model>)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--num-calib", type=int, default=d.num_calib, help="calibration prompts")
    p.add_argument("--num-test", type=int, default=d.num_test, help="held-out test prompts")
    p.add_argument("--max-train", type=int, default=d.max_train, help="training prompts (0: all the rest)")
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="generation batch size")
    p.add_argument("--rank", type=int, default=t.rank, help="adapter rank")
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--full-vocab", action="store_true", help="exact full-vocabulary KL (slower)")
    p.add_argument("--negatives", type=int, default=t.negatives, help="sampled negative tokens per step")
    p.add_argument("--classifier-width", type=int, default=t.classifier_width)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--draft-vocab-size", type=int, default=8192,
                   help="FR-Spec draft vocabulary: store the N ids most frequent in the model's own training answers "
                        "(plus EOS) in the heads file, for reduced-vocabulary exit/draft LM heads (0: none; default 8192)")
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--summary", default=None, help="also write the run summary as JSON here")
    p.set_defaults(func=run_train_exits)
    return p


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """``calibrate``: choose (per-layer) thresholds meeting a token-agreement target."""
    p = subparsers.add_parser("calibrate", help="calibrate early-exit thresholds to a token-agreement target",
                              description="Teacher-forced along the full model's greedy answers to the calibration "
                                          "prompts (disjoint from training), choose per-exit-layer thresholds so that "
                                          "the early-exit token equals the full model's on at least --target of the "
                                          "tokens with the least compute, and write them into the exit config.")
    _add_common(p)
    p.add_argument("--config", default=None, help="exit_config.json to update (default: the model's own)")
    p.add_argument("--measure", choices=["classifier", "max_prob", "top2_margin"], default=None,
                   help="confidence measure (default: classifier when the heads have one)")
    p.add_argument("--single-threshold", action="store_true", help="one threshold for all exit layers")
    p.add_argument("--z", type=float, default=2.326,
                   help="search for target + z * binomial standard error on the calibration split, so the target "
                        "holds on unseen prompts (default 2.326, one-sided 99%%; 0: the bare target)")
    p.add_argument("--work-dir", default=None, help="cache directory of train-exits (default: $EESERVE_CACHE_DIR/exit-training/<model>)")
    p.add_argument("--metric", choices=["agreement", "rouge_l"], default="agreement",
                   help="agreement (default): teacher-forced token agreement >= --target; rouge_l: free-running "
                        "ROUGE-L of the early-exit answers against the full model's answers on the calibration "
                        "prompts >= --target (CALM's textual consistency; its lower bound with --z standard errors), "
                        "by raising the agreement-calibrated thresholds toward 1.0 (generates once per search step)")
    p.add_argument("--search-steps", type=int, default=4,
                   help="--metric rouge_l: bisection steps of the threshold raise (default 4; 2 + steps generations)")
    p.add_argument("--summary", default=None, help="also write the calibration result as JSON here")
    p.set_defaults(func=run_calibrate)
    return p


def add_calibrate_skip_parser(subparsers) -> argparse.ArgumentParser:
    """``calibrate-skip``: search layer_skip's skip set (SWIFT) and write it into the exit config."""
    from cluster.training.workspace import DataSettings

    d = DataSettings()
    p = subparsers.add_parser("calibrate-skip", help="search the layer_skip skip set (SWIFT) on the calibration prompts",
                              description="Score skip sets (decoder layers left out of layer_skip's drafts; the first "
                                          "and last layers are kept) by their modelled speedup at batch 1: teacher-"
                                          "forced draft acceptance against the full model's greedy answers to the "
                                          "calibration prompts, k drafts per verification, and the engine's draft "
                                          "cost. Single-layer skips, a greedy ordering, then optuna TPE (seeded, "
                                          "--trials sets in all). The winner is run in the engine to confirm its "
                                          "acceptance and written into the exit config as skip_layers with a "
                                          "skip_calibration record (SWIFT, arXiv 2410.06916).")
    p.add_argument("--model", default=None, help="safetensors model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--config", default=None, help="exit_config.json to update (default: the model's own, else "
                                                  "<model dir>/exit_config.json)")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weights as the engine serves them (auto: int4 for the default Q4 GGUF on the CPU)")
    p.add_argument("--trials", type=int, default=120, help="skip sets scored at most (default 120)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--num-prompts", type=int, default=16, help="calibration prompts scored (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="continuation tokens scored per prompt (default 128)")
    p.add_argument("--confirm-prompts", type=int, default=4,
                   help="calibration prompts the engine generates with the winner to measure its acceptance (0: none)")
    p.add_argument("--num-calib", type=int, default=d.num_calib,
                   help="calibration split size when the exit config has no trained heads naming their splits")
    p.add_argument("--num-test", type=int, default=d.num_test, help="held-out split size (never scored), as --num-calib")
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument("--work-dir", default=None, help="answer cache (default: $EESERVE_CACHE_DIR/exit-training/<model>)")
    p.add_argument("--no-write", action="store_true", help="only print the result")
    p.add_argument("--summary", default=None, help="also write the result as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_calibrate_skip)
    return p


def _setup(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write_summary(path: Optional[str], summary: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2, default=str)


def run_train_exits(args) -> int:
    from cluster.training.pipeline import DataSettings, train_exits
    from cluster.training.train import TrainSettings

    _setup(args)
    data = DataSettings(prompts_dir=args.prompts_dir, max_new_tokens=args.max_new_tokens, num_calib=args.num_calib,
                        num_test=args.num_test, max_train=args.max_train, split_seed=args.split_seed,
                        max_num_seqs=args.max_num_seqs)
    settings = TrainSettings(rank=args.rank, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             full_vocab=args.full_vocab, negatives=args.negatives,
                             classifier_width=args.classifier_width, seed=args.seed)
    summary = train_exits(args.model, args.output, args.name, args.exit_layers, data, settings, args.work_dir,
                          calibrate=not args.no_calibrate, target=args.target, progress=not args.quiet, log=_log,
                          draft_vocab_size=args.draft_vocab_size)
    _write_summary(args.summary, summary)
    return 0


def run_calibrate(args) -> int:
    from cluster.engine.factory import model_exit_config_path
    from cluster.model.loader import resolve_model_dir
    from cluster.training.calibration import calibrate_config

    _setup(args)
    config = args.config or model_exit_config_path(resolve_model_dir(args.model))
    if config is None:
        raise SystemExit("calibrate: the model has no exit config with trained heads; run train-exits first "
                         "or pass --config")
    result = calibrate_config(config, model=args.model, target=args.target, measure=args.measure, z=args.z,
                              per_layer=not args.single_threshold, work_dir=args.work_dir,
                              progress=not args.quiet, log=_log, metric=args.metric, search_steps=args.search_steps)
    _write_summary(args.summary, result)
    return 0


def run_calibrate_skip(args) -> int:
    from cluster.training.skip_calibration import calibrate_skip
    from cluster.training.workspace import DataSettings

    _setup(args)
    data = DataSettings(num_calib=args.num_calib, num_test=args.num_test, split_seed=args.split_seed,
                        max_new_tokens=args.max_new_tokens)
    rec = calibrate_skip(args.model, args.config, args.quantization, trials=args.trials, seed=args.seed,
                         num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens, data=data,
                         work_dir=args.work_dir, confirm_prompts=args.confirm_prompts, write=not args.no_write,
                         progress=not args.quiet, log=_log)
    _log(format_skip_table(rec))
    _write_summary(args.summary, rec)
    return 0


def format_skip_table(rec: dict) -> str:
    """The calibrate-skip result as a text table: the winner, the best set per size, the engine check."""
    rows = [("winner", rec["top"][0])] + [(f"|S|={n}", c) for n, c in rec["by_size"].items() if c]
    if rec.get("default_rule"):
        rows.append(("default rule", rec["default_rule"]))
    lines = [f"{'':>13} {'acceptance':>10} {'draft cost':>10} {'skip ratio':>10} {'tok/verif':>9} {'speedup':>8}  skip set"]
    for name, c in rows:
        lines.append(f"{name:>13} {c['acceptance']:>10.3f} {c['draft_cost']:>10.3f} {c['skip_ratio']:>10.3f} "
                     f"{c['tokens_per_verification']:>9.3f} {c['speedup']:>7.3f}x  {c['skip']}")
    e = rec.get("engine")
    if e and e.get("accepted_per_draft") is not None:
        lines.append(f"engine (k={rec['num_draft_tokens']}, batch 1, {e['prompts']} prompts): accepted/drafted "
                     f"{e['accepted_per_draft']:.3f} (estimate predicts {e['predicted_accepted_per_draft']:.3f}), "
                     f"tokens/verification {e['tokens_per_verification']:.3f} (predicted "
                     f"{e['predicted_tokens_per_verification']:.3f}), implied per-draft acceptance "
                     f"{e['implied_acceptance']:.3f} vs estimate {rec['skip_acceptance']:.3f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.training.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_exits_parser(sub)
    add_calibrate_parser(sub)
    add_calibrate_skip_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
