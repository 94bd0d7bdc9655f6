"""The ``eeserve generate`` console script, run as a user would (a subprocess)."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=240)


def test_generate_prints_completion_and_exit_stats(tiny_model_dir):
    r = run_cli("generate", "Tell me a story", "--model", tiny_model_dir, "--max-tokens", "6", "--compact")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["num_tokens"] == 6 and stats["num_layers"] == 6
    assert sum(stats["exit_layer_counts"].values()) == 6
    assert r.stdout.strip() or stats["finish_reason"] == "length"


def test_generate_full_model_and_bad_model(tiny_model_dir, tmp_path):
    r = run_cli("generate", "Hi", "--model", tiny_model_dir, "--max-tokens", "3", "--no-early-exit", "--compact")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["exit_layer_counts"] == {"6": 3} and stats["exit_config"] is None
    r = run_cli("generate", "Hi", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "model" in r.stderr


def test_generate_lossless_mode_equals_full_model(tiny_model_dir):
    args = ("generate", "Tell me a story", "--model", tiny_model_dir, "--max-tokens", "8", "--compact")
    full = run_cli(*args, "--no-early-exit")
    spec = run_cli(*args, "--exit-mode", "self_speculative", "--draft-layer", "1", "--num-draft-tokens", "3",
                   "--no-adaptive-drafts")  # the tiny model's drafts cost about a full step: adaptive drafts none
    assert full.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == full.stdout
    stats = json.loads(spec.stderr.strip().splitlines()[-1])
    ec = stats["exit_config"]
    assert (ec["mode"], ec["draft_layer"], ec["num_draft_tokens"]) == ("self_speculative", 1, 3)
    assert stats["num_draft_tokens"] > 0 and stats["tokens_per_verify"] >= 1
    bad = run_cli(*args, "--no-early-exit", "--exit-mode", "verified")
    assert bad.returncode == 2 and "--exit-mode" in bad.stderr
