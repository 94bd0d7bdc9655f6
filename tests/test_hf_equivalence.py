"""Early exit off: greedy tokens equal Hugging Face transformers' greedy tokens, token for token."""
import pytest
import torch

from cluster import LLM, SamplingParams

pytestmark = pytest.mark.timeout(600)

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "Three tips for staying healthy are",
]


def hf_greedy(model_dir: str, prompt_ids: list[list[int]], max_new_tokens: int, gguf_file=None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, gguf_file=gguf_file).eval()
    outs = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    return outs


def ours_greedy(model_dir: str, prompt_ids, max_new_tokens: int, **kw) -> list[list[int]]:
    llm = LLM(model_dir, early_exit=None, **kw)
    try:
        outs = llm.generate(prompt_ids, SamplingParams(max_tokens=max_new_tokens, ignore_eos=True))
        assert all(o.exit_layers == [llm.engine.model_config.num_layers] * max_new_tokens for o in outs)
        return [o.token_ids for o in outs]
    finally:
        llm.shutdown()


def _ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.encode(p, add_special_tokens=False) for p in PROMPTS]


@pytest.mark.parametrize("variant", ["llama", "qwen2_bias_untied", "llama3_rope_scaling"])
def test_tiny_random_matches_hf(tiny_factory, variant):
    kw = {
        "llama": {},
        "qwen2_bias_untied": {"arch": "qwen2", "tie_word_embeddings": False},
        "llama3_rope_scaling": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64}},
    }[variant]
    model_dir = tiny_factory(variant, **kw)
    ids = _ids(model_dir)
    # a small block size so sequences span several KV blocks
    assert ours_greedy(model_dir, ids, 40, block_size=4) == hf_greedy(model_dir, ids, 40)


@pytest.mark.slow
def test_default_model_matches_hf(default_model_dir):
    """Float weights on both sides (quantization none; transformers dequantizes the same GGUF)."""
    import os

    from cluster.model.loader import default_model_path

    gguf = default_model_path()
    ids = _ids(default_model_dir)
    assert ours_greedy(default_model_dir, ids, 32, quantization="none") == \
        hf_greedy(os.path.dirname(gguf), ids, 32, gguf_file=os.path.basename(gguf))
