"""Lossless ``layer_skip`` (issue 17, SWIFT-style self-speculation): drafts from the model with a set of
decoder layers left out, verified by the full model in the iteration's one forward. Greedy output ==
the full model's token for token, alone and under continuous batching with every other mode, prefix
caching, chunked prefill, preemption, aborts and tensor parallelism; speculative sampling keeps the
full model's distribution.

The model is ``damped_model_dir`` (conftest): layers 3..6 of the tiny Llama barely change the hidden
state, so skipping layers 3, 4, 5 makes drafts that the full model mostly accepts, while skipping
layers 1, 2 (the ones that decide the token) makes drafts it mostly rejects.
"""
from __future__ import annotations


import pytest

from cluster import SamplingParams
from cluster.config import ExitConfig
from cluster.engine.protocol import EngineRequest, InvalidRequestError
from cluster.request import ExitPlan, default_skip_layers
from tests.test_spec_decode import (GREEDY, NUM_LAYERS, PROMPTS, _restore_threads, assert_idle, exits,  # noqa: F401
                                    full, make_llm, reference, request, run, run_with_aborts, spec_totals)

pytestmark = pytest.mark.timeout(300)

GOOD = (3, 4, 5)  # the damped layers (the last one, 6, is never skipped)
BAD = (1, 2)  # the layers that decide the token


def skip_exits(**kw) -> ExitConfig:
    """``exits()`` of tests/test_spec_decode.py (exit layers 2, 4; fixed draft lengths) in ``layer_skip`` mode."""
    return exits(mode="layer_skip", skip_layers=GOOD, **kw)


# --------------------------------------------------------------------------------------------- units
def test_plan_and_config_structure():
    """ExitPlan: layer_skip needs a sorted, unique, non-empty skip set and no draft layer; no other
    mode takes one. The default rule: every other layer of the middle half, never the last."""
    plan = ExitPlan("layer_skip", num_draft_tokens=3, skip_layers=(2, 4))
    assert plan.is_lossless and plan.skip_layers == (2, 4)
    for bad in [dict(skip_layers=()), dict(skip_layers=(4, 2)), dict(skip_layers=(2, 2)), dict(skip_layers=(0, 2)),
                dict(skip_layers=(2,), draft_layer=1)]:
        with pytest.raises(ValueError):
            ExitPlan("layer_skip", num_draft_tokens=3, **bad)
    with pytest.raises(ValueError, match="skip_layers need mode 'layer_skip'"):
        ExitPlan("self_speculative", draft_layer=2, num_draft_tokens=3, skip_layers=(2,))
    assert default_skip_layers(6) == (2, 4)
    assert default_skip_layers(30) == (8, 10, 12, 14, 16, 18, 20, 22)
    assert default_skip_layers(2) == (1,) and default_skip_layers(1) == ()
    assert all(default_skip_layers(n)[-1] < n for n in range(2, 80))
    # an exit config without exit layers allows layer_skip; its skip set must stay below the last layer
    assert ExitConfig(mode="layer_skip").skip_layers == ()
    with pytest.raises(ValueError):
        ExitConfig(skip_layers=(3, 2))
    with pytest.raises(ValueError, match="never skipped"):
        ExitConfig(skip_layers=(2, 6)).validate_for(6)


def test_cli_and_serve_args_take_skip_layers():
    from cluster.cli import build_parser
    from deployments.config import ServeArgs

    args = build_parser().parse_args(["generate", "hi", "--exit-mode", "layer_skip", "--skip-layers", "3", "5", "7"])
    assert args.exit_mode == "layer_skip" and args.skip_layers == [3, 5, 7]
    for given in ("3,5,7", "3 5 7", "[3, 5, 7]", [3, 5, 7]):
        assert ServeArgs(exit_mode="layer_skip", skip_layers=given).skip_layers == (3, 5, 7)
    assert ServeArgs(skip_layers="").skip_layers is None
    with pytest.raises(ValueError, match="skip_layers: needs early_exit true"):
        ServeArgs(early_exit=False, skip_layers="3")


