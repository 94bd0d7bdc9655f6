"""The OpenAI API's features through Ray Serve with TWO LLMServer replicas (tiny model), driven by the
official `openai` SDK and httpx: n > 1, multi-prompt completions (the request router once spun forever
on them), logprobs, response_format (guided decoding), penalties/logit_bias/min_tokens/echo, seeds far
outside int64 next to concurrent requests, /metrics (aborted streams counted), /tokenize,
/detokenize, /version and the request bodies in /openapi.json."""
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = [pytest.mark.timeout(240)]

MODEL = "tiny"
APP = "api"


@pytest.fixture(scope="module")
def server(ray_session, tiny_model_dir):
    from ray import serve

    from deployments.testing import deploy

    url = deploy({"model": tiny_model_dir, "served_model_name": MODEL, "num_replicas": 2, "replica_num_cpus": 0.05,
                  "ingress_num_cpus": 0.05, "routing_stats_period_s": 0.5, "num_blocks": 64}, APP)
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_completions_three_prompts_n2_two_replicas(server, client):
    prompts = ["The quick brown fox", "Once upon a time", "In the beginning"]
    t0 = time.monotonic()
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=7,
                                  extra_body={"ignore_eos": True}, timeout=60)
    assert time.monotonic() - t0 < 60
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 36
    # index = prompt_i * n + sample_j: samples of one prompt differ (seed + j), prompts' seeds repeat
    by_index = {c.index: c.text for c in r.choices}
    again = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert {c.index: c.text for c in again.choices} == by_index  # seeded: reproducible
    single = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=6, temperature=1.0, seed=8,
                                       extra_body={"ignore_eos": True})
    assert single.choices[0].text == by_index[3]  # prompt 1, sample 1 ran with seed 7 + 1
    # streamed: every index, each finished once, text equal to the non-streamed (seeded)
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=1.0,
                                            seed=7, stream=True, extra_body={"ignore_eos": True}))
    texts, finishes = {}, {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == by_index and set(finishes) == set(range(6))
    # both replicas served (request router spread the six engine requests)
    hdr = httpx.post(f"{server}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompts * 2, "max_tokens": 4, "ignore_eos": True}).headers["x-eeserve-replica"]
    assert len(set(hdr.split(","))) == 2, hdr


def test_chat_n2_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=8, temperature=1.0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 16
    for c in r.choices:
        content = c.logprobs.content
        assert len(content) == 8
        for t in content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3 and isinstance(t.bytes, list)
            assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
            assert t.logprob <= t.top_logprobs[0].logprob + 1e-4
        assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == c.message.content
    # greedy: the sampled token is the most likely one; streamed logprobs equal the non-streamed
    g = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True, "early_exit": False})
    for t in g.choices[0].logprobs.content:
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True, "early_exit": False}))
    streamed = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == \
        [(t.token, round(t.logprob, 4)) for t in g.choices[0].logprobs.content]


def test_completion_logprobs_and_echo(client, tokenizer):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(isinstance(d, dict) and 1 <= len(d) <= 3 for d in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    e = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=1, echo=True,
                                  extra_body={"ignore_eos": True})
    assert e.choices[0].text == prompt + r.choices[0].text
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    elp = e.choices[0].logprobs
    assert len(elp.tokens) == n_prompt + 5
    assert elp.token_logprobs[:n_prompt] == [None] * n_prompt  # the engine computes no prompt logprobs
    assert elp.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                            logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == e.choices[0].text
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[:n_prompt] == [None] * n_prompt
    assert streamed[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def test_response_format_json_schema_and_json_object(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=1.0,
                                           seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0,
                                                 response_format=fmt, stream=True))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SCHEMA)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0.7, seed=3,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        assert r.choices[0].message.content.lstrip().startswith("{")
    c = client.completions.create(model=MODEL, prompt="Data:", max_tokens=120, temperature=0,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(c.choices[0].text), SCHEMA)


