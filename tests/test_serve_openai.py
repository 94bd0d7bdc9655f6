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
                  "ingress_num_cpus": 0.05, "routing_stats_period_s": 0.5, "num_blocks": NUM_BLOCKS}, APP)
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


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_aborts_and_frees_blocks(server, path):
    from deployments.testing import llm_handle

    handle = llm_handle(APP)
    before = handle.stats.remote().result()
    body = {"model": MODEL, "max_tokens": 300, "stream": True, "temperature": 0, "ignore_eos": True}
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