# --------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("config", ["exits", "no_exit_layers"])
def test_batch_1_equals_full_model(damped_model_dir, full, config):
    """Alone (batch 1), with exit heads and with an exit config without exit layers (the final norm
    and the LM head draft): greedy layer_skip == the full model, most drafts accepted; an accepted
    draft reports the layers its draft ran (L - |S|)."""
    ec = skip_exits() if config == "exits" else ExitConfig(mode="layer_skip", skip_layers=GOOD, adaptive_drafts=False)
    ref = reference(full, PROMPTS[:3], GREEDY)
    llm = make_llm(damped_model_dir, ec)
    try:
        outs = [run(llm, [request(llm, p)])[0] for p in PROMPTS[:3]]
        assert [o.token_ids for o in outs] == ref
        acc, tpv = spec_totals(outs)
        assert acc > 0.5 and tpv > 2.0, (acc, tpv)
        kept = NUM_LAYERS - len(GOOD)
        assert all(set(o.exit_layers) <= {kept, NUM_LAYERS} for o in outs)
        assert sum(l < NUM_LAYERS for o in outs for l in o.exit_layers) == sum(o.num_accepted_tokens for o in outs)
        assert_idle(llm)
    finally:
        llm.shutdown()


def test_skip_set_decides_acceptance(damped_model_dir, full):
    """A request's own skip set is used: skipping the damped layers is accepted often, skipping the
    first layers rarely; the default rule (2, 4 of 6) works without any skip set configured. All equal
    the full model."""
    ref = reference(full, PROMPTS[:2], GREEDY)
    llm = make_llm(damped_model_dir, exits(spec_max_batch=16))
    try:
        rates = {}
        for name, skip in (("good", list(GOOD)), ("bad", list(BAD)), ("default", None)):
            outs = run(llm, [request(llm, p, exit_mode="layer_skip", skip_layers=skip) for p in PROMPTS[:2]])
            assert [o.token_ids for o in outs] == ref, name
            rates[name] = spec_totals(outs)[0]
        assert rates["good"] > 0.5 and rates["bad"] < 0.3, rates
        assert_idle(llm)
    finally:
        llm.shutdown()


def test_bad_skip_layers_are_refused(damped_model_dir):
    """The engine names ``early_exit.skip_layers``: out of range, empty, the last layer, another mode."""
    llm = make_llm(damped_model_dir, None)
    try:
        for kw, msg in [(dict(exit_mode="layer_skip", skip_layers=[0, 2]), r"skip_layers: each must be in \[1, 5\]"),
                        (dict(exit_mode="layer_skip", skip_layers=[9]), r"skip_layers: each must be in \[1, 5\]"),
                        (dict(exit_mode="layer_skip", skip_layers=[]), "skip_layers: must name at least one"),
                        (dict(exit_mode="layer_skip", skip_layers=[3, NUM_LAYERS]), "last layer, 6, is never"),
                        (dict(exit_mode="self_speculative", skip_layers=[3]), "skip_layers: only with mode"),
                        (dict(exit_mode="layer_skip", draft_layer=2), "draft_layer: only with mode")]:
            with pytest.raises(InvalidRequestError, match=msg) as e:
                llm.engine.add_request(request(llm, PROMPTS[0], **kw))
            assert e.value.param == "early_exit" and e.value.message.startswith("early_exit.")
        assert not llm.engine.has_unfinished_requests()
        assert_idle(llm)
    finally:
        llm.shutdown()


# --------------------------------------------------------------------------------------------- 2
MIXED = ["layer_skip", "verified", "self_speculative", "layer_skip-bad", "paper", "full"]


