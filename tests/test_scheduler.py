"""Scheduler: continuous batching, chunked prefill, preemption, stops, aborts (fake runner, no torch)."""
import pytest

from cluster.config import CacheConfig, SchedulerConfig
from cluster.core.outputs import ModelRunnerOutput, SampledTokens
from cluster.core.scheduler import Scheduler
from cluster.request import Request, RequestStatus
from cluster.sampling import SamplingParams

pytestmark = pytest.mark.timeout(60)

BS = 4
EOS = 2


def make_sched(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, prefix=True):
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len),
        CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=prefix),
        num_blocks,
    )


def make_req(rid, n_prompt=6, max_tokens=4, base=100, **params):
    return Request(
        request_id=rid,
        prompt_token_ids=[base + i for i in range(n_prompt)],
        sampling_params=SamplingParams(max_tokens=max_tokens, **params),
        eos_token_ids=(EOS,),
    )


def fake_token(req_id, position):
    """Deterministic 'model': the token depends only on the request and its position."""
    return 1000 + (hash(req_id) % 97) * 10 + position % 10


def step(s, token_fn=None):
    """One engine iteration with a fake runner; checks the scheduler's invariants."""
    out = s.schedule()
    cfg = s.config
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert out.num_batched_tokens == sum(len(sr.token_ids) for sr in out.scheduled)
    assert len(out.scheduled) <= cfg.max_num_seqs
    flags = [sr.exit_eligible for sr in out.scheduled]
    assert flags == sorted(flags, reverse=True), "decodes must come first"
    ro = ModelRunnerOutput()
    for sr in out.scheduled:
        req = s.get_request(sr.request_id)
        end = sr.start_position + len(sr.token_ids)
        assert sr.start_position == req.num_computed_tokens
        assert sr.token_ids == req.all_token_ids[sr.start_position:end]
        assert len(sr.block_table) * BS >= end
        assert sr.sample == (end == req.num_tokens)
        if sr.sample:
            pos = req.num_tokens
            token = token_fn(req) if token_fn else fake_token(req.request_id, pos)
            ro.tokens[sr.request_id] = SampledTokens([token], [3])
    done = s.update(out, ro)
    s.block_manager.check_integrity()
    return out, done


def run_to_completion(s, max_steps=1000, token_fn=None):
    outs = []
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            break
        outs.append(step(s, token_fn)[0])
    assert not s.has_unfinished_requests()
    assert s.block_manager.usage == 0.0
    s.block_manager.check_integrity()
    return outs


def test_add_request_validation():
    """The scheduler owns the registry of unfinished requests: a duplicate id is refused. (An empty
    prompt, the context window and the KV cache fit are checked once, before the scheduler, by the
    processor and the engine: tests/test_engine_boundary.py::test_validation_names_the_field,
    tests/test_frontend.py.)"""
    s = make_sched(num_blocks=4, max_model_len=32)
    s.add_request(make_req("ok", n_prompt=10, max_tokens=7))  # 16 KV slots: fits exactly
    with pytest.raises(ValueError, match="already"):
        s.add_request(make_req("ok"))
    assert s.num_waiting == 1


def test_single_request_prefill_then_decode():
    s = make_sched()
    r = make_req("a", n_prompt=6, max_tokens=3)
    s.add_request(r)
    out, done = step(s)
    (sr,) = out.scheduled
    assert sr.start_position == 0 and len(sr.token_ids) == 6 and sr.sample and not sr.exit_eligible
    assert done == [r] and r.num_output_tokens == 1 and r.exit_layers == [3]
    out, _ = step(s)
    (sr,) = out.scheduled
    assert sr.exit_eligible and sr.token_ids == [r.output_token_ids[0]] and sr.start_position == 6
    run_to_completion(s)
    assert r.finish_reason == "length" and r.num_output_tokens == 3
    assert s.schedule().finished_req_ids == ["a"]
    assert s.get_request("a") is None


def test_continuous_batching_joins_mid_flight_decode_first():
    s = make_sched()
    a = make_req("a", max_tokens=10)
    s.add_request(a)
    step(s)
    step(s)
    b = make_req("b", n_prompt=5, base=300)
    s.add_request(b)
    out, done = step(s)
    assert [sr.request_id for sr in out.scheduled] == ["a", "b"]
    assert out.scheduled[0].exit_eligible and not out.scheduled[1].exit_eligible
    assert {r.request_id for r in done} == {"a", "b"}
    out, _ = step(s)
    assert all(sr.exit_eligible for sr in out.scheduled) and len(out.scheduled) == 2
    run_to_completion(s)
    assert a.num_output_tokens == 10 and b.num_output_tokens == 4


