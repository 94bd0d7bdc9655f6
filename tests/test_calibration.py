"""Threshold calibration: the search meets its agreement target on its own split."""
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.timeout(240)


def _synthetic(n=4000, layers=(4, 8, 12), num_layers=16, seed=0):
    from cluster.training.evaluate import ExitPredictions

    rng = np.random.default_rng(seed)
    E = len(layers)
    skill = np.linspace(0.3, 0.8, E)
    conf = rng.random((n, E)).astype(np.float32)
    agree = rng.random((n, E)) < (skill[None, :] * 0.4 + conf * 0.6)  # confident -> more often right
    return ExitPredictions(tuple(layers), num_layers, agree, {"classifier": conf, "max_prob": conf},
                           np.zeros((n, E), np.float32), np.arange(n))


def _cost(num_layers=16):
    from cluster.training.calibrate import CostModel

    return CostModel(num_layers, layer=10.0, kv_fill=1.0, lm_head=30.0, adapter=0.5, classifier=0.1)


@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_search_meets_target_and_beats_single_threshold(target):
    from cluster.training.calibrate import choose_thresholds, policy_stats, single_threshold

    pred, cost = _synthetic(), _cost()
    thr = choose_thresholds(pred, "classifier", target, cost)
    stats = policy_stats(pred, "classifier", thr, cost)
    assert stats["agreement"] >= target
    assert stats["exit_fraction"] > 0
    shared = single_threshold(pred, "classifier", target)
    one = policy_stats(pred, "classifier", {l: shared for l in pred.layers}, cost)
    assert one["agreement"] >= target
    assert stats["compute_fraction"] <= one["compute_fraction"] + 1e-9


def test_policy_stats_follow_first_confident_exit():
    from cluster.training.calibrate import policy_stats
    from cluster.training.evaluate import ExitPredictions

    conf = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.1]], np.float32)
    agree = np.array([[False, True], [True, True], [True, True]])
    pred = ExitPredictions((2, 4), 6, agree, {"classifier": conf}, np.zeros_like(conf), np.arange(3))
    s = policy_stats(pred, "classifier", {2: 0.5, 4: 0.5})
    assert s["agreement"] == pytest.approx(2 / 3)  # row 0 exits at layer 2, which is wrong
    assert s["exit_fraction_per_layer"] == {2: pytest.approx(1 / 3), 4: pytest.approx(1 / 3)}
    assert s["mean_exit_layer"] == pytest.approx((2 + 4 + 6) / 3)
    assert policy_stats(pred, "classifier", {4: 0.5})["agreement"] == 1.0  # layer 2 disabled


def test_oracle_exits_at_first_agreeing_layer():
    from cluster.training.calibrate import CostModel, oracle_stats
    from cluster.training.evaluate import ExitPredictions

    agree = np.array([[False, True], [True, True], [False, False]])
    conf = np.zeros(agree.shape, np.float32)
    pred = ExitPredictions((2, 4), 6, agree, {"classifier": conf}, conf, np.arange(3))
    cost = CostModel(6, layer=1.0, kv_fill=0.0, lm_head=0.0, adapter=0.0, classifier=0.0)
    o = oracle_stats(pred, cost)
    assert o["exit_fraction"] == pytest.approx(2 / 3) and o["mean_exit_layer"] == pytest.approx((4 + 2 + 6) / 3)
    assert o["compute_fraction"] == pytest.approx((4 + 2 + 6) / 18) and o["speedup"] == pytest.approx(18 / 12)


@pytest.fixture(scope="module")
def tiny_heads(train_tiny_exits):
    from cluster.training.pipeline import DataSettings
    from cluster.training.train import TrainSettings

    data = DataSettings(max_new_tokens=16, num_calib=6, num_test=3, max_train=6, num_agreement_eval=1)
    settings = TrainSettings(rank=16, epochs=4, batch_size=16, lr=1e-2, classifier_epochs=4, negatives=512)
    model_dir, work, _ = train_tiny_exits("calibration", (2, 3, 4), data, settings, calibrate=False)
    return model_dir, work


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_calibrate_command_meets_target_on_its_split(tiny_heads, tmp_path, target):
    tiny_heads, work = tiny_heads
    import argparse

    from cluster.config import ModelConfig
    from cluster.llm import model_exit_config_path, read_exit_config
    from cluster.model.exits import ExitHeads
    from cluster.model.loader import build_model, load_hf_config
    from cluster.training.cli import add_calibrate_parser
    from cluster.training.pipeline import DataSettings, Workspace

    parser = argparse.ArgumentParser()
    add_calibrate_parser(parser.add_subparsers())
    summary = tmp_path / "calib.json"
    args = parser.parse_args(["calibrate", "--model", tiny_heads, "--target", str(target), "--quiet",
                              "--summary", str(summary), "--work-dir", work])
    assert args.func(args) == 0
    path = model_exit_config_path(tiny_heads)
    cfg = read_exit_config(path)
    with open(path) as f:
        written = json.load(f)
    assert written["calibration"]["target"] == target
    assert cfg.confidence == "classifier" and cfg.layer_thresholds is not None

    # independent re-check: teacher-forced along the calibration answers, apply the written policy
    ws = Workspace.open(tiny_heads, DataSettings(max_new_tokens=16, num_calib=6, num_test=3, max_train=6), work)
    seqs = ws.sequences(("calib",), progress=False)["calib"]
    mc = ModelConfig.from_hf_config(load_hf_config(tiny_heads))
    model = build_model(tiny_heads, mc)
    from cluster.training.features import extract_features

    feats = extract_features(model, seqs, cfg.exit_layers or (2,), progress=False)
    heads = ExitHeads(model, cfg) if cfg.exit_layers else None
    right = 0
    with torch.inference_mode():
        for i in range(feats.num_positions):
            token = int(feats.target[i])  # the final layer's token
            for layer in cfg.exit_layers:
                h = feats.hidden[layer][i:i + 1]
                ok, _ = heads.check(layer, h, torch.tensor([float("nan")]))  # NaN: calibrated default
                if ok.item():
                    token = int(heads.local_logits(layer, h).argmax(-1))
                    break
            right += token == int(feats.target[i])
    assert feats.num_positions > 0
    assert right / feats.num_positions >= target
    assert json.loads(summary.read_text())["calib"]["agreement"] == pytest.approx(right / feats.num_positions)
