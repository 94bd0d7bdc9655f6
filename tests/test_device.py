"""The GPU path, guarded on the CPU: device discipline, host syncs, KV sizing, dtype and NCCL setup.

Device discipline: with ``debug_default_device="meta"`` every worker step runs inside
``with torch.device("meta")``, so a tensor created without an explicit device is a meta tensor and
fails as soon as it meets the model's tensors, exactly where a CPU tensor would fail beside a CUDA
model. Under it the engine must produce the tokens of a normal run, in every mode of the engine.
"""
from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cluster import LLM, ExitConfig, SamplingParams

pytestmark = pytest.mark.timeout(600)

PROMPTS = [f"Once upon a time in city number {i}, a traveller" + " and then" * i for i in range(6)]
EXITS = {  # thresholds measured on the seed-0 tiny model: tokens leave at several layers
    "max_prob": dict(exit_layers=(2, 4), threshold=0.8),
    "top2_margin": dict(exit_layers=(2, 4), threshold=0.6, confidence="top2_margin"),
}


def greedy(n=12, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def seeded(n=12, seed=7):
    return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.8, top_k=40, top_p=0.9, seed=seed)


def run(model_dir, prompts, params, debug=None, sequential=False, **kw):
    """``(outputs as comparable tuples, engine stats)`` of one engine; shut down afterwards."""
    threads = torch.get_num_threads()
    llm = LLM(model_dir, debug_default_device=debug, **kw)
    try:
        if sequential:  # one at a time (prefix-cache hits on the earlier requests' blocks)
            outs = [llm.generate(p, params)[0] for p in prompts]
        else:
            outs = llm.generate(prompts, params)
        sched = llm.engine.scheduler
        stats = {"preemptions": sched.num_preemptions, "cached": [o.num_cached_tokens for o in outs],
                 "prefix_hits": sched.block_manager.prefix_cache_hits}
        llm.engine.check_integrity()
        return [(o.token_ids, o.exit_layers, o.finish_reason, o.error) for o in outs], stats
    finally:
        llm.shutdown()
        torch.set_num_threads(threads)


def assert_same_under_meta(model_dir, prompts, params, min_exit_layers=1, **kw):
    """The meta-guarded run gives exactly the normal run's tokens and exit layers; returns its stats."""
    ref, _ = run(model_dir, prompts, params, **kw)
    got, stats = run(model_dir, prompts, params, debug="meta", **kw)
    assert all(err is None for *_, err in got), [o[3] for o in got]
    assert got == ref
    layers = {l for o in got for l in o[1]}
    assert len(layers) >= min_exit_layers, f"exit layers {sorted(layers)}: the run must exercise early exits"
    return stats


# ----------------------------------------------------------------------------- device discipline
def test_meta_guard_catches_a_tensor_without_device(tiny_model_dir, monkeypatch):
    """The guard itself: one deviceless ``torch.zeros`` in the forward fails the guarded step."""
    from cluster.model.layers.norm import RMSNorm

    orig = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: orig(self, x) + torch.zeros(x.shape[-1]))
    assert run(tiny_model_dir, PROMPTS[:1], greedy(2), early_exit=None)[0][0][2] == "length"  # fine unguarded
    with pytest.raises(Exception, match="meta|device"):
        run(tiny_model_dir, PROMPTS[:1], greedy(2), debug="meta", early_exit=None)


