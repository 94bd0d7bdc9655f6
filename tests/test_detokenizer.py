"""IncrementalDetokenizer: streamed deltas add up to ``tokenizer.decode`` (cut at the first stop string),
never carry a replacement character the final text lacks, and cost O(new tokens) per step."""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.engine.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def stream(tok, ids, sizes=(1,), stop=(), skip=True, finish_separately=False, prompt=(1,)):
    """Feed ``ids`` in chunks (sizes cycled), the last with finished=True (or an extra empty update).
    Stops feeding at a stop hit, as the engine does. Returns (detokenizer, deltas, stop hit)."""
    det = IncrementalDetokenizer(tok, list(prompt), stop=stop, skip_special_tokens=skip)
    deltas, hit, i, k = [], None, 0, 0
    while True:
        n = sizes[k % len(sizes)]
        k += 1
        chunk = ids[i:i + n]
        i += n
        last = i >= len(ids)
        delta, hit = det.update(chunk, finished=last and not finish_separately)
        deltas.append(delta)
        if hit is not None or last:
            break
    if hit is None and finish_separately:
        deltas.append(det.update([], finished=True)[0])
    assert det.update([5, 6], finished=True) == ("", None)  # finished: inert, records nothing
    assert det.text == "".join(deltas)
    return det, deltas, hit


def expected(tok, ids, stop=(), skip=True):
    """``tokenizer.decode`` without a trailing incomplete character (U+FFFD), cut before the earliest
    stop-string occurrence; (text, stops found there)."""
    full = tok.decode(ids, skip_special_tokens=skip).rstrip(FFFD)
    at = min([full.find(s) for s in stop if s and s in full], default=-1)
    if at < 0:
        return full, set()
    return full[:at], {s for s in stop if s and full.find(s) == at}


PIECES = ["👩‍👩‍👧‍👦", "👨‍💻", "🏳️‍🌈", "🇫🇷", "🇯🇵", "👍🏽", "👋🏿", "e\u0301", "n\u0303", "a\u0308\u0304",
          "שלום", "مرحبا بالعالم", "中国", "上海", "東京", "한국어", "1. Shanghai: ", " ", "\n\n", "...", "!?"]
ALPHABETS = [st.characters(min_codepoint=a, max_codepoint=b) for a, b in [
    (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x0300, 0x036F), (0x0590, 0x05FF), (0x0600, 0x06FF),
    (0x20, 0x7E), (0xAC00, 0xD7A3)]]
unicode_texts = st.lists(st.one_of(st.sampled_from(PIECES), *[st.text(a, min_size=1, max_size=6) for a in ALPHABETS]),
                         min_size=1, max_size=12).map("".join)
chunk_sizes = st.lists(st.integers(1, 5), min_size=1, max_size=6)


@pytest.mark.timeout(600)
@PROPS
@given(text=unicode_texts, sizes=chunk_sizes, finish_separately=st.booleans())
def test_unicode_roundtrip_without_replacement_chars(tok, text, sizes, finish_separately):
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    assert FFFD not in full
    for sz in ((1,), tuple(sizes)):
        det, deltas, hit = stream(tok, ids, sz, finish_separately=finish_separately)
        assert hit is None and "".join(deltas) == full and det.output_token_ids == ids
        assert not any(FFFD in d for d in deltas)


@pytest.mark.timeout(600)
@PROPS
@given(data=st.data(), skip=st.booleans(), sizes=chunk_sizes)
def test_random_token_ids(tok, data, skip, sizes):
    """Arbitrary ids (byte tokens forming invalid UTF-8, special tokens): deltas add up to decode()
    without the trailing incomplete character."""
    ids = data.draw(st.lists(st.one_of(st.integers(0, len(tok) - 1), st.integers(0, 20), st.integers(17, 300)),
                             max_size=40))
    full = tok.decode(ids, skip_special_tokens=skip).rstrip(FFFD)
    for sz in ((1,), tuple(sizes)):
        det, deltas, hit = stream(tok, ids, sz, skip=skip)
        assert "".join(deltas) == full and det.output_token_ids == ids
        if FFFD not in full:
            assert not any(FFFD in d for d in deltas)


@pytest.mark.timeout(600)
@PROPS
@given(data=st.data(), sizes=chunk_sizes)
def test_random_stop_strings(tok, data, sizes):
    """Stops drawn from the decoded text (so they hit, across token boundaries) and random ones."""
    text = data.draw(unicode_texts)
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    subs = st.tuples(st.integers(0, len(full)), st.integers(1, 6)).map(lambda t: full[t[0]:t[0] + t[1]])
    stop = data.draw(st.lists(st.one_of(subs, st.text(min_size=1, max_size=4)), min_size=1, max_size=4))
    stop = [s for s in stop if FFFD not in s]
    det, deltas, hit = stream(tok, ids, tuple(sizes), stop=stop)
    want, at_stops = expected(tok, det.output_token_ids, stop)
    assert det.text == want
    assert (hit is None) == (not at_stops) and (hit is None or hit in at_stops)
    if hit is not None:  # the engine stopped early: all of want must be visible
        assert "".join(deltas) == want


@pytest.mark.timeout(120)
def test_bug_example_paris(tok):
    ids = tok.encode(" Paris.\n\nThe answer", add_special_tokens=False)
    for sizes in ((1,), (2,), (len(ids),)):
        det, deltas, hit = stream(tok, ids, sizes, stop=["\n\n"])
        assert hit == "\n\n" and "".join(deltas) == " Paris." and det.text == " Paris."


