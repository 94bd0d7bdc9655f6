"""Online choice of ``layer_skip``'s skip set (CLaSp, issue 17 part 2): the dynamic program of
cluster/model/skip_select.py, and serving with ``skip_selection="online"`` on the damped tiny model
(layers 3..6 nearly identity): starting from a bad skip set, the set moves into the damped layers,
acceptance rises, and greedy output stays the full model's."""
from __future__ import annotations

import pytest
import torch

from cluster.config import ExitConfig
from cluster.engine.protocol import InvalidRequestError
from cluster.frontend.outputs import CompletionOutput
from cluster.model.skip_select import RESELECT_EVERY, select_skip_layers, skip_choices
from cluster.request import ExitPlan
from tests.test_spec_decode import (GREEDY, NUM_LAYERS, PROMPTS, _restore_threads, assert_idle, full,  # noqa: F401
                                    make_llm, reference, request, run, spec_totals)

pytestmark = pytest.mark.timeout(300)


def planted_states(L: int, C: int, d: int, small: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """``[L + 1, C, d]`` residual-stream states whose layers ``small`` (1-based) barely change them."""
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(L, C, d, generator=g)
    for i in small:
        deltas[i - 1] *= 0.01
    return torch.cat([torch.randn(1, C, d, generator=g), deltas]).cumsum(0)


def test_dp_finds_the_planted_layers_and_never_the_ends():
    h = planted_states(10, 3, 32, small=(3, 5, 8))
    assert select_skip_layers(h, 3) == (3, 5, 8)
    assert set(select_skip_layers(h, 2)) <= {3, 5, 8}
    # the first and last layers are never chosen, even when they are the smallest updates
    h = planted_states(10, 2, 32, small=(1, 4, 10))
    s = select_skip_layers(h, 2)
    assert 4 in s and 1 not in s and 10 not in s and len(s) == 2
    assert select_skip_layers(h, 8) == tuple(range(2, 10))  # every skippable layer
    assert skip_choices(h, 3).shape == (10, 4) and skip_choices(h, 3).dtype == torch.bool
    for bad in (0, 9):
        with pytest.raises(ValueError, match="never skipped"):
            skip_choices(h, bad)


def test_option_structure():
    assert ExitPlan("layer_skip", num_draft_tokens=2, skip_layers=(2,), skip_selection="online").skip_selection == "online"
    with pytest.raises(ValueError, match="needs mode 'layer_skip'"):
        ExitPlan("self_speculative", 2, 2, skip_selection="online")
    with pytest.raises(ValueError, match="skip_selection must be one of"):
        ExitPlan("layer_skip", num_draft_tokens=2, skip_layers=(2,), skip_selection="dp")
    with pytest.raises(ValueError, match="skip_selection must be one of"):
        ExitConfig(skip_selection="dp")
    from cluster.cli import build_parser
    from deployments.config import ServeArgs
    from deployments.protocol import ChatCompletionRequest

    args = build_parser().parse_args(["generate", "hi", "--exit-mode", "layer_skip", "--skip-selection", "online"])
    assert args.skip_selection == "online"
    assert ServeArgs(exit_mode="layer_skip", skip_selection="online").skip_selection == "online"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = ChatCompletionRequest.model_validate({**body, "early_exit": {"mode": "layer_skip", "skip_selection": "online"}})
    assert req.engine_exit_fields()["skip_selection"] == "online"
    for bad, msg in (({"mode": "layer_skip", "skip_selection": "dp"}, "early_exit.skip_selection: must be one of"),
                     ({"mode": "verified", "skip_selection": "online"}, "only with mode 'layer_skip'")):
        with pytest.raises(Exception, match=msg):
            ChatCompletionRequest.model_validate({**body, "early_exit": bad})


def test_engine_refuses_online_without_room(damped_model_dir):
    llm = make_llm(damped_model_dir, None)
    try:
        for kw, msg in [(dict(exit_mode="self_speculative", skip_selection="online"), "skip_selection: only with mode"),
                        (dict(exit_mode="layer_skip", skip_layers=[1, 2, 3, 4, 5], skip_selection="online"),
                         "at most 4 skipped layers")]:
            with pytest.raises(InvalidRequestError, match=msg):
                llm.engine.add_request(request(llm, PROMPTS[0], **kw))
    finally:
        llm.shutdown()


def test_online_moves_from_a_bad_set_to_the_damped_layers(damped_model_dir, full):
    """From skip set (1, 2) (the layers that decide the token), online selection moves to damped
    layers (3..5) at its first verification; acceptance beats the static bad set; greedy output
    equals the full model for both, alone and batched together (rows of equal sets share a pass)."""
    prompts, params = PROMPTS[:3], GREEDY.model_copy(update={"max_tokens": 40})
    ref = reference(full, prompts, params)
    llm = make_llm(damped_model_dir, ExitConfig(mode="layer_skip", adaptive_drafts=False, spec_max_batch=16))
    spec = llm.engine.workers.local.runner.spec_decoder
    try:
        rates, sets = {}, []
        for sel in ("static", "online"):
            reqs = [request(llm, p, params, skip_layers=[1, 2], skip_selection=sel, num_draft_tokens=3) for p in prompts]
            res = {r.request_id: CompletionOutput(r.request_id, list(r.prompt_token_ids)) for r in reqs}
            for r in reqs:
                llm.engine.add_request(r)
            for _ in range(2000):
                for out in llm.engine.step():
                    res[out.request_id].add(out)
                sets += [tuple(s[0]) for s in spec.online.values()]
                if all(o.finished for o in res.values()):
                    break
            outs = [res[r.request_id] for r in reqs]
            assert [o.token_ids for o in outs] == ref, sel
            rates[sel] = spec_totals(outs)[0]
            assert all(o.num_verify_steps > RESELECT_EVERY for o in outs)  # re-selected twice or more
        assert sets and all(set(s) <= {3, 4, 5} and len(s) == 2 for s in sets), set(sets)
        assert rates["online"] > rates["static"] + 0.3, rates
        run(llm, [request(llm, PROMPTS[0], GREEDY.model_copy(update={"max_tokens": 2}), early_exit=False)])
        assert not spec.online  # finished requests are forgotten (the next iteration tells the ranks)
        assert_idle(llm)
    finally:
        llm.shutdown()


def test_online_tensor_parallel_2(ray_session, damped_model_dir, full):
    """Two ranks (gloo) re-choose the skip set online: rank 0's choice is broadcast, so both ranks
    draft with the same layers (a disagreement would mismatch the ranks' all-reduces and hang or
    garble the drafts). Greedy output equals the full model at size 1, and acceptance rises from
    the bad starting set as it does at size 1."""
    prompts, params = PROMPTS[:2], GREEDY.model_copy(update={"max_tokens": 40})
    ref = reference(full, prompts, params)
    llm = make_llm(damped_model_dir, ExitConfig(mode="layer_skip", adaptive_drafts=False, spec_max_batch=16),
                   tensor_parallel_size=2)
    try:
        rates = {}
        for sel in ("static", "online"):
            outs = run(llm, [request(llm, p, params, skip_layers=[1, 2], skip_selection=sel, num_draft_tokens=3)
                             for p in prompts])
            assert [o.token_ids for o in outs] == ref, sel
            assert all(o.num_verify_steps > RESELECT_EVERY for o in outs)
            rates[sel] = spec_totals(outs)[0]
        assert rates["online"] > rates["static"] + 0.3, rates
        assert_idle(llm)
    finally:
        llm.shutdown()
