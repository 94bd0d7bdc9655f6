"""Guided decoding (cluster.engine.guided, xgrammar): masks, termination, schema errors, compile cache."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from cluster.engine.guided import GuidedDecoderFactory
from cluster.engine.protocol import InvalidRequestError
from cluster.sampling import GuidedDecodingParams

pytestmark = pytest.mark.timeout(180)

EOS = 2  # SmolLM2-Instruct's <|im_end|>
PAD = 40  # model vocab = tokenizer + 40: not a multiple of 32, so the last bitmask word is partial
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "color", "tags"],
}


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def factory(tok):
    return GuidedDecoderFactory(tok, len(tok) + PAD, stop_token_ids=[EOS])


def allowed(bitmask: np.ndarray, vocab_size: int) -> torch.Tensor:
    """The sampler's unpacking (any device): bool [vocab_size], True = allowed."""
    mask = torch.from_numpy(bitmask)
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


def run(factory, tok, params, seed: int, cap: int = 300):
    """Sample from seeded random logits (biased toward tokens holding a quote/bracket so documents
    end) under the decoder's mask until it terminates; returns (text, steps)."""
    dec, vocab = factory.create(params), factory.vocab_size
    gen = torch.Generator().manual_seed(seed)
    closers = torch.zeros(vocab)
    closers[: len(tok)] = torch.tensor([any(c in t for c in '"}]') for t in tok.convert_ids_to_tokens(range(len(tok)))],
                                       dtype=torch.float32)
    out = []
    for _ in range(cap):
        if dec.is_terminated():
            break
        ok = allowed(dec.bitmask(), vocab)
        assert not ok[len(tok):].any(), "LM-head padding ids must never be allowed"
        assert ok[EOS] == dec._m.is_completed()
        logits = torch.randn(vocab, generator=gen) + 6.0 * closers
        logits.masked_fill_(~ok, float("-inf"))
        t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        assert dec.accept(t)
        if t == EOS:
            break
        out.append(t)
    assert dec.is_terminated(), f"no document after {cap} tokens: {tok.decode(out)!r}"
    return tok.decode(out), len(out)


@pytest.mark.parametrize("seed", range(4))
def test_json_object_random_logits(factory, tok, seed):
    text, _ = run(factory, tok, GuidedDecodingParams(json_object=True), seed)
    assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_random_logits(factory, tok, seed):
    jsonschema = pytest.importorskip("jsonschema")
    text, _ = run(factory, tok, GuidedDecodingParams(json_schema=SCHEMA), seed)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("schema", ["{not json", '{"type": "nonsense"}', "5", '{"$ref": "#/missing"}',
                                    '{"type": "string", "pattern": "(("}'])
def test_invalid_schema(factory, schema):
    params = GuidedDecodingParams(json_schema=schema)
    for call in (factory.validate, factory.create):
        with pytest.raises(InvalidRequestError) as e:
            call(params)
        assert (e.value.param, e.value.code) == ("response_format", "invalid_value")
        assert "json_schema" in e.value.message