@pytest.mark.timeout(120)
def test_garbled_chinese_regression(tok):
    text = "1. Shanghai: 中国上海市\n2. Beijing: 北京 🏙️👩‍👩‍👧‍👦"
    ids = tok.encode(text, add_special_tokens=False)
    det, deltas, hit = stream(tok, ids)
    assert "".join(deltas) == text and not any(FFFD in d for d in deltas)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop,want,hit", [
    (["answer"], " Paris.\n\nThe ", "answer"),                 # multi-token stop string
    ([" Paris"], "", " Paris"),                               # at the very start
    (["."], " Paris", "."),                                   # single token
    (["s.\n"], " Pari", "s.\n"),                              # spans token boundaries
    (["The answer is"], " Paris.\n\nThe answer", None),       # prefix emitted text, never completes: flushed
    (["answer", "\n\nThe", "."], " Paris", "."),              # earliest occurrence wins, not list order
    (["The", "\n\nThe"], " Paris.", "\n\nThe"),
])
def test_stop_strings(tok, stop, want, hit):
    ids = tok.encode(" Paris.\n\nThe answer", add_special_tokens=False)
    for finish_separately in (False, True):
        det, deltas, got = stream(tok, ids, stop=stop, finish_separately=finish_separately)
        assert (got, "".join(deltas)) == (hit, want)
        assert (det.text, {got} if got else set()) == expected(tok, det.output_token_ids, stop)


@pytest.mark.timeout(120)
def test_holds_back_partial_stop_then_releases(tok):
    det = IncrementalDetokenizer(tok, [1], stop=["\n\nUser:"])
    ids = tok.encode("Hi\n\nUs", add_special_tokens=False)
    assert det.update(ids, finished=False) == ("Hi", None)  # "\n\nUs" could start the stop string
    assert det.update(tok.encode("ual", add_special_tokens=False), finished=False) == ("\n\nUsual", None)
    det = IncrementalDetokenizer(tok, [1], stop=["\n\nUser:"])
    assert det.update(ids, finished=False) == ("Hi", None)
    assert det.update([], finished=True) == ("\n\nUs", None)  # flushed at finish


@pytest.mark.timeout(120)
def test_incomplete_character_at_finish_and_prompt_not_used(tok):
    ids = tok.encode("ok 🚀", add_special_tokens=False)  # 'ok', ' ' + byte 1, byte 2, byte 3 of 🚀
    assert len(ids) == 4
    det = IncrementalDetokenizer(tok, [1, 2, 3], stop=["x"])
    assert det.update(ids[:-1], finished=False)[0] == "ok"  # " " + the first bytes of 🚀 are withheld
    last, _ = det.update([], finished=True)  # finished mid-character: the incomplete character is dropped
    assert tok.decode(ids[:-1]).endswith(FFFD) and det.text == tok.decode(ids[:-1]).rstrip(FFFD) == "ok "
    assert FFFD not in det.text
    # the prompt is not context: a character split between prompt and output is not completed by it
    det, deltas, _ = stream(tok, ids[-1:], prompt=ids[:-1])
    assert det.text == tok.decode(ids[-1:]).rstrip(FFFD)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("Hello", add_special_tokens=False) + [tok.eos_token_id]
    det, deltas, _ = stream(tok, ids, skip=skip)
    assert det.text == ("Hello" if skip else "Hello" + tok.eos_token)


@pytest.mark.timeout(120)
def test_invalid_prefix_error_recovers(tok):
    ids = tok.encode("a 中国 b", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [1])
    out = det.update(ids[:2], finished=False)[0]

    class Broken:
        def step(self, *a):
            raise Exception("Invalid prefix encountered")

    det._stream = Broken()
    out += det.update(ids[2:4], finished=False)[0]
    out += det.update(ids[4:], finished=True)[0]
    assert out == tok.decode(ids)


@pytest.mark.timeout(300)
def test_long_output_cost_is_per_step(tok):
    text = " ".join(f"Item {i}: 上海 is a city 🚀 with e\u0301 {i * 7}.\n" for i in range(600))
    ids = tok.encode(text, add_special_tokens=False)[:2000]
    assert len(ids) == 2000
    stop = ["\n\nUser:", "###", "🚀 with x"]
    full = tok.decode(ids)

    def run():
        det = IncrementalDetokenizer(tok, [1], stop=stop)
        steps = []
        for i in ids:
            before = det.chars_examined
            steps.append((det.update([i], finished=False)[0], det.chars_examined - before))
        return det, steps

    det, steps = run()
    assert det.text + det.update([], finished=True)[0] == full
    hold = max(map(len, stop)) - 1
    # counting: each step's stop search looks at its new text plus the held-back tail only
    assert det.chars_examined <= len(full) + hold * len(ids)
    assert all(n <= len(d) + 2 * hold for d, n in steps)
    # timing, loosely (shared machine): the whole stream costs a small multiple of one full decode
    # (re-decoding the whole output at every step measured ~850x here)
    t_full = min(_timed(lambda: tok.decode(ids)) for _ in range(5))
    t_stream = min(_timed(run) for _ in range(3))
    assert t_stream < 300 * t_full, (t_stream, t_full)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