def test_max_num_seqs_respected():
    s = make_sched(max_num_seqs=2)
    reqs = [make_req(f"r{i}", base=100 * i) for i in range(5)]
    for r in reqs:
        s.add_request(r)
    out, _ = step(s)
    assert len(out.scheduled) == 2 and s.num_running == 2 and s.num_waiting == 3
    outs = run_to_completion(s)
    assert max(len(o.scheduled) for o in outs) <= 2
    assert all(r.finish_reason == "length" for r in reqs)


def test_token_budget_and_chunked_prefill():
    s = make_sched(max_num_batched_tokens=8)
    a = make_req("a", n_prompt=5, base=100)
    b = make_req("b", n_prompt=5, base=200)
    s.add_request(a)
    s.add_request(b)
    out, done = step(s)
    assert [(sr.request_id, len(sr.token_ids), sr.sample) for sr in out.scheduled] == [("a", 5, True), ("b", 3, False)]
    assert done == [a] and b.num_computed_tokens == 3 and b.num_output_tokens == 0
    out, _ = step(s)
    assert [(sr.request_id, len(sr.token_ids)) for sr in out.scheduled] == [("a", 1), ("b", 2)]
    run_to_completion(s)


def test_chunked_prefill_long_prompt():
    s = make_sched(max_num_batched_tokens=8)
    r = make_req("long", n_prompt=20, max_tokens=2)
    s.add_request(r)
    chunks = []
    for _ in range(3):
        out, done = step(s)
        (sr,) = out.scheduled
        chunks.append((sr.start_position, len(sr.token_ids), sr.sample, sr.exit_eligible))
    assert chunks == [(0, 8, False, False), (8, 8, False, False), (16, 4, True, False)]
    assert done == [r] and r.num_output_tokens == 1
    run_to_completion(s)
    assert r.num_output_tokens == 2


