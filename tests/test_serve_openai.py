"""The OpenAI API under Ray Serve (tiny model, one replica): official `openai` client, early_exit,
errors, and a client disconnect that aborts its request without leaking KV blocks."""
import json
import time

import httpx
import pytest

pytestmark = [pytest.mark.timeout(300)]

KEY = "sk-test-eeserve"
MODEL = "tiny"
APP = "openai"
NUM_BLOCKS = 24  # 384 KV slots: less than the tiny model's 512-token context


@pytest.fixture(scope="module")
def server(ray_session, tiny_model_dir):
    from ray import serve

    from deployments.testing import deploy

    url = deploy({"model": tiny_model_dir, "served_model_name": MODEL, "api_key": KEY, "replica_num_cpus": 0.1,
                  "ingress_num_cpus": 0.05, "routing_stats_period_s": 0.5, "num_blocks": NUM_BLOCKS,
                  "adaptive_drafts": False}, APP)  # the tiny model's drafts cost about a full step: draft anyway
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def chat_prompt_len(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def ee(obj) -> dict:
    val = getattr(obj, "early_exit", None)
    if val is None and getattr(obj, "model_extra", None):
        val = obj.model_extra.get("early_exit")
    return val


def check_ee(stats: dict, n_tokens: int, num_layers: int = 6) -> None:
    assert stats["num_layers"] == num_layers
    assert sum(stats["exit_layer_counts"].values()) == n_tokens
    assert all(1 <= int(k) <= num_layers for k in stats["exit_layer_counts"])
    mean = sum(int(k) * v for k, v in stats["exit_layer_counts"].items()) / n_tokens
    assert stats["mean_exit_layer"] == pytest.approx(mean)


MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(f"{server}/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_nonstream_usage_and_early_exit(client, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == chat_prompt_len(tokenizer, MESSAGES)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    check_ee(ee(r), 12)


def test_chat_stream_equals_nonstream(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    check_ee(ee(last), 12)
    assert ee(last) == ee(full)  # greedy: same tokens, same exits


def test_completion_stream_and_nonstream(client, tokenizer):
    prompt = "The quick brown fox"
    full = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert full.usage.completion_tokens == 12
    check_ee(ee(full), 12)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    check_ee(ee(chunks[-1]), 12)
    # token-id prompts and the completion default of 16 tokens
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    r = client.completions.create(model=MODEL, prompt=ids, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert r.usage.completion_tokens == 16


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] in ("length", "stop") and final["early_exit"]["num_layers"] == 6


def test_early_exit_field(client):
    def run(extra):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10,
                                           extra_body={"ignore_eos": True, **extra})
        check_ee(ee(r), 10)
        return r, ee(r)

    _, off = run({"early_exit": False})
    assert off["exit_layer_counts"] == {"6": 10} and off["mean_exit_layer"] == 6.0
    # threshold 0: every decode token leaves at the first exit point (the prefill token runs in full)
    _, eager = run({"early_exit": {"threshold": 0.0}})
    first_exit = min(int(k) for k in eager["exit_layer_counts"])
    assert first_exit < 6 and eager["exit_layer_counts"][str(first_exit)] >= 9
    assert eager["mean_exit_layer"] < off["mean_exit_layer"]
    _, strict = run({"early_exit": {"threshold": 1.0}})
    assert strict["mean_exit_layer"] >= eager["mean_exit_layer"]
    _, default = run({})
    assert default["num_layers"] == 6


LOSSLESS = [{"mode": "verified"}, {"mode": "verified", "threshold": 0.0},
            {"mode": "self_speculative", "draft_layer": 1, "num_draft_tokens": 3},
            {"mode": "layer_skip"}]  # the default skip set (every other middle layer: 2, 4 of 6)


@pytest.mark.parametrize("opt", LOSSLESS, ids=["verified", "verified-t0", "self_speculative", "layer_skip"])
def test_lossless_modes_equal_the_full_model(client, opt):
    """Greedy output of the lossless modes == the full model's, streamed and not, chat and completions;
    a streamed delta may carry several verified tokens: text, usage and exit counts still add up."""
    n = 16
    spec = opt["mode"] in ("self_speculative", "layer_skip")  # drafts of a fixed length: always some

    def ask(early_exit, stream=False, chat=True):
        kw = dict(model=MODEL, temperature=0, max_tokens=n, extra_body={"ignore_eos": True, "early_exit": early_exit})
        if stream:
            kw["stream_options"] = {"include_usage": True}
        if chat:
            return client.chat.completions.create(messages=MESSAGES, stream=stream, **kw)
        return client.completions.create(prompt="The quick brown fox", stream=stream, **kw)

    def check_stats(s: dict):
        check_ee(s, n)
        assert s["mode"] == opt["mode"]
        assert 0 <= s["num_accepted_tokens"] <= s["num_draft_tokens"]
        if spec:
            assert s["num_draft_tokens"] > 0
        if s["num_draft_tokens"]:
            assert s["acceptance_rate"] == pytest.approx(s["num_accepted_tokens"] / s["num_draft_tokens"])
            assert 1.0 <= s["tokens_per_verify"] <= 1 + opt.get("num_draft_tokens", 16)
        else:
            assert s["acceptance_rate"] is None

    for chat in (True, False):
        full = ask(False, chat=chat)
        fs = ee(full)
        assert fs["mode"] is None and fs["num_draft_tokens"] == 0 and fs["acceptance_rate"] is None
        assert fs["tokens_per_verify"] is None
        text = (lambda r: r.choices[0].message.content) if chat else (lambda r: r.choices[0].text)
        r = ask(opt, chat=chat)
        assert text(r) == text(full) and r.usage.completion_tokens == n
        check_stats(ee(r))
        chunks = list(ask(opt, stream=True, chat=chat))
        pieces = [(c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks if c.choices]
        assert "".join(pieces) == text(full)
        if ee(chunks[-1])["num_accepted_tokens"]:  # accepted drafts arrive with their verifying step's token
            assert sum(1 for p in pieces if p) < n
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == n
        assert last.usage.prompt_tokens == full.usage.prompt_tokens
        check_stats(ee(last))


def test_lossless_mode_with_logprobs_streams_every_token(client):
    """Logprobs run a lossless request at full depth: one log-probability per token, same text."""
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=10, logprobs=1)
    full = client.completions.create(extra_body={"ignore_eos": True, "early_exit": False}, **kw)
    opt = {"mode": "self_speculative", "draft_layer": 1}
    chunks = list(client.completions.create(stream=True, extra_body={"ignore_eos": True, "early_exit": opt}, **kw))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 10 and "".join(tokens) == full.choices[0].text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert full.choices[0].logprobs.tokens == tokens


@pytest.mark.parametrize("early_exit,message", [
    ({"speed": 2}, r"early_exit\.speed: unknown key"),
    ({"mode": "fast"}, r"early_exit\.mode: must be one of"),
    ({"mode": "self_speculative", "draft_layer": 0}, r"early_exit\.draft_layer: must be >= 1"),
    ({"mode": "verified", "num_draft_tokens": 99}, r"early_exit\.num_draft_tokens: must be in \[1, 16\]"),
    ({"mode": "paper", "draft_layer": 1}, r"early_exit\.draft_layer: only with mode"),
    ({"threshold": "high"}, r"early_exit\.threshold"),
    ({"mode": "self_speculative", "draft_layer": 6}, r"early_exit\.draft_layer: must be in \[1, 5\]"),  # engine
    ({"draft_layer": 2}, r"draft_layer and num_draft_tokens need mode"),  # engine: the server's mode is lossy
    ({"mode": "verified", "skip_layers": [2]}, r"early_exit\.skip_layers: only with mode 'layer_skip'"),
    ({"mode": "layer_skip", "skip_layers": "2"}, r"early_exit\.skip_layers: must be a list of layer numbers"),
    ({"mode": "layer_skip", "skip_layers": [0, 2]}, r"early_exit\.skip_layers: each must be in \[1, 5\]"),  # engine
    ({"mode": "layer_skip", "skip_layers": [9]}, r"early_exit\.skip_layers: each must be in \[1, 5\]"),  # engine
    ({"mode": "layer_skip", "skip_layers": []}, r"early_exit\.skip_layers: must name at least one layer"),  # engine
    ({"mode": "layer_skip", "skip_layers": [2, 6]}, r"early_exit\.skip_layers: .*the last layer, 6, is never"),
])
def test_early_exit_errors_through_client(client, early_exit, message):
    import re

    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       extra_body={"early_exit": early_exit})
    err = info.value.response.json()["error"]
    assert err["param"] == "early_exit" and err["type"] == "invalid_request_error"
    assert re.search(message, err["message"]), err["message"]


def test_metrics_count_speculation(server, client):
    def scrape() -> str:
        return httpx.get(f"{server}/metrics", timeout=30).text

    def metric(text: str, name: str) -> float:
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + "{"))

    names = ("eeserve_spec_draft_tokens_total", "eeserve_spec_accepted_tokens_total",
             "eeserve_spec_verify_steps_total")
    before = scrape()
    assert all(n in before for n in names)
    r = client.completions.create(model=MODEL, prompt="Hello there", temperature=0, max_tokens=12, extra_body={
        "ignore_eos": True, "early_exit": {"mode": "self_speculative", "draft_layer": 1, "num_draft_tokens": 3}})
    s = ee(r)
    after = scrape()
    diff = {n: metric(after, n) - metric(before, n) for n in names}
    assert diff["eeserve_spec_draft_tokens_total"] == s["num_draft_tokens"] > 0
    assert diff["eeserve_spec_accepted_tokens_total"] == s["num_accepted_tokens"]
    assert diff["eeserve_spec_verify_steps_total"] >= 1