def test_mixed_batch_prefix_cache_chunked_prefill_preemption(damped_model_dir, full):
    """layer_skip requests (two skip sets) decode in the same iterations as verified,
    self_speculative, lossy and full-model requests, with a shared prefix (prefix cache hits), prompts
    longer than the 16-token budget (chunked prefill) arriving while others draft, and a KV cache small
    enough to preempt. Every lossless and full request equals the full model."""
    prefix = ("You are a helpful assistant. Answer briefly and precisely, and never repeat the "
              "question. Here is the question: ")
    prompts = [prefix + t for t in ("Why is the sky blue?", "What is a volcano?", "How do bees fly?",
                                    "Name a river.", "Why do cats purr at night?", "What is glass made of?",
                                    "Where do rivers end?", "Why is snow white?")]
    params = [SamplingParams(max_tokens=24 + 2 * (i % 3), ignore_eos=True) for i in range(len(prompts))]
    ref = reference(full, prompts, params)
    llm = make_llm(damped_model_dir, skip_exits(spec_max_batch=16), num_blocks=28, max_num_batched_tokens=16)
    try:
        assert len(llm.processor.tokenize(prompts[0])) > 16
        kinds = [MIXED[i % len(MIXED)] for i in range(len(prompts))]

        def req(i):
            kind, p, sp = kinds[i], prompts[i], params[i]
            if kind == "full":
                return request(llm, p, sp, early_exit=False)
            if kind == "paper":
                return request(llm, p, sp, exit_mode="paper")
            if kind == "layer_skip-bad":
                return request(llm, p, sp, exit_mode="layer_skip", skip_layers=[2, 4], num_draft_tokens=2)
            return request(llm, p, sp, exit_mode=kind)

        outs = run(llm, [req(0), req(1), req(2)], {4: [req(3), req(4)], 9: [req(i) for i in range(5, len(prompts))]})
        order = [0, 1, 2, 3, 4] + list(range(5, len(prompts)))
        sched = llm.engine.scheduler
        assert sched.num_preemptions > 0
        assert sched.block_manager.prefix_cache_hits > 0
        skipping = []
        for i, o in zip(order, outs):
            kind = kinds[i]
            assert len(o.token_ids) == params[i].max_tokens
            if kind != "paper":
                assert o.token_ids == ref[i], kind
            if kind.startswith("layer_skip"):
                skipping.append(o)
                assert o.num_verify_steps > 0
        acc, tpv = spec_totals(skipping)
        assert acc > 0.3 and tpv > 1.5, (acc, tpv)
        assert_idle(llm)
    finally:
        llm.shutdown()


# --------------------------------------------------------------------------------------------- 3
def test_aborts_during_drafting(damped_model_dir, full):
    """One request is aborted while the iteration that drafts and verifies for it runs (between
    ``schedule()`` and ``update()``), another between iterations after it verified twice: their
    blocks (the drafts' reserved slots included) are freed; the others go on unchanged."""
    ref = reference(full, PROMPTS[:4], GREEDY)
    llm = make_llm(damped_model_dir, skip_exits())
    reqs = [request(llm, p) for p in PROMPTS[:4]]
    in_flight, between = reqs[1].request_id, reqs[3].request_id
    try:
        res, hit, aborted = run_with_aborts(llm, reqs, in_flight, between)
        assert hit and aborted
        for r, want in zip(reqs, ref):
            o = res[r.request_id]
            if r.request_id in (in_flight, between):
                assert not o.finished and 0 < len(o.token_ids) < GREEDY.max_tokens
                assert o.token_ids == want[:len(o.token_ids)]  # what it streamed was verified
            else:
                assert o.finished and o.token_ids == want
        assert_idle(llm)
    finally:
        llm.shutdown()


# --------------------------------------------------------------------------------------------- 4
def test_tensor_parallel_2(ray_session, damped_model_dir, full):
    """Two ranks (gloo): greedy layer_skip == the full model at size 1; seeded sampled requests draft
    on both ranks in step (rank 0 draws and broadcasts)."""
    prompts = PROMPTS[:3]
    ref = reference(full, prompts, GREEDY)
    llm = make_llm(damped_model_dir, skip_exits(spec_max_batch=16), tensor_parallel_size=2)
    try:
        reqs = [request(llm, p) for p in prompts]
        sampled = [request(llm, prompts[0], SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True))
                   for s in range(2)]
        outs = run(llm, reqs + sampled)
        assert [o.token_ids for o in outs[:3]] == ref
        acc, tpv = spec_totals(outs[:3])
        assert acc > 0.5 and tpv > 2.0, (acc, tpv)
        assert all(len(o.token_ids) == 12 and o.num_verify_steps > 0 for o in outs[3:])
        assert_idle(llm)
    finally:
        llm.shutdown()


# --------------------------------------------------------------------------------------------- 5
NUM_SAMPLES = 384
SAMPLING_SKIP = (2,)  # about 1 in 5 sampled drafts accepted here: both branches of the rule run often