@pytest.mark.timeout(300)
def test_full_model_greedy_and_seeded_sampling(tiny_model_dir):
    params = [greedy(), seeded(seed=1), greedy(), seeded(seed=2)]
    assert_same_under_meta(tiny_model_dir, PROMPTS[:4], params, early_exit=None, block_size=4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", ["paper", "per_sequence"])
@pytest.mark.parametrize("measure", list(EXITS))
def test_early_exit(tiny_model_dir, measure, policy):
    ee = ExitConfig(policy=policy, **EXITS[measure])
    params = [greedy(), greedy(), seeded(seed=3), greedy()]
    assert_same_under_meta(tiny_model_dir, PROMPTS[:4], params, 3, early_exit=ee, block_size=4)


@pytest.fixture(scope="module")
def classifier_heads(train_tiny_exits):
    """Trained heads + exit classifiers at layers 2 and 4 of a tiny model: ``(model_dir, heads_path)``."""
    from cluster.training.pipeline import DataSettings
    from cluster.training.train import TrainSettings

    data = DataSettings(max_new_tokens=16, num_calib=4, num_test=4, max_train=8, num_agreement_eval=1)
    settings = TrainSettings(rank=16, epochs=4, batch_size=16, lr=1e-2, classifier_epochs=4, negatives=512)
    model_dir, _, summary = train_tiny_exits("device-exits", (2, 4), data, settings, calibrate=False)
    return model_dir, summary["heads_path"]


CLASSIFIER_THRESHOLD = 0.3


@pytest.mark.timeout(900)
@pytest.mark.parametrize("policy", ["paper", "per_sequence"])
def test_early_exit_classifier(classifier_heads, policy):
    model_dir, heads_path = classifier_heads
    ee = ExitConfig(exit_layers=(2, 4), head="trained", heads_path=heads_path, confidence="classifier",
                    threshold=CLASSIFIER_THRESHOLD, policy=policy)
    assert_same_under_meta(model_dir, PROMPTS[:4], [greedy(), seeded(seed=4), greedy(), greedy()], 2,
                           early_exit=ee, block_size=4)


@pytest.mark.timeout(300)
def test_chunked_prefill(tiny_model_dir):
    ee = ExitConfig(policy="per_sequence", **EXITS["max_prob"])
    prompts = [p + " in the long run" * 6 for p in PROMPTS[:3]]
    # 16-token iterations: every prompt (> 40 tokens) is prefilled in several chunks, beside decodes
    assert_same_under_meta(tiny_model_dir, prompts, greedy(), 2, early_exit=ee, block_size=4,
                           max_num_batched_tokens=16)


@pytest.mark.timeout(300)
def test_prefix_cache_hits(tiny_model_dir):
    prefix = "You are a helpful assistant. " * 8
    prompts = [prefix + "Tell me about cats.", prefix + "Tell me about dogs.", prefix + "Tell me about owls."]
    stats = assert_same_under_meta(tiny_model_dir, prompts, greedy(), 2, sequential=True,
                                   early_exit=ExitConfig(**EXITS["max_prob"]), block_size=4)
    assert stats["prefix_hits"] > 0 and min(stats["cached"][1:]) >= 40, stats


@pytest.mark.timeout(300)
def test_preemption(tiny_model_dir):
    # 24 blocks x 4 tokens cannot hold 6 sequences of ~40 tokens at once: preemption by recompute
    stats = assert_same_under_meta(tiny_model_dir, PROMPTS, greedy(16), 2,
                                   early_exit=ExitConfig(policy="per_sequence", **EXITS["top2_margin"]),
                                   block_size=4, num_blocks=24)
    assert stats["preemptions"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("exits", ["top2_margin_per_sequence", "classifier_paper"])
def test_tensor_parallel_2_gloo(ray_session, tiny_model_dir, classifier_heads, exits):
    """Ranks as Ray actors, each step under ``torch.device("meta")``: the all-reduces, the vocab
    all-gather and the exit-mask all-reduce take the model's tensors; tokens equal size 1's."""
    if exits == "classifier_paper":
        model_dir, heads_path = classifier_heads
        ee = ExitConfig(exit_layers=(2, 4), head="trained", heads_path=heads_path, confidence="classifier",
                        threshold=CLASSIFIER_THRESHOLD)
    else:
        model_dir, ee = tiny_model_dir, ExitConfig(policy="per_sequence", **EXITS["top2_margin"])
    params = [greedy(10), seeded(10, seed=5), greedy(10)]
    kw = dict(early_exit=ee, block_size=4, num_blocks=256)
    ref, _ = run(model_dir, PROMPTS[:3], params, num_threads_per_rank=1, **kw)
    got, _ = run(model_dir, PROMPTS[:3], params, debug="meta", tensor_parallel_size=2, **kw)
    assert got == ref
    assert len({l for o in got for l in o[1]}) >= 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_model_short_generation(default_model_dir):
    """The default model with its own exit config (trained heads, exit classifiers, calibrated
    thresholds), one short batch."""
    assert_same_under_meta(default_model_dir, ["The capital of France is", "def add(a, b):"],
                           [greedy(6), seeded(6, seed=9)])


def test_model_runner_follows_the_models_device(tiny_model_dir):
    """A model on the meta device: KV cache, every per-iteration tensor and the whole full-model
    forward live on meta (a forward with no host sync at all)."""
    from cluster.config import ModelConfig
    from cluster.core.outputs import ScheduledRequest, SchedulerOutput
    from cluster.model.loader import build_model, load_hf_config
    from cluster.worker.model_runner import ModelRunner

    mc = ModelConfig.from_hf_config(load_hf_config(tiny_model_dir))
    model = build_model(tiny_model_dir, mc, device="meta")
    runner = ModelRunner(model, mc, None, 16, 4)
    assert runner.device.type == "meta" and runner.kv_caches[0].device.type == "meta"
    assert model.model.layers[0].self_attn.rotary.cos.device.type == "meta"
    sp = SamplingParams()
    so = SchedulerOutput([ScheduledRequest("a", [5], 9, [0, 1, 2], True, True, sp),
                          ScheduledRequest("b", [6, 7, 8, 9, 10], 0, [3, 4], True, False, sp)])
    input_ids, positions, meta, batch = runner.prepare(so)
    tensors = [input_ids, positions, meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens,
               *(p.block_table for p in meta.prefills), batch.sample_rows, batch.eligible, batch.thresholds]
    assert {t.device.type for t in tensors} == {"meta"}
    result = runner.forward(so)
    assert result.logits.device.type == "meta" and result.logits.shape == (2, mc.vocab_size)
    assert result.exit_layers.device.type == "meta" and result.num_checks == 0


# ------------------------------------------------------------------------------------ host syncs
SYNC_METHODS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "histc"}


class SyncCounter(TorchFunctionMode):
    """Counts calls that read a device value on the host (each one a device->host sync on CUDA):
    ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()/int()/float()`` of a tensor,
    ``nonzero`` and other data-dependent shapes, boolean-mask indexing, and ``.to("cpu")`` of a tensor
    that is not a host staging buffer (one made here with ``device="cpu"``, whose ``.to(device)`` is a
    host->device upload: no sync)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.host: list[torch.Tensor] = []  # staging buffers built on the host

    def _is_host(self, t) -> bool:
        return any(t is h for h in self.host)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.calls[name] += 1
        elif name in ("__getitem__", "__setitem__", "index_put", "index_put_") and _has_bool_index(args[1:2]):
            self.calls[name + "[bool]"] += 1
        elif name in ("to", "cpu") and not self._is_host(args[0]) and (
                name == "cpu" or any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))):
            self.calls[f"{name}(cpu)"] += 1
        out = func(*args, **kwargs)
        if str(kwargs.get("device")) == "cpu" or (name == "pin_memory" and self._is_host(args[0])):
            self.host.append(out)
        return out

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _has_bool_index(args) -> bool:
    items = [a for arg in args for a in (arg if isinstance(arg, (tuple, list)) else (arg,))]
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in items)


def test_sync_counter_sees_the_usual_syncs():
    x = torch.arange(4.0)
    with SyncCounter() as c:
        bool(x.any()), x.sum().item(), x.tolist(), x.nonzero(), x[x > 1], int(x[0]), x.to("cpu"), x.cpu()
        torch.tensor([1, 2], device="cpu").to(x.device)  # an upload from a host buffer: not a sync
    assert c.total == 8, c.calls


def count_decode_syncs(model_dir, early_exit, n_tokens=10, torch_compile=False):
    """Per decode iteration (every scheduled request a decode token): ``(syncs, exit checks made,
    the calls)`` counted over ``ModelRunner.execute_model``."""
    llm = LLM(model_dir, early_exit=early_exit, block_size=4, num_blocks=256, torch_compile=torch_compile)
    runner = llm.engine.workers.local.runner
    execute, forward = runner.execute_model, runner.forward
    seen, results = [], []

    def counted_forward(so, rows_of=None):
        results.append(forward(so, rows_of))
        return results[-1]

    def counted(so):
        if not (so.scheduled and all(sr.exit_eligible for sr in so.scheduled)):
            return execute(so)
        with SyncCounter() as c:
            out = execute(so)
        seen.append((c.total - bool(results[-1].exited_rows), results[-1].num_checks, dict(c.calls)))
        return out

    runner.execute_model, runner.forward = counted, counted_forward
    try:
        llm.generate(PROMPTS[:4], [greedy(n_tokens), greedy(n_tokens), seeded(n_tokens), greedy(n_tokens)])
    finally:
        llm.shutdown()
    assert len(seen) >= n_tokens - 2
    return seen


@pytest.mark.timeout(300)
@pytest.mark.parametrize("torch_compile", [False, True])
def test_full_model_decode_makes_one_sync(tiny_model_dir, torch_compile):
    """Eager and compiled (the decode step as one graph, ``cluster.model.compile``) alike."""
    seen = count_decode_syncs(tiny_model_dir, None, torch_compile=torch_compile)
    assert {total for total, _, _ in seen} == {1}, seen  # the sampler's single transfer, nothing else


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy,torch_compile", [("paper", False), ("per_sequence", False), ("per_sequence", True)])
def test_early_exit_decode_syncs_within_documented_bound(tiny_model_dir, policy, torch_compile):
    """``forward_with_exits``' docstring: one sync per exit layer checked, plus one for the sampled
    tokens and exit layers together; so at most ``len(exit_layers) + 1`` per decode iteration, plus
    (``ModelRunner.forward``) one read of the exited rows' argmax for the stop-token rule when rows
    exited (subtracted by ``count_decode_syncs``)."""
    ee = ExitConfig(policy=policy, **EXITS["max_prob"])
    seen = count_decode_syncs(tiny_model_dir, ee, torch_compile=torch_compile)
    for total, checks, calls in seen:
        assert total <= checks + 1 <= len(ee.exit_layers) + 1, (total, checks, calls)
        assert set(calls) <= {"tolist"}, calls
    assert any(checks == len(ee.exit_layers) for _, checks, _ in seen)  # both exit layers really checked


# ------------------------------------------------------------------------------- KV cache sizing
def test_kv_plan_arithmetic():
    from cluster.worker import memory

    gib = 1 << 30
    # 80 GiB GPU, 0.9 of it: 72 - 16 (weights) - 2 (activations) = 54 GiB of KV
    r = memory.plan(80 * gib, 62 * gib, 16 * gib, 2 * gib, 0.9, 2 << 20)
    assert r.kv_cache_bytes == 54 * gib and r.num_blocks == 54 * gib // (2 << 20)
    # another process holds memory: never more than what is free (minus the activation peak)
    assert memory.kv_cache_bytes(80 * gib, 20 * gib, 16 * gib, 2 * gib, 0.9) == 18 * gib
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.2: no room for the KV cache"):
        memory.plan(80 * gib, 62 * gib, 16 * gib, 2 * gib, 0.2, 2 << 20)
    from cluster.config import CacheConfig

    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)


@pytest.mark.timeout(300)
def test_kv_cache_sized_from_device_memory(tiny_model_dir, monkeypatch, caplog):
    """The CUDA start-up path on the CPU (memory figures faked): the ranks load the weights, run the
    profile iterations (under the meta guard too), report, and the engine sizes the cache from the
    report; the start log names weights, KV bytes and blocks."""
    import logging

    from cluster.worker import memory

    mib = 1 << 20
    monkeypatch.setattr(memory, "sizes_from_device_memory", lambda device: True)
    monkeypatch.setattr(memory, "device_memory", lambda device: (192 * mib, 256 * mib))
    with caplog.at_level(logging.INFO, logger="cluster.engine.engine"):
        llm = LLM(tiny_model_dir, early_exit=ExitConfig(**EXITS["max_prob"]), block_size=4,
                  gpu_memory_utilization=0.5, max_num_batched_tokens=64, max_num_seqs=4,
                  debug_default_device="meta")
    try:
        runner = llm.engine.workers.local.runner
        expected = min(128 * mib - runner.weights_bytes, 192 * mib) // runner.block_bytes
        assert llm.engine.num_blocks == runner.num_blocks == expected
        assert runner.kv_caches[0].shape[1] == expected
        rep = llm.engine.memory_report
        assert rep.weights_bytes == runner.weights_bytes and rep.kv_cache_bytes == expected * runner.block_bytes
        assert f"= {expected} blocks" in caplog.text and "weights" in caplog.text and "KV cache" in caplog.text
        assert len(llm.generate(PROMPTS[0], greedy(4))[0].token_ids) == 4
    finally:
        llm.shutdown()


def test_cpu_keeps_its_memory_budget(tiny_model_dir):
    from cluster.config import CacheConfig, ModelConfig
    from cluster.model.loader import load_hf_config

    llm = LLM(tiny_model_dir, early_exit=None, kv_cache_memory_bytes=8 << 20)
    try:
        mc = ModelConfig.from_hf_config(load_hf_config(tiny_model_dir))
        assert llm.engine.num_blocks == CacheConfig(kv_cache_memory_bytes=8 << 20).resolve_num_blocks(mc)
        assert llm.engine.model_config.dtype == "float32"  # dtype "auto" on the CPU
    finally:
        llm.shutdown()


# --------------------------------------------------------------------------------- dtype, NCCL
def test_dtype_auto():
    from cluster.config import resolve_dtype
    from cluster.engine.factory import create_engine

    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("float32", "cuda") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        create_engine(None, dtype="float64")


def test_nccl_group_binds_the_rank_device(monkeypatch):
    import torch.distributed as dist

    from cluster import distributed
    from cluster.worker.worker import local_device

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "_STATE", distributed.TPState())
    distributed.init_tensor_parallel(1, 2, "tcp://127.0.0.1:1", "nccl", device=torch.device("cuda", 0))
    assert calls[-1]["backend"] == "nccl" and calls[-1]["device_id"] == torch.device("cuda", 0)
    distributed.init_tensor_parallel(1, 2, "tcp://127.0.0.1:1", "gloo", device=torch.device("cpu"))
    assert "device_id" not in calls[-1]
    monkeypatch.setattr(distributed, "_STATE", distributed.TPState())
    # a rank actor sees only its GPU (CUDA_VISIBLE_DEVICES): cuda:0; in-process the given index
    assert local_device("cuda", in_actor=True) == torch.device("cuda", 0)
    assert local_device("cuda:1", in_actor=False) == torch.device("cuda", 1)
    assert local_device("cpu", in_actor=True) == torch.device("cpu")


def test_parallel_config_carries_the_guard():
    from cluster.config import ParallelConfig

    pc = ParallelConfig(tensor_parallel_size=2, debug_default_device="meta")
    assert dataclasses.replace(pc).debug_default_device == "meta" and ParallelConfig().debug_default_device is None
