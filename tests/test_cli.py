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