def test_sampling_extras(client, tokenizer):
    base = dict(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    plain = client.completions.create(**base, extra_body={"ignore_eos": True})
    first_id = tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(**base, logit_bias={str(first_id): -100}, extra_body={"ignore_eos": True})
    assert tokenizer.encode(banned.choices[0].text, add_special_tokens=False)[:1] != [first_id]
    forced = client.completions.create(**base, logit_bias={"1000": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tokenizer.decode([1000] * 8)
    pen = client.completions.create(**base, presence_penalty=2.0, frequency_penalty=2.0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.5})
    assert pen.usage.completion_tokens == 8
    # min_tokens masks EOS: with EOS pushed to the top by logit_bias, min_tokens still gives 5 tokens
    eos = tokenizer.eos_token_id
    early = client.completions.create(**base, logit_bias={str(eos): 100})
    assert early.usage.completion_tokens == 1 and early.choices[0].finish_reason == "stop"
    held = client.completions.create(**base, logit_bias={str(eos): 100}, extra_body={"min_tokens": 5})
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"


def test_huge_seeds_answered_while_others_run(server):
    def run(body):
        return httpx.post(f"{server}/v1/completions", json=body, timeout=120)

    bodies = [{"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 24, "temperature": 1.0,
               "ignore_eos": True} for i in range(8)]
    with ThreadPoolExecutor(10) as pool:
        running = [pool.submit(run, b) for b in bodies]
        time.sleep(0.3)
        seeds = [pool.submit(run, {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "seed": s})
                 for s in (2**64, 2**70, -(2**70))]
        for f in seeds:
            assert f.result().status_code == 200, f.result().text
        for f in running:
            r = f.result()
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 24
    a = run({"model": MODEL, "prompt": "Hello", "max_tokens": 6, "seed": 2**70, "temperature": 1.0}).json()
    b = run({"model": MODEL, "prompt": "Hello", "max_tokens": 6, "seed": 2**70, "temperature": 1.0}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


ERRORS = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "tool calling"),
    ({"tool_choice": "auto"}, "tool_choice", "not supported"),
    ({"early_exit": {"threshold": 1.5}}, "early_exit", r"early_exit\.threshold: must be in \[0, 1\]"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format", ""),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", ""),
    ({"top_logprobs": 3}, "top_logprobs", "logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", ""),
    ({"frequency_penalty": 3}, "frequency_penalty", ""),
    ({"n": 0}, "n", ""),
    ({"store": True}, "store", "unknown field"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", ""),
    ({"stop_token_ids": [10**9]}, "stop_token_ids", ""),
]


@pytest.mark.parametrize("extra,param,message", ERRORS)
def test_rejected_not_ignored(server, extra, param, message):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert re.search(message, err["message"]), err["message"]


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_finished_and_aborted(server):
    before = httpx.get(f"{server}/metrics", timeout=30).text
    r = httpx.post(f"{server}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hello there", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as s:
        for i, line in enumerate(l for l in s.iter_lines() if l.startswith("data: ")):
            if i >= 2:
                break
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"{server}/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        after = r.text
        aborted = metric(after, "eeserve_finished_requests_total", finish_reason="abort") - \
            metric(before, "eeserve_finished_requests_total", finish_reason="abort")
        if aborted >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert aborted == 1
    assert metric(after, "eeserve_finished_requests_total", finish_reason="length") - \
        metric(before, "eeserve_finished_requests_total", finish_reason="length") >= 1
    assert metric(after, "eeserve_generated_tokens_total") - metric(before, "eeserve_generated_tokens_total") >= 7
    assert metric(after, "eeserve_exit_layer_count") >= 7
    assert metric(after, "eeserve_time_to_first_token_s_count") >= 2
    assert metric(after, "eeserve_replicas") == 2
    for name in ("eeserve_running_requests", "eeserve_waiting_requests", "eeserve_kv_block_usage",
                 "eeserve_time_per_output_token_s_bucket", "eeserve_e2e_request_latency_s_bucket",
                 "eeserve_prompt_tokens_total", "eeserve_http_requests_total", "eeserve_requests_in_flight"):
        assert name in after, name


def test_tokenize_detokenize_version_openapi(server, tokenizer):
    text = "Grüße, 世界! 🌍👩‍👩‍👧 שלום"
    r = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": text}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 512
    back = httpx.post(f"{server}/detokenize", json={"tokens": out["tokens"]}, timeout=30).json()
    assert back == {"prompt": text}
    chat = httpx.post(f"{server}/tokenize", json={"messages": MESSAGES}, timeout=30).json()
    comp = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1}).json()
    assert chat["count"] == comp["usage"]["prompt_tokens"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": [-1]}, timeout=30).status_code == 400
    assert httpx.post(f"{server}/tokenize", json={"prompt": "x", "model": "other"}, timeout=30).status_code == 404
    assert httpx.post(f"{server}/tokenize", json={}, timeout=30).status_code == 400
    v = httpx.get(f"{server}/version", timeout=30).json()
    assert re.match(r"\d+\.\d+", v["version"])
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        op = spec["paths"][path]["post"]
        assert "application/json" in op["requestBody"]["content"], path
        assert "400" in op["responses"] and "422" not in op["responses"]
    assert "CompletionRequest" in spec["components"]["schemas"]
