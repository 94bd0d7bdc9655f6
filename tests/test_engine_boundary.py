"""The typed engine boundary: one validation (InvalidRequestError naming the field), RequestOutput
deltas whose text is incremental and exact, and per-request fault isolation (one request's failure
never harms another, never kills the engine, never leaks KV blocks)."""
import asyncio

import pytest

from cluster import LLM, EngineRequest, ExitConfig, InvalidRequestError, SamplingParams
from cluster.engine.async_engine import AsyncEngine

pytestmark = pytest.mark.timeout(300)

PROMPT = "Once upon a time in a city by the sea, a traveller"


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    llm = LLM(tiny_model_dir, early_exit=ExitConfig(exit_layers=(2, 4), threshold=0.5), block_size=4,
              num_blocks=64)
    yield llm
    llm.shutdown()


def _req(llm, rid="r", prompt=PROMPT, **sp):
    """The request as the offline API builds it: the processor's checks against the model (the
    engine adds its KV cache fit when it takes it)."""
    default = sp.pop("max_tokens_is_default", False)
    return llm.processor.process(rid, prompt, SamplingParams(**sp), max_tokens_is_default=default)


@pytest.mark.parametrize("prompt,sp,param,code", [
    ([10**6], {}, "prompt", "invalid_value"),
    ([5] * 600, {}, "prompt", "context_length_exceeded"),          # max_model_len 512
    ([5] * 250, {"max_tokens": 300}, "max_tokens", "context_length_exceeded"),
    ([5] * 300, {}, "prompt", "context_length_exceeded"),  # fits the context, not the KV cache
    ([5] * 100, {"max_tokens": 200}, "max_tokens", "context_length_exceeded"),  # 64 blocks x 4 = 256 KV slots
    (PROMPT, {"stop_token_ids": [10**6]}, "stop_token_ids", "invalid_value"),
    (PROMPT, {"logit_bias": {10**6: 1.0}}, "logit_bias", "invalid_value"),
])
def test_validation_names_the_field(llm, prompt, sp, param, code):
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request(_req(llm, prompt=prompt, **sp))
    assert e.value.param == param and e.value.code == code, e.value
    assert param in str(e.value) or "context length" in str(e.value)
    assert not llm.engine.has_unfinished_requests()
    llm.engine.check_integrity()


def test_default_max_tokens_is_lowered_to_the_room_left(llm):
    req = llm.engine.validate(_req(llm, prompt=[5] * 100, max_tokens=10_000, max_tokens_is_default=True))
    assert req.sampling_params.max_tokens == llm.engine.kv_capacity_tokens + 1 - 100


def test_duplicate_request_id_is_refused_and_harms_nothing(llm):
    llm.engine.add_request(_req(llm, "dup", max_tokens=3, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="already in use"):
        llm.engine.add_request(_req(llm, "dup", max_tokens=3))
    outs = []
    while llm.engine.has_unfinished_requests():
        outs += llm.engine.step()
    assert sum(o.new_token_ids.__len__() for o in outs if o.request_id == "dup") == 3
    llm.engine.check_integrity()


@pytest.mark.parametrize("seed", [2**64, 2**70, -1, 2**63])
def test_any_integer_seed_is_accepted_and_reproducible(llm, seed):
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
    a, b = llm.generate([PROMPT, PROMPT], sp)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6
    reduced = SamplingParams(max_tokens=6, temperature=1.0, seed=seed % 2**64, ignore_eos=True)
    assert llm.generate(PROMPT, reduced)[0].token_ids == a.token_ids


def test_deltas_concatenate_to_the_decoded_text(llm):
    """A random model emits arbitrary byte tokens: the streamed text must still be exact."""
    tok = llm.tokenizer
    sp = SamplingParams(max_tokens=48, temperature=1.0, seed=3, ignore_eos=True)
    for i in range(4):
        llm.engine.add_request(_req(llm, f"d{i}", prompt=f"{PROMPT} 中文 🌟 {i}", **sp.model_dump()))
    texts, ids = {}, {}
    while llm.engine.has_unfinished_requests():
        for o in llm.engine.step():
            texts[o.request_id] = texts.get(o.request_id, "") + o.new_text
            ids[o.request_id] = ids.get(o.request_id, []) + o.new_token_ids
    for rid, text in texts.items():
        full = tok.decode(ids[rid], skip_special_tokens=True)
        assert text == full
        assert "\ufffd" in full or "\ufffd" not in text


def test_stop_string_ends_the_request_and_is_cut(llm):
    base = llm.generate(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True))[0]
    word = base.text[len(base.text) // 2:][:3]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True, stop=[word]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == word
    assert out.text == base.text[:base.text.index(word)]


def test_one_failing_request_finishes_alone(llm, monkeypatch):
    """A fault injected into one request's output handling: that request ends with an error, the
    others produce exactly what they produce alone, the engine lives on and leaks nothing."""
    from cluster.engine import detokenizer

    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPT + " 1", PROMPT + " 2"], sp)
    real_update = detokenizer.IncrementalDetokenizer.update
    calls = {"n": 0}

    def flaky(self, new_ids, finished):
        if "<<bad>>" in self._stop:  # the marked request only
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected detokenizer fault")
        return real_update(self, new_ids, finished)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "update", flaky)
    bad = SamplingParams(max_tokens=12, ignore_eos=True, stop=["<<bad>>"])
    outs = llm.generate([PROMPT + " 1", PROMPT + " bad", PROMPT + " 2"], [sp, bad, sp])
    assert outs[1].finish_reason == "error" and "injected" in outs[1].error
    assert len(outs[1].token_ids) == 2
    assert [outs[0].token_ids, outs[2].token_ids] == [a.token_ids for a in alone]
    assert all(o.finish_reason == "length" for o in (outs[0], outs[2]))
    llm.engine.check_integrity()
    assert not llm.engine.has_unfinished_requests()


