"""Scheduling of lossless requests (no torch): draft slots, the draft-length cost model, verification
bookkeeping with a fake runner that accepts a scripted number of drafts."""
import pytest

from cluster.request import ExitPlan
from cluster.core.draft_control import DraftLengthController
from cluster.core.outputs import ModelRunnerOutput, SampledTokens
from tests.test_scheduler import BS, make_req, make_sched

pytestmark = pytest.mark.timeout(60)


def spec_req(rid, k=3, mode="self_speculative", cost=0.2, adaptive=False, **kw):
    req = make_req(rid, **kw)
    req.exit_plan = ExitPlan(mode, 2 if mode == "self_speculative" else None, k, cost, adaptive)
    return req


def run(s, accept):
    """One iteration: every request with drafts gets ``accept(req, k)`` accepted drafts + 1 token."""
    out = s.schedule()
    ro = ModelRunnerOutput()
    for sr in out.scheduled:
        req = s.get_request(sr.request_id)
        k = sr.num_draft_tokens
        assert len(sr.block_table) * BS >= sr.start_position + 1 + k  # slots for the drafts reserved
        if k:
            a = accept(req, k)
            ro.tokens[sr.request_id] = SampledTokens([500 + i for i in range(a + 1)], [2] * a + [6], num_drafts=k)
        elif sr.sample:
            ro.tokens[sr.request_id] = SampledTokens([400], [6])
    s.update(out, ro)
    return out


def test_gain_is_the_geometric_expectation_over_cost():
    g = DraftLengthController.gain
    assert g(0.5, 0, 0.3) == 1.0
    assert g(0.5, 1, 0.0) == pytest.approx(1.5)  # 1 + a tokens for free drafts
    assert g(0.5, 2, 0.25) == pytest.approx((1 + 0.5 + 0.25) / 1.5)
    assert g(1.0, 3, 0.5) == pytest.approx(4 / 2.5)


def test_controller_stops_drafting_when_it_does_not_pay_and_probes_again():
    c = DraftLengthController(probe_every=4, max_probe_every=16)
    req = spec_req("a", k=4, cost=0.3, adaptive=True)
    assert c.num_drafts(req, 4) > 0  # the prior is optimistic: start by drafting
    req.exit_plan = spec = ExitPlan("self_speculative", 2, 4, 0.6, True)
    for _ in range(12):  # k = 1 drafts, one in six accepted: a ~ 0.2, no k pays for c = 0.6
        c.observe(spec, 1, 0)
    c.observe(spec, 1, 1)
    c.observe(spec, 1, 1)
    ks = [c.num_drafts(req, 4) for _ in range(60)]
    # a probing draft after probe_every steps, then twice as long after each probe that does not pay
    assert [i for i, k in enumerate(ks) if k] == [3, 11, 27, 43, 59] and set(ks) == {0, 1}
    other = spec_req("o", k=4, cost=0.6, adaptive=True)  # the estimate is shared by the mode and layer
    assert c.num_drafts(other, 4) == 0
    for _ in range(200):  # a ~ 0.9: drafts pay (best k = 2 at c = 0.6)
        c.observe(spec, 10, 9)
    assert c.num_drafts(req, 4) == 2
    req.exit_plan = ExitPlan("self_speculative", 2, 4, 0.1, True)
    assert c.num_drafts(req, 4) == 4 or c.acceptance(req.exit_plan) < 0.95  # cheap drafts: long ones
    req.exit_plan = spec
    for _ in range(2000):  # paying no more: probing starts again at probe_every, then backs off
        c.observe(spec, 1, 0)
    assert [i for i, k in enumerate(c.num_drafts(req, 4) for _ in range(12)) if k] == [3, 11]
    fixed = spec_req("b", k=3, cost=0.9, adaptive=False)
    assert c.num_drafts(fixed, 3) == 3  # LayerSkip's fixed setting: always k


def test_verified_drafts_only_while_the_measured_gain_beats_the_full_model():
    c = DraftLengthController(probe_every=3)
    v = spec_req("v", k=5, mode="verified", adaptive=True)
    assert c.num_drafts(v, 5) == 5  # prior: 2 tokens per iteration
    for _ in range(50):  # 1.2 tokens per iteration for 0.3 drafts: slower than the full model
        c.observe(v.exit_plan, 1, 1) if _ % 5 == 0 else c.observe(v.exit_plan, 0, 0)
    assert c.verified_gain(v.exit_plan) < 1.0
    assert [c.num_drafts(v, 5) for _ in range(9)] == [0, 0, 5, 0, 0, 0, 0, 0, 5]
    for _ in range(300):  # 3 tokens per iteration
        c.observe(v.exit_plan, 3, 2)
    assert c.verified_gain(v.exit_plan) > 1.0 and c.num_drafts(v, 5) == 5


def test_drafts_reserve_slots_and_count_verified_tokens():
    s = make_sched(num_blocks=64)
    req = spec_req("r", k=3, n_prompt=6, max_tokens=20)
    s.add_request(req)
    run(s, lambda r, k: 0)  # prefill: no drafts yet
    assert req.num_output_tokens == 1
    out = run(s, lambda r, k: 2)
    (sr,) = out.scheduled
    assert sr.num_draft_tokens == 3 and sr.spec is not None and out.num_batched_tokens == 4
    assert req.num_output_tokens == 4 and req.num_computed_tokens == req.num_tokens - 1
    assert (req.num_draft_tokens, req.num_accepted_tokens, req.num_verify_steps, req.num_spec_rejections) == (3, 2, 1, 1)
    run(s, lambda r, k: k)  # all accepted: k + 1 tokens
    assert req.num_output_tokens == 8 and req.num_spec_rejections == 1
    s.block_manager.check_integrity()