def test_eos_only_when_complete_and_padding_never(factory, tok):
    vocab = factory.vocab_size
    dec = factory.create(GuidedDecodingParams(json_object=True))
    assert dec.bitmask().shape == ((vocab + 31) // 32,) and dec.bitmask().dtype == np.int32
    ids = tok.encode('{"a": [1, "x"]}')
    for i, t in enumerate(ids):
        ok = allowed(dec.bitmask(), vocab)
        assert not ok[EOS] and not ok[len(tok):].any()  # EOS before the end; LM-head padding
        assert not ok[:17].any()  # <|endoftext|>, <|im_start|>, ... (special added tokens), even in a string
        assert not dec.is_terminated()
        assert not dec.accept(EOS)  # rejected, state unchanged
        assert dec.accept(t)
    ok = allowed(dec.bitmask(), vocab)
    assert ok[EOS] and ok.sum() == 1 and dec.is_terminated()  # the object is closed: only EOS
    # every model-vocab bit beyond the tokenizer, incl. the unused tail of the last word, stays 0
    assert not np.unpackbits(dec.bitmask().view(np.uint8), bitorder="little")[len(tok):].any()
    assert not dec.accept(ids[0])
    assert dec.accept(EOS) and dec.is_terminated() and not dec.accept(EOS)
    ok = allowed(dec.bitmask(), vocab)  # after the stop token: still a usable (stop-only) mask
    assert ok[EOS] and ok.sum() == 1


def test_bitmask_matches_xgrammar_apply_and_is_fresh(factory, tok):
    import xgrammar as xgr

    dec = factory.create(GuidedDecodingParams(json_schema=SCHEMA))
    for t in tok.encode('{"name": "Al", "age": 7, "color": "'):  # properties in the schema's declared order
        assert dec.accept(t)
    mask = dec.bitmask()
    logits = torch.randn(2, factory.vocab_size)
    ref = logits.clone()
    xgr.apply_token_bitmask_inplace(ref, torch.from_numpy(np.stack([mask, mask])))
    logits.masked_fill_(~allowed(np.stack([mask, mask]), factory.vocab_size), float("-inf"))
    assert torch.equal(logits, ref)
    mask[:] = 0
    assert dec.bitmask().any()  # the caller's copy is its own


def test_rollback(factory, tok):
    dec = factory.create(GuidedDecodingParams(json_schema=SCHEMA))
    ids = tok.encode('{"name": "Al", "age": 31, "color": "red", "tags": ["x')
    masks = []
    for t in ids:
        masks.append(dec.bitmask())
        assert dec.accept(t)
    dec.rollback(3)
    assert np.array_equal(dec.bitmask(), masks[-3])
    for t in ids[-3:]:
        assert dec.accept(t)
    dec.rollback(0)
    with pytest.raises(RuntimeError):
        dec.rollback(len(ids) + 1)


def test_compile_cache(tok):
    f = GuidedDecoderFactory(tok, len(tok), cache_size=2)
    assert f.stop_token_ids == [tok.eos_token_id]
    a = GuidedDecodingParams(json_schema=SCHEMA)
    b = GuidedDecodingParams(json_schema=json.dumps(SCHEMA, indent=1))
    f.validate(a)
    f.create(a), f.create(a)
    assert f.num_compiles == 1
    f.create(b)  # different text (layout): compiled again (the cache is keyed by the schema text)
    assert f.num_compiles == 2
    f.create(GuidedDecodingParams(json_object=True)), f.create(GuidedDecodingParams(json_object=True))
    assert f.num_compiles == 3
    f.create(b)  # still cached (recently used) ...
    assert f.num_compiles == 3
    f.create(a)  # ... but a was evicted (LRU, size 2)
    assert f.num_compiles == 4
    with pytest.raises(InvalidRequestError):
        f.validate(GuidedDecodingParams(json_schema="{not json"))
    assert f.num_compiles == 4


def test_timings(tok, factory, capsys):
    import xgrammar as xgr

    t0 = time.perf_counter()
    f = GuidedDecoderFactory(tok, len(tok) + PAD, stop_token_ids=[EOS])
    t1 = time.perf_counter()
    f.validate(GuidedDecodingParams(json_object=True))
    t2 = time.perf_counter()
    f.validate(GuidedDecodingParams(json_schema=SCHEMA))
    t3 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok) + PAD, stop_token_ids=[EOS])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t4 = time.perf_counter()
    compiler.compile_builtin_json_grammar()
    t5 = time.perf_counter()
    dec, n, fill = f.create(GuidedDecodingParams(json_schema=SCHEMA)), 0, 0.0
    for t in tok.encode('{"name": "Alice Smith", "age": 42, "color": "green", "tags": ["a", "bc"]}'):
        s = time.perf_counter()
        dec.bitmask()
        fill += time.perf_counter() - s
        n += 1
        assert dec.accept(t)
    with capsys.disabled():
        print(f"\n[guided] factory {1e3 * (t1 - t0):.0f} ms, compile json_object {1e3 * (t2 - t1):.1f} ms, "
              f"small schema {1e3 * (t3 - t2):.1f} ms, builtin JSON grammar {1e3 * (t5 - t4):.1f} ms, "
              f"bitmask fill {1e6 * fill / n:.0f} us/token over {n} tokens")


def test_complete_but_extendable_document(factory, tok):
    dec = factory.create(GuidedDecodingParams(json_schema={"type": "integer"}))
    for t in tok.encode("12"):
        assert dec.accept(t)
    ok = allowed(dec.bitmask(), factory.vocab_size)
    assert ok[EOS] and ok[tok.convert_tokens_to_ids("3")]  # "12" is complete, "123" too
    assert not dec.is_terminated()
    assert dec.accept(EOS) and dec.is_terminated()
