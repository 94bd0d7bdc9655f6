"""Exit-head self-distillation (tiny model), the classifier confidence path, and the shipped heads."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from cluster.config import ExitConfig

pytestmark = pytest.mark.timeout(240)

LAYERS = (2, 4)


@pytest.fixture(scope="module")
def trained(train_tiny_exits):
    """Heads + classifiers trained on the tiny model (written into its directory), and the summary."""
    from cluster.training.pipeline import DataSettings
    from cluster.training.train import TrainSettings

    data = DataSettings(max_new_tokens=16, num_calib=4, num_test=4, max_train=8, num_agreement_eval=2)
    settings = TrainSettings(rank=16, epochs=6, batch_size=16, lr=1e-2, classifier_epochs=4, negatives=512)
    model_dir, work, summary = train_tiny_exits("exit-training", LAYERS, data, settings)
    return model_dir, work, data, settings, summary


def test_training_lowers_exit_loss(trained):
    """Exact full-vocabulary KL to the last layer on the heads' training positions, before and after."""
    import glob

    from cluster.config import ModelConfig
    from cluster.model.exits import TrainedExitHead
    from cluster.model.loader import build_model, load_hf_config
    from cluster.training.features import Features
    from cluster.training.train import classifier_positions, full_vocab_stats

    model_dir, work, _, settings, summary = trained
    mc = ModelConfig.from_hf_config(load_hf_config(model_dir))
    model = build_model(model_dir, mc)
    feats = Features.load(glob.glob(os.path.join(work, "*", "features-train.pt"))[0])
    mine = ~classifier_positions(feats, settings.classifier_fraction)
    with safe_open(summary["heads_path"], framework="pt") as f:
        for layer in LAYERS:
            head = TrainedExitHead(mc.hidden_size, settings.rank, mc.rms_norm_eps)
            head.load_state_dict({k: f.get_tensor(f"exits.{layer}.{k}").float() for k in head.state_dict()})
            h, final, target = feats.hidden[layer][mine], feats.final[mine], feats.target[mine]
            before = full_vocab_stats(model, None, h, final, target)
            after = full_vocab_stats(model, head, h, final, target)
            assert after["kl"] < 0.9 * before["kl"], (layer, before, after)
            loss = summary["loss"][str(layer)]["train_kl_per_epoch"]
            assert loss[-1] < loss[0], (layer, loss)