def test_chat_default_max_tokens_fills_the_kv_cache(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == NUM_BLOCKS * 16 + 1  # the last token needs no KV


def test_stop_string(client):
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=12,
                                  extra_body={"ignore_eos": True})
    text = r.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("greedy text has no usable stop string")
    s = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=12,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert s.choices[0].finish_reason == "stop" and stop not in s.choices[0].text
    assert text.startswith(s.choices[0].text)


LONG = " ".join(["word"] * 600)
ERRORS = [
    # (path, body, headers, status, param, code)
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": -1}, None, 400, "temperature", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 17}, None, 400, "n", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "unknown_field": 1}, None, 400,
     "unknown_field", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, None, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, None, 400,
     "messages", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, None, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, None, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 450}, None, 400, "max_tokens", None),  # > KV
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "early_exit": {"threshold": 3}}, None, 400,
     "early_exit", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "early_exit": {"mode": "verified", "speed": 2}}, None, 400,
     "early_exit", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "early_exit": {"mode": "fast"}}, None, 400, "early_exit",
     None),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "early_exit": {"mode": "self_speculative",
                                                                                   "draft_layer": 0}}, None, 400,
     "early_exit", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "early_exit": {"num_draft_tokens": 99}}, None, 400,
     "early_exit", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, None, 400,
     "stream_options", None),
    ("/v1/completions", {"model": MODEL}, None, 400, "prompt", None),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}, None, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, {}, 401, None, "invalid_api_key"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, None,
     "invalid_api_key"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, {}, 401, None, "invalid_api_key"),
    ("/tokenize", {"prompt": "hi"}, {}, 401, None, "invalid_api_key"),
]