def test_preemption_then_every_request_completes():
    # 8 blocks of 4 = 32 slots; 4 requests each growing to 6 + 12 - 1 = 17 KV slots (5 blocks)
    s = make_sched(num_blocks=8, max_num_batched_tokens=32, prefix=False)
    reqs = [make_req(f"r{i}", n_prompt=6, max_tokens=12, base=100 * (i + 1)) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    outs = run_to_completion(s)
    assert s.num_preemptions > 0 and s.stats["num_preemptions"] == s.num_preemptions
    assert sum(r.num_preemptions for r in reqs) == s.num_preemptions
    preempted = [rid for o in outs for rid in o.preempted_req_ids]
    assert preempted
    for r in reqs:
        assert r.finish_reason == "length" and r.num_output_tokens == 12
        # tokens are a function of position only, so recompute after preemption is invisible
        assert r.output_token_ids == [fake_token(r.request_id, 6 + k) for k in range(12)]
    # recompute of a preempted request runs as a prefill (full depth), never as an exit-eligible decode
    for o in outs:
        for sr in o.scheduled:
            if len(sr.token_ids) > 1:
                assert not sr.exit_eligible


def test_preemption_victim_is_last_running_and_goes_to_front():
    s = make_sched(num_blocks=4, max_num_batched_tokens=64, prefix=False)
    a = make_req("a", n_prompt=4, max_tokens=9, base=100)   # up to 12 slots = 3 blocks
    b = make_req("b", n_prompt=4, max_tokens=5, base=200)
    c = make_req("c", n_prompt=4, max_tokens=5, base=300)
    for r in (a, b, c):
        s.add_request(r)
    step(s)  # all three prefilled: 3 blocks used, 1 free
    assert s.num_running == 3
    out, _ = step(s)  # decode needs a second block each: a gets the free one, c is preempted for b
    assert out.preempted_req_ids == ["c"]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert [sr.request_id for sr in out.scheduled] == ["a", "b"]
    assert s.waiting[0] is c
    run_to_completion(s)
    assert all(r.finish_reason == "length" for r in (a, b, c))


def test_abort_running_and_waiting_frees_blocks():
    s = make_sched(max_num_seqs=1)
    a = make_req("a", max_tokens=10)
    b = make_req("b", base=200)
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert s.block_manager.usage > 0 and s.num_waiting == 1
    s.finish_requests(["a", "b", "nope"], RequestStatus.FINISHED_ABORTED)
    assert a.finish_reason == "abort" and b.finish_reason == "abort"
    assert s.block_manager.usage == 0.0 and not s.has_unfinished_requests()
    s.block_manager.check_integrity()
    out = s.schedule()
    assert out.is_empty and sorted(out.finished_req_ids) == ["a", "b"]
    assert s.schedule().finished_req_ids == []
    with pytest.raises(ValueError):
        s.finish_requests("a", RequestStatus.RUNNING)


def test_abort_between_schedule_and_update_is_skipped():
    s = make_sched()
    a, b = make_req("a"), make_req("b", base=200)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    ro = ModelRunnerOutput(tokens={"a": SampledTokens([7], [1]), "b": SampledTokens([8], [1])})
    done = s.update(out, ro)
    assert done == [b] and a.num_output_tokens == 0 and a.finish_reason == "abort"
    s.block_manager.check_integrity()
    run_to_completion(s)


def test_stop_conditions():
    s = make_sched(max_model_len=12)
    eos = make_req("eos", max_tokens=10)
    ign = make_req("ign", max_tokens=3, base=200, ignore_eos=True)
    stop = make_req("stop", max_tokens=10, base=300, stop_token_ids=[55])
    mtl = make_req("mtl", n_prompt=8, max_tokens=10, base=400)
    for r in (eos, ign, stop, mtl):
        s.add_request(r)
    tokens = {"eos": [9, EOS], "ign": [EOS, EOS, EOS], "stop": [9, 9, 55]}

    def token_fn(req):
        seq = tokens.get(req.request_id)
        return seq[req.num_output_tokens] if seq else 9

    run_to_completion(s, token_fn=token_fn)
    assert eos.finish_reason == "stop" and eos.stop_reason is None and eos.output_token_ids == [9, EOS]
    assert ign.finish_reason == "length" and ign.output_token_ids == [EOS] * 3
    assert stop.finish_reason == "stop" and stop.stop_reason == 55 and stop.num_output_tokens == 3
    assert mtl.finish_reason == "length" and mtl.num_tokens == 12 and mtl.num_output_tokens == 4


def test_finish_with_stop_string_from_detokenizer():
    s = make_sched()
    r = make_req("a", max_tokens=10)
    s.add_request(r)
    step(s)
    s.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    assert r.finish_reason == "stop" and s.block_manager.usage == 0.0
    assert s.schedule().finished_req_ids == ["a"]


def test_prefix_cache_through_scheduler_and_stats():
    s = make_sched()
    a = make_req("a", n_prompt=10, max_tokens=2)
    s.add_request(a)
    run_to_completion(s)
    b = make_req("b", n_prompt=10, max_tokens=2)  # same prompt tokens
    s.add_request(b)
    out, _ = step(s)
    (sr,) = out.scheduled
    assert b.num_cached_tokens == 8 and sr.start_position == 8 and sr.token_ids == b.prompt_token_ids[8:]
    st = s.stats
    assert st["prefix_cache_hits"] == 2 and st["prefix_cache_queries"] == 4
    assert st["num_running"] == 1 and st["num_waiting"] == 0 and 0 < st["kv_usage"] <= 1
    assert st["num_free_blocks"] == s.block_manager.num_free_blocks
    run_to_completion(s)
    assert b.num_output_tokens == 2


def test_many_requests_random_lengths_small_cache():
    import random

    rng = random.Random(0)
    s = make_sched(num_blocks=12, max_num_seqs=4, max_num_batched_tokens=10, max_model_len=40)
    reqs = []
    shared = [7, 7, 7, 7, 8, 8, 8, 8]
    for i in range(20):
        prompt = (shared if i % 2 else []) + [rng.randrange(10, 50) for _ in range(rng.randrange(1, 9))]
        r = Request(request_id=f"q{i}", prompt_token_ids=prompt,
                    sampling_params=SamplingParams(max_tokens=rng.randrange(1, 12)), eos_token_ids=(EOS,))
        reqs.append(r)
    pending = list(reqs)
    for _ in range(2000):
        if pending and rng.random() < 0.5:
            s.add_request(pending.pop(0))
        if not s.has_unfinished_requests() and not pending:
            break
        step(s)
    assert not pending and not s.has_unfinished_requests()
    assert all(r.is_finished and r.num_output_tokens == r.sampling_params.max_tokens for r in reqs)
    assert s.block_manager.usage == 0.0
    s.block_manager.check_integrity()