def test_heads_file_and_exit_config(trained):
    from cluster.llm import model_exit_config, model_fingerprint

    model_dir, _, _, _, summary = trained
    with safe_open(summary["heads_path"], framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert f.get_tensor(f"exits.{LAYERS[0]}.down.weight").dtype == torch.bfloat16
    for layer in LAYERS:
        assert {f"exits.{layer}.{k}" for k in ("norm.weight", "down.weight", "up.weight")} <= keys
        assert f"exit_classifiers.{layer}.fc1.weight" in keys
    assert meta["base_model_fingerprint"] == model_fingerprint(model_dir)
    assert json.loads(meta["exit_layers"]) == list(LAYERS)
    assert set(json.loads(meta["agreement"])) == {str(l) for l in LAYERS}
    assert json.loads(meta["training"])["train_positions"] > 0
    cfg = model_exit_config(model_dir, 6)  # picked up from the model directory
    assert cfg.head == "trained" and cfg.confidence == "classifier"
    assert os.path.samefile(cfg.heads_path, summary["heads_path"])
    assert cfg.layer_thresholds is not None and len(cfg.layer_thresholds) == len(cfg.exit_layers)


def test_resume_reuses_checkpoints(trained):
    from cluster.training.pipeline import train_exits

    model_dir, work, data, settings, summary = trained
    with safe_open(summary["heads_path"], framework="pt") as f:
        before = {k: f.get_tensor(k) for k in f.keys()}
    again = train_exits(model_dir, exit_layers=LAYERS, data=data, settings=settings, work_dir=work,
                        calibrate=False, progress=False, log=lambda m: None)
    assert again["timings"]["generate_s"] < 5 and again["timings"]["train_s"] < 5  # all cached
    with safe_open(summary["heads_path"], framework="pt") as f:
        assert all(torch.equal(before[k], f.get_tensor(k)) for k in f.keys())


def test_classifier_computes_logits_only_for_passing_rows(trained):
    from cluster.model.exits import ExitHeads
    from cluster.model.loader import build_model, load_hf_config
    from cluster.config import ModelConfig

    model_dir, _, _, _, summary = trained
    mc = ModelConfig.from_hf_config(load_hf_config(model_dir))
    model = build_model(model_dir, mc)
    heads = ExitHeads(model, ExitConfig(exit_layers=LAYERS, head="trained", heads_path=summary["heads_path"],
                                        confidence="classifier", threshold=0.5))
    h = torch.randn(8, mc.hidden_size) * 3
    conf = heads.classifiers[str(LAYERS[0])](h)
    thr = conf.sort().values[4].expand(8).clone()  # about half pass
    rows_seen = []
    orig = model.final_local_logits
    model.final_local_logits = lambda x: (rows_seen.append(x.shape[0]), orig(x))[1]
    with torch.inference_mode():
        ok, local = heads.check(LAYERS[0], h, thr)
    assert torch.equal(ok, conf >= thr) and 0 < int(ok.sum()) < 8
    assert rows_seen == [] and local is None  # the check itself computes no logits at all
    with torch.inference_mode():  # the exit's logits come from its head's state through the shared LM head
        state = heads.exit_state(LAYERS[0], h[ok])
        assert torch.allclose(model.final_local_logits(state), heads.local_logits(LAYERS[0], h[ok]))
    # in the engine, one LM-head pass per iteration serves every exited row and the final rows
    from cluster.model.exits import ExitBatch, forward_with_exits
    from cluster.model.layers.attention import AttentionMetadata, PrefillChunk

    kv = [torch.zeros(2, 4, 16, mc.num_kv_heads, mc.head_dim) for _ in range(mc.num_layers)]  # per layer K, V
    ids = torch.tensor([5, 6, 7, 8])
    meta = AttentionMetadata(torch.arange(4), 0, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                             [PrefillChunk(0, 4, 0, torch.tensor([0]))])
    rows_seen.clear()
    with torch.inference_mode():
        forward_with_exits(model, heads, ids, torch.arange(4), meta, kv,
                           ExitBatch(torch.tensor([3]), torch.tensor([True]), torch.tensor([0.0])))
    assert rows_seen == [1]  # threshold 0: the row exits at the first exit layer; one LM-head call
    # per-layer thresholds replace the default (NaN) only; a per-request threshold equal to the
    # config's default threshold is still the request's own
    cfg = ExitConfig(exit_layers=LAYERS, head="trained", heads_path=summary["heads_path"], confidence="classifier",
                     threshold=0.5, layer_thresholds=(0.2, 0.7))
    heads = ExitHeads(model, cfg)
    got = heads.resolve_thresholds(4, torch.tensor([float("nan"), 0.5, 0.3], dtype=torch.float32))
    assert got.tolist() == pytest.approx([0.7, 0.5, 0.3])


def test_engine_serves_trained_heads_with_classifier(trained):
    from cluster import LLM, SamplingParams

    model_dir, _, _, _, summary = trained
    prompts = ["The history of the Roman Empire", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    full = LLM(model_dir, early_exit=None)
    try:
        ref = [o.token_ids for o in full.generate(prompts, params)]
    finally:
        full.shutdown()
    cfg = ExitConfig(exit_layers=LAYERS, head="trained", heads_path=summary["heads_path"], confidence="classifier",
                     threshold=0.0, policy="per_sequence")
    llm = LLM(model_dir, early_exit=cfg)
    try:
        outs = llm.generate(prompts, params)
        assert all(o.exit_layers[1:] == [LAYERS[0]] * 11 for o in outs)  # threshold 0: every decode exits first
        full = llm.generate(prompts[0], params, exit_threshold=float("inf"))[0]  # full model on request
        assert full.token_ids == ref[0]
    finally:
        llm.shutdown()
    default = LLM(model_dir)  # the model directory's own exit config: trained heads + calibrated classifier
    try:
        outs = default.generate(prompts, params)
        assert all(len(o.token_ids) == 12 for o in outs)
    finally:
        default.shutdown()


@pytest.mark.slow
def test_shipped_heads_reproduce_recorded_agreement(default_model_dir):
    from cluster.config import ModelConfig
    from cluster.llm import model_exit_config
    from cluster.model.loader import build_model, load_hf_config
    from cluster.training.evaluate import measure_agreement, recorded_agreement

    mc = ModelConfig.from_hf_config(load_hf_config(default_model_dir))
    cfg = model_exit_config(default_model_dir, mc.num_layers)
    assert cfg.head == "trained" and cfg.confidence == "classifier", "the default model ships trained heads"
    assert os.path.getsize(cfg.heads_path) < 20e6
    with open(cfg.heads_path.replace("exit_heads.safetensors", "exit_config.json")) as f:
        calib = json.load(f)["calibration"]
    assert calib["calib"]["agreement"] >= calib["target"]  # calibration met its target on its own split
    recorded, seqs = recorded_agreement(cfg.heads_path)
    assert seqs and set(recorded) >= set(cfg.exit_layers)
    measured = measure_agreement(build_model(default_model_dir, mc), cfg.heads_path, seqs, tuple(sorted(recorded)))
    for layer, value in recorded.items():
        assert measured[layer] == pytest.approx(value, abs=0.01), (layer, measured, recorded)