def test_drafts_never_pass_max_tokens_and_stop_mid_run():
    s = make_sched()
    req = spec_req("m", k=4, max_tokens=6)
    s.add_request(req)
    while s.has_unfinished_requests():
        room = req.sampling_params.max_tokens - req.num_output_tokens
        out = run(s, lambda r, k: k)
        for sr in out.scheduled:
            assert sr.num_draft_tokens + 1 <= max(1, room)
    assert req.num_output_tokens == 6 and req.finish_reason == "length"
    s2 = make_sched()
    r2 = spec_req("e", k=4, max_tokens=20)
    s2.add_request(r2)
    run(s2, lambda r, k: 0)
    out = s2.schedule()
    ro = ModelRunnerOutput(tokens={"e": SampledTokens([501, 2, 503], [2, 2, 6], num_drafts=4)})
    s2.update(out, ro)
    assert r2.output_token_ids[-2:] == [501, 2] and r2.finish_reason == "stop"  # tokens after EOS dropped
    s2.block_manager.check_integrity()
    assert s2.block_manager.usage == 0.0


def test_no_drafts_when_the_batch_is_large():
    big = make_sched(num_blocks=256, max_num_seqs=16)
    big.spec_max_batch = 2
    reqs = [spec_req(f"b{i}", k=2) for i in range(3)]
    for r in reqs:
        big.add_request(r)
    run(big, lambda r, k: 0)
    out = run(big, lambda r, k: 0)
    assert all(sr.num_draft_tokens == 0 for sr in out.scheduled)  # 3 decodes > spec_max_batch 2
    assert all(sr.full_depth for sr in out.scheduled)  # and no lossy exit either: full depth


# ---------------------------------------------------------------- batch-aware control (issue 17 part 3)
def test_gain_prices_the_verification_rows_by_batch():
    from cluster.core.draft_control import step_cost

    g = DraftLengthController.gain
    assert step_cost(1, 8) == step_cost(8, 8) == 1.0 and step_cost(32, 8) == 4.0
    # batch 1 with k + 1 <= ridge_rows: the classic tokens / (1 + k c)
    assert g(0.5, 2, 0.25, 1, 8) == pytest.approx(g(0.5, 2, 0.25))
    # batch 16, ridge 8: a step is 2 batch-1 steps; 3 drafts: 3 passes of 0.5 * 2 and a verification of 64 rows (8)
    assert g(0.9, 3, 0.5, 16, 8) == pytest.approx((1 - 0.9 ** 4) / 0.1 * 2 / (3 * 0.5 * 2 + 8))
    assert g(1.0, 3, 0.5, 16, 8) < 1.0  # compute-bound: not even perfect drafts pay


def test_controller_drafts_less_as_the_batch_grows_and_never_probes_where_it_cannot_pay():
    c = DraftLengthController(probe_every=4, ridge_rows=8)
    req = spec_req("a", k=4, cost=0.3, adaptive=True)
    for _ in range(300):  # a ~ 0.9
        c.observe(req.exit_plan, 10, 9)
    ks = {b: c.num_drafts(req, 4, batch=b) for b in (1, 2, 4, 16)}
    assert ks[1] >= ks[2] >= ks[4] >= 1 and ks[1] > ks[4], ks
    assert [c.num_drafts(req, 4, batch=16) for _ in range(40)] == [0] * 40  # hopeless at 16: no probe either
    assert c.num_drafts(req, 4, batch=1) == ks[1]  # the batch shrank: drafting resumes at once
    for b in (1, 4):  # the request's num_draft_tokens (k_max) caps k at every batch size
        assert all(c.num_drafts(req, m, batch=b) <= m for m in range(5))
    fixed = spec_req("f", k=3, cost=0.3, adaptive=False)
    assert c.num_drafts(fixed, 3, batch=16) == 3  # a fixed draft length is the request's own choice
    # low acceptance at a batch where drafts could pay: full depth, with backing-off probes
    low = DraftLengthController(probe_every=4, max_probe_every=16, ridge_rows=8)
    for _ in range(50):
        low.observe(req.exit_plan, 1, 0)
    assert [i for i, k in enumerate(low.num_drafts(req, 4, batch=2) for _ in range(30)) if k] == [3, 11, 27]


def test_verified_gain_accounts_for_the_batch():
    c = DraftLengthController(ridge_rows=8)
    v = spec_req("v", k=5, mode="verified", adaptive=True)
    for _ in range(300):  # 3 tokens per iteration for 2 drafts
        c.observe(v.exit_plan, 2, 2)
    assert c.verified_gain(v.exit_plan, 1) > 1.0 and c.num_drafts(v, 5, batch=1) == 5
    assert c.verified_gain(v.exit_plan, 32) < 1.0 and c.num_drafts(v, 5, batch=32) == 0


def test_scheduler_passes_the_iterations_decode_batch():
    s = make_sched(num_blocks=512, max_num_seqs=32)
    s.spec_max_batch = 32
    s.draft_control.ridge_rows = 8
    reqs = [spec_req(f"q{i}", k=3, cost=0.5, adaptive=True) for i in range(16)]
    s.add_request(reqs[0])
    run(s, lambda r, k: 0)
    assert run(s, lambda r, k: k).scheduled[0].num_draft_tokens > 0  # alone: the prior pays
    for r in reqs[1:]:
        s.add_request(r)
    run(s, lambda r, k: k)  # the others' prefill
    for _ in range(3):  # 16 decodes: a verification of 16 (k + 1) rows never pays at ridge 8
        assert all(sr.num_draft_tokens == 0 for sr in run(s, lambda r, k: k).scheduled)
