"""The diff-based step protocol (issue 18 part 2): each rank's persistent request state
(:class:`cluster.worker.persistent_batch.PersistentBatch`) equals the scheduler's view after every
iteration, through preemption and resume, prefix-cache hits, chunked prefill, aborts (between and
during iterations, with the id reused) and spec-decode rollback; the per-step checksum catches a
rank that diverged; a request's prompt and sampling params travel once.
"""
from __future__ import annotations

import pytest

from cluster import LLM, ExitConfig, SamplingParams
from cluster.core.step_message import StepEncoder, StepMessage
from tests.test_spec_decode import GREEDY, exits, full, make_llm, reference, request  # noqa: F401

pytestmark = pytest.mark.timeout(300)

EE = ExitConfig(exit_layers=(1, 2, 3, 4, 5), threshold=0.6)
PREFIX = "You are a helpful assistant. " * 3
PROMPTS = [PREFIX + f"Once upon a time in city number {i}, a traveller" + " and then" * i for i in range(8)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def use_diff(llm: LLM) -> LLM:
    """The in-process rank gets the diff, with the checksum (the engine sends the diff to remote
    ranks only: test_tensor_parallel runs that path over Ray)."""
    assert not llm.engine.scheduler.has_unfinished_requests()
    llm.engine.scheduler.encoder = StepEncoder(checksum=True)
    return llm


def assert_rank_matches(llm: LLM) -> None:
    """The in-process rank's state equals the scheduler's: every unfinished request it holds has the
    scheduler's tokens (a prefix: this iteration's new tokens come with the next message), block table, sampling params and exit plan; every running
    request is held."""
    eng = llm.engine
    sched, batch = eng.scheduler, eng.workers.local.runner.batch
    held = set()
    for st in batch.requests.values():
        req = sched.get_request(st.request_id)
        if req is None:
            continue  # finished in this iteration's update: dropped with the next message
        held.add(req.request_id)
        assert st.token_ids == req.all_token_ids[:len(st.token_ids)]
        assert st.block_table == sched.block_manager.get_block_table(req.request_id), req.request_id
        assert st.sampling_params == req.sampling_params and st.exit_plan == req.exit_plan
    assert {r.request_id for r in sched.running} <= held


def record_messages(llm: LLM) -> list[StepMessage]:
    """Every message the in-process rank receives, from now on."""
    runner = llm.engine.workers.local.runner
    seen, execute_step = [], runner.execute_step

    def recorded(msg):
        seen.append(msg)
        return execute_step(msg)

    runner.execute_step = recorded
    return seen


def drive(llm: LLM, max_steps: int = 5000, each=None) -> dict[str, list[int]]:
    """Step until idle, checking the rank after every step; returns tokens by request id."""
    eng, toks = llm.engine, {}
    for _ in range(max_steps):
        for o in eng.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert_rank_matches(llm)
        eng.check_integrity()
        if each is not None:
            each()
        if not eng.has_unfinished_requests():
            break
    return toks


def test_rank_follows_preemption_resume_and_prefix_hits(tiny_model_dir):
    """24 blocks x 4 tokens cannot hold 8 sequences of ~60 tokens: preemption by recompute, resumed
    with new tables; the shared prefix hits the prefix cache; the 16-token budget chunks prefills.
    Outputs equal a run with room for everyone; the rank holds nothing once the last finish is sent."""
    # the full model: a recomputed row's KV then equals its first computation (an exit's KV fill would not)
    roomy = LLM(tiny_model_dir, early_exit=None, block_size=4, enable_prefix_caching=False)
    want = [o.token_ids for o in roomy.generate(PROMPTS, greedy(16))]
    roomy.shutdown()
    llm = use_diff(LLM(tiny_model_dir, early_exit=None, block_size=4, num_blocks=24, max_num_batched_tokens=16))
    try:
        msgs = record_messages(llm)
        ids = [llm.add_request(p, greedy(16)) for p in PROMPTS]
        toks = drive(llm)
        assert [toks[i] for i in ids] == want
        sched = llm.engine.scheduler
        assert sched.num_preemptions > 0 and sched.block_manager.prefix_cache_hits > 0
        assert any(m.resumed for m in msgs) and any(m.preempted for m in msgs)
        assert all(m.checksum is not None for m in msgs if m.handles)
        # prompt and sampling params once per request, however often it was preempted
        assert sorted(nr.request_id for m in msgs for nr in m.new_reqs) == sorted(ids)
        llm.engine.step()  # sends the last finishes
        assert llm.engine.workers.local.runner.batch.requests == {}
    finally:
        llm.shutdown()


def test_decode_steps_send_no_table_and_no_params(tiny_model_dir):
    """Without preemption each block id travels once; a decode step carries one token per request."""
    llm = use_diff(LLM(tiny_model_dir, early_exit=EE, block_size=4))
    try:
        msgs = record_messages(llm)
        ids = [llm.add_request(p, greedy(12)) for p in PROMPTS[:3]]
        sent: dict[int, list[int]] = {}
        final: dict[str, list[int]] = {}

        def snapshot():
            bm = llm.engine.scheduler.block_manager
            for rid in ids:
                if bm.get_block_table(rid):
                    final[rid] = list(bm.get_block_table(rid))

        drive(llm, each=snapshot)
        for m in msgs:
            for h, blocks in m.new_block_ids.items():
                sent.setdefault(h, []).extend(blocks)
        handles = {nr.request_id: nr.handle for m in msgs for nr in m.new_reqs}
        assert {rid: sent[handles[rid]] for rid in ids} == final
        decodes = [m for m in msgs if m.handles and not m.new_reqs and all(n == 1 for n in m.num_scheduled_tokens)]
        assert decodes and all(len(t) == 1 for m in decodes for t in m.new_token_ids)
    finally:
        llm.shutdown()


def test_abort_mid_decode_and_id_reuse(tiny_model_dir):
    """Aborts between iterations and while one runs (between schedule() and update()) drop the
    rank's state with the next message; the id reused afterwards is a new request on the rank."""
    llm = LLM(tiny_model_dir, early_exit=EE, block_size=4)
    eng = llm.engine
    try:
        want = [o.token_ids for o in llm.generate(PROMPTS[:3], greedy(20))]
        use_diff(llm)
        for i, p in enumerate(PROMPTS[:3]):
            llm.add_request(p, greedy(20), request_id=f"r{i}")
        for _ in range(6):
            eng.step()
            assert_rank_matches(llm)
        eng.abort_request("r0")
        run_model, hit = eng.workers.execute_model, []

        def execute_then_abort(so):
            out = run_model(so)
            if not hit:
                hit.append(True)
                eng.abort_request("r1")
            return out

        eng.workers.execute_model = execute_then_abort
        try:
            eng.step()
        finally:
            eng.workers.execute_model = run_model
        eng.step()
        held = {st.request_id for st in eng.workers.local.runner.batch.requests.values()}
        assert held == {"r2"}
        llm.add_request(PROMPTS[0], greedy(20), request_id="r0")  # the aborted id again
        toks = drive(llm)
        assert toks["r0"] == want[0]
        assert eng.scheduler.block_manager.usage == 0.0
    finally:
        llm.shutdown()


def test_spec_decode_rollback_keeps_rank_in_step(damped_model_dir, full):
    """Rejected drafts roll ``num_computed_tokens`` back on the scheduler (rank 0 decided it); the
    rank takes the scheduler's position and tokens every iteration. Output = the full model's."""
    ref = reference(full, ["The history of the Roman Empire", "def fibonacci(n):"], GREEDY)
    llm = use_diff(make_llm(damped_model_dir, exits(mode="self_speculative")))
    try:
        msgs = record_messages(llm)
        reqs = [request(llm, p) for p in ["The history of the Roman Empire", "def fibonacci(n):"]]
        for r in reqs:
            llm.engine.add_request(r)
        rejected = []

        def note_rejections():
            rejected.extend(r.num_spec_rejections for r in llm.engine.scheduler.running)

        toks = drive(llm, each=note_rejections)
        assert [toks[r.request_id] for r in reqs] == ref
        assert any(m.num_draft_tokens for m in msgs) and max(rejected) > 0, "no draft was rejected"
    finally:
        llm.shutdown()


def test_in_process_rank_reads_the_whole_output(tiny_model_dir, monkeypatch):
    """TP 1 in process: no diff is built (the rank shares the scheduler's memory) and the rank holds
    no state of its own."""
    monkeypatch.delenv("EESERVE_STEP_DIFF", raising=False)
    llm = LLM(tiny_model_dir, early_exit=EE, block_size=4)
    try:
        assert llm.engine.scheduler.encoder is None
        llm.generate(PROMPTS[:2], greedy(4))
        assert llm.engine.workers.local.runner.batch.requests == {}
    finally:
        llm.shutdown()


def test_checksum_catches_a_diverged_rank(tiny_model_dir):
    """A rank whose block table differs from the scheduler's fails the step instead of writing KV
    into another request's blocks."""
    llm = use_diff(LLM(tiny_model_dir, early_exit=EE, block_size=4))
    try:
        llm.add_request(PROMPTS[0], greedy(8), request_id="a")
        llm.engine.step()
        st = llm.engine.workers.local.runner.batch.get("a")
        st.block_table[0] += 1
        with pytest.raises(RuntimeError, match="diverged"):
            llm.engine.step()
    finally:
        llm.shutdown()