def test_async_engine_huge_seed_among_concurrent_requests(tiny_model_dir):
    engine = AsyncEngine.from_args(model=tiny_model_dir, block_size=4, early_exit=None)

    async def run(rid, **sp):
        ids = engine.tokenizer.encode(PROMPT + rid, add_special_tokens=False)
        req = EngineRequest(request_id=rid, prompt_token_ids=ids,
                            sampling_params=SamplingParams(max_tokens=16, ignore_eos=True, **sp))
        outs = [o async for o in engine.generate(req)]
        return outs[-1]

    async def main():
        others = [asyncio.ensure_future(run(f"c{i}", temperature=0.8, seed=i)) for i in range(8)]
        await asyncio.sleep(0.05)
        big = await asyncio.gather(run("big64", temperature=1.0, seed=2**64), run("big70", temperature=1.0, seed=2**70))
        return big, await asyncio.gather(*others)

    try:
        big, others = asyncio.run(main())
        assert all(o.finished and o.finish_reason == "length" and o.num_output_tokens == 16 for o in big + others)
        engine.check_health()
        asyncio.run(engine.check_integrity())
    finally:
        engine.shutdown()


def test_guided_json_schema_with_early_exit(llm):
    """response_format json_schema on a random model with early exit: the grammar mask applies to
    exit-layer tokens too, so the output always parses and validates."""
    import json

    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"],
              "additionalProperties": False}
    sp = SamplingParams(max_tokens=60, temperature=0.0, guided_decoding={"json_schema": schema})
    outs = llm.generate([PROMPT, PROMPT + " 2"], sp)
    for o in outs:
        assert o.finish_reason == "stop", o
        jsonschema.validate(json.loads(o.text), schema)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(PROMPT, SamplingParams(guided_decoding={"json_schema": '{"type": "nonsense"}'}))
    assert e.value.param == "response_format"
    llm.engine.check_integrity()


def test_sampling_fault_fails_only_that_request(llm, monkeypatch):
    """A fault injected into one request's sampling (its penalty step raises) through the real engine:
    that request ends with an error, its batch-mates are unaffected."""
    import cluster.model.layers.sampler as sampler

    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = llm.generate([PROMPT + " x", PROMPT + " y"], sp)

    def broken(*args, **kwargs):
        raise RuntimeError("injected sampling fault")

    monkeypatch.setattr(sampler, "_apply_penalties", broken)
    bad = SamplingParams(max_tokens=10, ignore_eos=True, presence_penalty=0.5)
    outs = llm.generate([PROMPT + " x", PROMPT + " bad", PROMPT + " y"], [sp, bad, sp])
    assert outs[1].finish_reason == "error" and "injected sampling fault" in outs[1].error
    assert [outs[0].token_ids, outs[2].token_ids] == [a.token_ids for a in alone]
    llm.engine.check_integrity()
    assert not llm.engine.has_unfinished_requests()


def test_async_engine_builds_and_steps_its_engine_in_one_thread(tiny_model_dir):
    """``AsyncEngine.from_args`` builds the engine in the engine thread (every torch op of the engine
    in one thread: libgomp's pools stay within the cores, see ``AsyncEngine.__init__``); a build that
    fails raises in the caller; an engine passed as is still works."""
    import threading

    from cluster.engine.factory import create_engine

    seen = {}

    def build():
        seen["build"] = threading.current_thread().name
        return create_engine(model=tiny_model_dir, block_size=4, num_blocks=64, early_exit=None)

    engine = AsyncEngine(build)
    try:
        step = engine.engine.step

        def recorded_step():
            seen["step"] = threading.current_thread().name
            return step()

        engine.engine.step = recorded_step

        async def go():
            req = EngineRequest(request_id="t", prompt_token_ids=[5, 6, 7],
                                sampling_params=SamplingParams(max_tokens=3, ignore_eos=True))
            return [o async for o in engine.generate(req)]

        outs = asyncio.run(go())
        assert sum(len(o.new_token_ids) for o in outs) == 3
        assert seen["build"] == seen["step"] == "eeserve-engine" != threading.current_thread().name
    finally:
        engine.shutdown()

    def broken():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(broken)