@pytest.mark.parametrize("path,body,headers,status,param,code", ERRORS)
def test_errors(server, path, body, headers, status, param, code):
    h = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    r = httpx.post(f"{server}{path}", json=body, headers=h, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code:
        assert err["code"] == code
    assert err["type"] == "invalid_request_error"


def test_errors_through_client_and_still_serving(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=LONG)
    bad = httpx.post(f"{client.base_url}chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=30)
    assert bad.status_code == 400
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert r.usage.completion_tokens == 12


@pytest.mark.parametrize("path,early_exit", [
    ("/v1/completions", None), ("/v1/chat/completions", None), ("/v1/chat/completions", {"mode": "verified"}),
    ("/v1/completions", {"mode": "self_speculative", "draft_layer": 1, "num_draft_tokens": 3}),
    ("/v1/chat/completions", {"mode": "layer_skip", "skip_layers": [2, 3]})],
    ids=["completions", "chat", "chat-verified", "completions-self_speculative", "chat-layer_skip"])
def test_client_disconnect_aborts_and_frees_blocks(server, path, early_exit):
    """A client that drops its stream aborts the request, drafting or not: its blocks (the drafts'
    reserved slots included) are freed and the engine goes on."""
    from deployments.testing import llm_handle

    handle = llm_handle(APP)
    before = handle.stats.remote().result()
    body = {"model": MODEL, "max_tokens": 300, "stream": True, "temperature": 0, "ignore_eos": True}
    if early_exit:
        body["early_exit"] = early_exit
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "Once upon a time"}]
    else:
        body["prompt"] = "Once upon a time"
    with httpx.stream("POST", f"{server}{path}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
                if got >= 3:
                    break
    deadline = time.monotonic() + 60
    while True:
        stats = handle.check_integrity.remote().result()  # raises if the block manager is inconsistent
        if stats["num_active"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert stats["kv_usage"] == 0.0 and stats["num_free_blocks"] == stats["num_blocks"]
    generated = stats["num_generated_tokens"] - before["num_generated_tokens"]
    assert generated < 300, "the request ran to the end: not aborted"
    assert stats["num_finished_requests"] == before["num_finished_requests"]


def test_langchain_lossless_mode_equals_the_full_model(server):
    """LangChain's ChatOpenAI with ``early_exit`` in ``extra_body``: verified answers to a Chinese,
    French and emoji prompt equal the full model's, invoked and streamed (a streamed delta may carry
    several verified tokens: the streaming decoder still splits no character)."""
    from langchain_openai import ChatOpenAI

    def chat(early_exit):
        return ChatOpenAI(base_url=f"{server}/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=16,
                          max_retries=0, timeout=120, extra_body={"early_exit": early_exit, "ignore_eos": True})

    prompt = "讲讲大海和鱼 🌊🐠, s'il te plaît"
    full = chat(False).invoke(prompt)
    verified = chat({"mode": "verified", "threshold": 0.0})
    msg = verified.invoke(prompt)
    assert msg.content == full.content and msg.usage_metadata["output_tokens"] == 16
    assert "".join(c.content for c in verified.stream(prompt)) == full.content


def test_curl_style_body_without_json_content_type(server):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded: the body is still read as JSON."""
    import httpx

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    r = httpx.post(f"{server}/v1/chat/completions", content=body, timeout=120,
                   headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    bad = httpx.post(f"{server}/v1/chat/completions", content="model=x", timeout=60,
                     headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and "error" in bad.json()