def test_speculative_sampling_matches_full_model(damped_model_dir):
    """The 2nd generated token (the first one speculation produces: drafted by the model without
    layer 2, accepted with probability min(1, p/q), else redrawn from norm(max(0, p - q))) of
    ``NUM_SAMPLES`` seeded requests at temperature 1 vs the full model's exact marginal (transformers).

    Bound (as in tests/test_spec_sampling.py): bins = tokens with exact probability >= 0.01 plus one
    for the rest; E[TV_binned] <= 1/2 sum_b sqrt(p_b (1 - p_b) / N) and (McDiarmid) TV exceeds it by
    t = sqrt(ln(1000) / 2N) with probability <= 0.001; the first-token mass the exact sum leaves out is
    added. N = 384: about 0.19 (measured: 0.08). The drafts must be both accepted and rejected (else the acceptance
    rule is not exercised)."""
    from tests.test_spec_sampling import exact_second_token, sample_second_tokens, second_token_tv

    ec = exits(mode="layer_skip", skip_layers=SAMPLING_SKIP, num_draft_tokens=2, spec_max_batch=64)
    prompt, outs = sample_second_tokens(damped_model_dir, ec, NUM_SAMPLES)
    acc, _ = spec_totals(outs)
    assert 0.05 < acc < 0.95, acc
    kept = NUM_LAYERS - len(SAMPLING_SKIP)
    assert {o.exit_layers[1] for o in outs} == {kept, NUM_LAYERS}  # accepted and redrawn second tokens

    p2, left_out = (lambda ex: (ex.p2, ex.left_out))(exact_second_token(damped_model_dir, prompt, 1))
    b = second_token_tv(outs, p2, left_out)
    p, tv, bound = b.p, b.tv, b.bound
    counts = [round(x * NUM_SAMPLES) for x in b.emp]
    assert bound < 0.25, bound
    assert tv <= bound, (tv, bound, counts, p)


# --------------------------------------------------------------------------------------------- 6
def test_no_tensor_without_device(damped_model_dir):
    """Under ``debug_default_device="meta"`` (tests/test_device.py: a tensor made without a device
    fails, as it would beside a CUDA model) layer_skip drafting, greedy and sampled, gives the tokens
    of a normal run."""
    params = [GREEDY, SamplingParams(max_tokens=16, temperature=0.8, top_k=40, seed=3, ignore_eos=True)]
    got = {}
    for debug in (None, "meta"):
        llm = make_llm(damped_model_dir, skip_exits(spec_max_batch=16), debug_default_device=debug)
        try:
            outs = run(llm, [request(llm, PROMPTS[0], params[0]), request(llm, PROMPTS[1], params[1])])
            assert all(o.error is None and o.num_verify_steps > 0 for o in outs)
            got[debug] = [(o.token_ids, o.exit_layers) for o in outs]
        finally:
            llm.shutdown()
    assert got["meta"] == got[None]


# --------------------------------------------------------------------------------------------- 7
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_model_equals_full_model(default_model_dir):
    """The default model (float weights, its shipped exit config, never trained to skip layers):
    layer_skip with the default skip set (every other layer of the middle half: 8 of 30) and fixed
    draft lengths equals the full model token for token, beside a verified request; the
    acceptance is reported, not asserted (SWIFT searches its skip set; this rule does not)."""
    import dataclasses

    from cluster import LLM
    from cluster.llm import model_exit_config

    shipped = model_exit_config(default_model_dir, 30)
    llm = LLM(default_model_dir, quantization="none", num_blocks=64,
              early_exit=dataclasses.replace(shipped, spec_max_batch=16, adaptive_drafts=False))
    try:
        chats = ["Write a haiku about rain.", "What are the three largest planets in the solar system?"]
        ids = [llm.apply_chat_template([{"role": "user", "content": c}]) for c in chats]
        sp = SamplingParams(max_tokens=16, ignore_eos=True)
        full = [o.token_ids for o in llm.generate(ids, sp, exit_threshold=2.0)]
        outs = run(llm, [EngineRequest(request_id="dm-skip", prompt_token_ids=ids[0], sampling_params=sp,
                                       exit_mode="layer_skip", num_draft_tokens=3),
                         EngineRequest(request_id="dm-verified", prompt_token_ids=ids[1], sampling_params=sp,
                                       exit_mode="verified")])
        assert [o.token_ids for o in outs] == full
        assert outs[0].num_verify_steps > 0
        print("default model layer_skip acceptance:", spec_totals(outs[:1]))
        llm.engine.check_integrity()
    finally:
        llm.shutdown()
