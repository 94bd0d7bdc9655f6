"""Real clients against the DEFAULT model (SmolLM2-135M-Instruct, early exit on) through Ray Serve:
non-ASCII text end to end with the `openai` SDK (streamed == non-streamed, no U+FFFD), and LangChain's
ChatOpenAI (`.invoke`, `.stream`, `.with_structured_output(PydanticModel)` through response_format
json_schema, enforced by guided decoding)."""
import pytest
from pydantic import BaseModel, Field

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

APP = "clients"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(ray_session, default_model_dir):
    from ray import serve

    from deployments.testing import deploy

    url = deploy({"replica_num_cpus": 0.1, "ingress_num_cpus": 0.05}, APP)
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=180)


PROMPTS = {
    "chinese": [{"role": "user", "content": "请用中文回答：中国最大的三个城市是哪些？"}],
    "emoji": [{"role": "user", "content": "Reply only with emoji: show the ocean, fish and the sun 🌊🐠☀️"}],
}


def test_non_ascii_streamed_equals_nonstreamed_and_offline(client):
    import torch

    from cluster import LLM, SamplingParams

    # the same default model and exit config as the server, in this process, at the replica's thread
    # count: Ray runs an actor with fractional CPUs on one thread, and the int4 CPU kernels' results
    # depend on the thread count (measured: the full model's Chinese answer differs at 1 and 2 threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = None
    try:
        llm = LLM()
        offline = {name: llm.chat(m, SamplingParams(max_tokens=48, temperature=0))[0].text
                   for name, m in PROMPTS.items()}
        raw = {name: llm.generate(m[0]["content"], SamplingParams(max_tokens=24, temperature=0, stop=["\n"]))[0]
               for name, m in PROMPTS.items()}
        # the tokenizer's own decode of the raw completions: U+FFFD only where the model's bytes are
        # invalid UTF-8 in the middle of the text (tokenizer.decode shows the same)
        raw_ref = {name: (o.text, llm.tokenizer.decode(o.token_ids)) for name, o in raw.items()}
    finally:
        if llm is not None:
            llm.shutdown()
        torch.set_num_threads(threads)
    for name in sorted(PROMPTS):
        check_non_ascii(client, name, offline[name], raw_ref[name])


def check_non_ascii(client, name: str, offline: str, raw_ref: tuple[str, str]) -> None:
    kw = dict(model=MODEL, messages=PROMPTS[name], temperature=0, max_tokens=48)
    r = client.chat.completions.create(**kw)
    full = r.choices[0].message.content
    assert full == offline
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    # a character cut by max_tokens is dropped (as vLLM does), never shown as U+FFFD
    assert "\ufffd" not in full, full
    assert any(ord(ch) > 0x2E7F for ch in full), f"no CJK or emoji in the answer: {full!r}"
    assert all("\ufffd" not in (c.choices[0].delta.content or "") for c in chunks
               if c.choices and c.choices[0].finish_reason is None)  # nothing held back is shown early
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[name][0]["content"], temperature=0,
                                           max_tokens=24, stop=["\n"])
    text, decoded = raw_ref
    assert completion.choices[0].text == text
    assert not text.endswith("\ufffd")  # an incomplete last character is dropped, not shown
    assert text.count("\ufffd") <= decoded.count("\ufffd")  # U+FFFD only where the tokenizer shows one too


class City(BaseModel):
    """A city and its country."""

    name: str = Field(max_length=24, description="the city's name")
    country: str = Field(max_length=24)
    population_millions: float = Field(ge=0, le=100)


def test_langchain_chat_openai(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server}/v1", api_key="x", model=MODEL, temperature=0, max_tokens=24,
                     max_retries=0, timeout=180)
    msg = llm.invoke("What is the capital of France?")
    assert isinstance(msg.content, str) and msg.content.strip()
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    assert msg.usage_metadata["output_tokens"] >= 1
    chunks = list(llm.stream("What is the capital of France?"))
    assert "".join(c.content for c in chunks) == msg.content
    longer = ChatOpenAI(base_url=f"{server}/v1", api_key="x", model=MODEL, temperature=0, max_tokens=80,
                        max_retries=0, timeout=180)
    structured = longer.with_structured_output(City, method="json_schema", include_raw=True)
    out = structured.invoke("Name a large city in Japan.")
    assert out["parsing_error"] is None, out
    city = out["parsed"]
    assert isinstance(city, City) and city.name and city.country
