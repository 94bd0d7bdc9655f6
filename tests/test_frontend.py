"""The shared front end (no engine, no model weights): the processor's checks, each with the field it
names, and the one output accumulator."""
import pytest
from transformers import AutoTokenizer

from cluster.config import ModelConfig
from cluster.engine.protocol import InvalidRequestError, RequestOutput, TokenLogprob
from cluster.frontend import CompletionOutput, Processor
from cluster.model.loader import load_hf_config
from cluster.sampling import SamplingParams

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def processor(default_model_dir):
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    mc = ModelConfig.from_hf_config(load_hf_config(default_model_dir), max_model_len=32)
    return Processor(tok, mc)


@pytest.mark.parametrize("prompt,params,kw,param,code", [
    ("", None, {}, "prompt", "invalid_value"),
    ([], None, {"prompt_param": "messages"}, "messages", "invalid_value"),
    ([5] * 32, None, {}, "prompt", "context_length_exceeded"),                   # no room for one token
    ([5] * 20, SamplingParams(max_tokens=13), {}, "max_tokens", "context_length_exceeded"),
    ([5] * 20, SamplingParams(max_tokens=100, min_tokens=20), {"max_tokens_is_default": True}, "min_tokens",
     "invalid_value"),                                                           # lowered default below min_tokens
    ([49152], None, {}, "prompt", "invalid_value"),                              # vocab 49152
    ([-1], None, {}, "prompt", "invalid_value"),
    ("hi", SamplingParams(stop_token_ids=[10**9]), {}, "stop_token_ids", "invalid_value"),
    ("hi", SamplingParams(logit_bias={10**9: 1.0}), {}, "logit_bias", "invalid_value"),
    ("hi", SamplingParams(guided_decoding={"json_schema": '{"type": "nonsense"}'}), {}, "response_format",
     "invalid_value"),
    ("hi", None, {"exit_threshold": 1.5}, "exit_threshold", "invalid_value"),
    ("hi", None, {"num_draft_tokens": 0}, "num_draft_tokens", "invalid_value"),
    ("hi", None, {"exit_mode": "fastest"}, "exit_mode", "invalid_value"),
])
def test_bad_requests_name_their_field(processor, prompt, params, kw, param, code):
    with pytest.raises(InvalidRequestError) as e:
        processor.process("r", prompt, params, **kw)
    assert (e.value.param, e.value.code) == (param, code), e.value
    assert param in e.value.message or "context length" in e.value.message or "json_schema" in e.value.message


def test_requests_are_built_once_with_their_limits(processor):
    tok = processor.tokenizer
    text = "Résumé: 東京タワー 🗼 — ça va?"
    req = processor.process("r", text, SamplingParams(max_tokens=4), exit_mode="verified", num_draft_tokens=2)
    assert req.prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert (req.exit_mode, req.num_draft_tokens, req.early_exit) == ("verified", 2, True)
    # a default max_tokens is lowered to the context window's room (the engine lowers it to its KV cache)
    req = processor.process("d", [7] * 20, SamplingParams(max_tokens=1000), max_tokens_is_default=True)
    assert req.sampling_params.max_tokens == 12 and req.max_tokens_is_default
    ids = processor.chat_ids([{"role": "user", "content": "Привет 👋"}])
    assert tok.decode(ids).endswith("assistant\n") and "Привет 👋" in tok.decode(ids)
    with pytest.raises(InvalidRequestError) as e:
        processor.chat_ids([{"role": "user", "content": {"not": "text"}}] * 2)
    assert e.value.param == "messages"


def test_min_tokens_above_max_tokens_is_one_pydantic_rule():
    with pytest.raises(ValueError) as e:
        SamplingParams(max_tokens=3, min_tokens=4)
    assert e.value.errors()[0]["loc"] == ("min_tokens",)
    assert SamplingParams(max_tokens=9, min_tokens=4).with_max_tokens(4).max_tokens == 4
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=9, min_tokens=4).with_max_tokens(3)


def test_accumulator_adds_deltas_and_keeps_running_totals():
    out = CompletionOutput("r", [1, 2, 3])
    out.add(RequestOutput("r", [5], "Hel", [8], [TokenLogprob(5, -0.1)], num_prompt_tokens=3, num_layers=30,
                          exit_mode="verified", replica="rep-1", num_draft_tokens=2, num_accepted_tokens=1,
                          num_verify_steps=1))
    out.add(RequestOutput("r", [6, 7], "lo 🌍", [30, 30], None, finished=True, finish_reason="stop",
                          stop_reason="\n", num_layers=30, num_draft_tokens=4, num_accepted_tokens=3,
                          num_verify_steps=2))
    assert (out.text, out.token_ids, out.exit_layers) == ("Hello 🌍", [5, 6, 7], [8, 30, 30])
    assert [lp.token_id for lp in out.logprobs] == [5]
    assert (out.finished, out.finish_reason, out.stop_reason) == (True, "stop", "\n")
    assert (out.exit_mode, out.replica, out.num_prompt_tokens) == ("verified", "rep-1", 3)
    assert out.acceptance_rate == 0.75 and out.tokens_per_verify == 2.5
