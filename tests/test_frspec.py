"""FR-Spec reduced-vocabulary LM head (cluster/model/frspec.py) and its subset selection
(cluster/training/frspec.py), on toy lists and the tiny random model (float, int8 and int4 heads)."""
import json
from types import SimpleNamespace

import pytest
import torch

from cluster.model.frspec import DRAFT_VOCAB_KEY, ReducedLMHead, int4_codes, load_draft_vocab
from cluster.training.frspec import add_draft_vocab, coverage, select_vocab

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------------------- subset selection
def test_select_vocab_ranks_by_frequency_and_reports_coverage():
    lists = [[5, 5, 5, 3, 3, 1], [3, 7, 99]]  # 99 is outside the vocabulary: ignored
    ids, cov = select_vocab(lists, vocab_size=10, size=2)
    assert ids.tolist() == [3, 5] and ids.dtype == torch.int64  # equal counts: the lower id first
    assert cov == pytest.approx(6 / 8)
    ids, cov = select_vocab(lists, 10, 2, always=[9, 9])  # pinned ids take slots first
    assert ids.tolist() == [9, 3] and cov == pytest.approx(3 / 8)
    ids, cov = select_vocab(lists, 10, 5)  # fewer distinct ids than slots: unseen ids fill up
    assert ids.tolist() == [3, 5, 1, 7, 0] and cov == 1.0
    assert select_vocab(lists, 10, 50)[0].numel() == 10
    ids, cov = select_vocab([], 10, 3)  # no tokens: the lowest ids, vacuously full coverage
    assert ids.tolist() == [0, 1, 2] and cov == 1.0
    assert coverage([[3, 3, 4]], torch.tensor([3]), 10) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="size"):
        select_vocab(lists, 10, 0)
    with pytest.raises(ValueError, match="always"):
        select_vocab(lists, 10, 2, always=[10])


def test_draft_vocab_in_heads_file(tmp_path):
    from safetensors.torch import save_file

    from cluster.training.data import Sequence
    from cluster.training.pipeline import _draft_vocab, read_heads_metadata

    src = str(tmp_path / "heads.safetensors")
    save_file({"exits.2.down.weight": torch.zeros(2, 4)}, src, metadata={"format": "x"})
    assert load_draft_vocab(src) is None
    mc = SimpleNamespace(vocab_size=10, eos_token_ids=(9,))  # the two fields _draft_vocab reads
    seqs = {"train": [Sequence("a", (1,), (4, 4, 2, 9))], "test": [Sequence("b", (1,), (4, 5))]}
    ids, info = _draft_vocab(seqs, mc, 2)
    assert ids.tolist() == [9, 4] and info["coverage_train"] == pytest.approx(3 / 4)
    assert info["coverage_test"] == pytest.approx(1 / 2)
    assert _draft_vocab(seqs, mc, 0) is None
    out = add_draft_vocab(src, str(tmp_path / "out.safetensors"), ids, info)
    assert load_draft_vocab(out).tolist() == [9, 4]
    meta = read_heads_metadata(out)
    assert meta["format"] == "x" and json.loads(meta["frspec"])["size"] == 2
    assert load_draft_vocab(src) is None  # the source file is left as it was


def test_train_exits_parser_has_draft_vocab_size():
    import argparse

    from cluster.training.cli import add_train_exits_parser

    sub = argparse.ArgumentParser().add_subparsers()
    p = add_train_exits_parser(sub)
    assert p.parse_args([]).draft_vocab_size == 8192
    assert p.parse_args(["--draft-vocab-size", "0"]).draft_vocab_size == 0


# ----------------------------------------------------------------------------- reduced LM head
def _model(model_dir):
    from cluster.config import ModelConfig
    from cluster.model.loader import build_model, load_hf_config

    return build_model(model_dir, ModelConfig.from_hf_config(load_hf_config(model_dir)))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = _model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    ids = torch.randperm(V, generator=g)[:300]  # any order; the head sorts them
    ids[0] = V - 1  # the last id (the last shard's edge)
    h = model.model.norm(torch.randn(5, model.config.hidden_size, generator=g) * 3)
    return tiny_model_dir, ids, h


def _quantized(model_dir, method):
    from cluster.model.layers.quant import quantize_model

    model = _model(model_dir)
    if method == "int4_head":  # the LM head itself int4 (quantize_model keeps an int8 head under int4)
        model.lm_head.quantize_("int4", 32)
    elif method != "none":
        quantize_model(model, method)
    return model


@pytest.mark.parametrize("method", ["none", "int8", "int4", "int4_head"])
def test_reduced_head_equals_full_head_on_the_subset(tiny, method):
    model_dir, ids, h = tiny
    model = _quantized(model_dir, method)
    want = model.lm_head.full_logits(model.lm_head.local_logits(h))  # [n, V] float32
    head = ReducedLMHead.from_model(model, ids)
    sorted_ids = ids.sort().values
    assert torch.equal(head.token_ids, sorted_ids)
    kind = {"none": None, "int8": "int8", "int4": "int8", "int4_head": "int4"}[method]
    assert (head.qweight.method if head.qweight is not None else None) == kind
    sub = head.logits(h)
    assert sub.shape == (5, len(ids)) and sub.dtype == torch.float32
    torch.testing.assert_close(sub, want[:, sorted_ids], rtol=1e-5, atol=1e-4)
    full = head.full_logits(h)
    assert full.shape == want.shape and full.dtype == torch.float32
    outside = torch.ones(want.shape[1], dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(full[:, outside]).all() and torch.isfinite(full[:, ~outside]).all()
    masked = want.masked_fill(outside, float("-inf"))
    assert torch.equal(head.argmax(h), masked.argmax(-1))
    assert torch.equal(full.argmax(-1), masked.argmax(-1))
    assert head.weight_bytes < 0.05 * sum(t.numel() * t.element_size() for t in
                                          ([model.lm_head.weight] if kind is None else model.lm_head.quantized.buffers()))
    # dense float rows (dequantized from a quantized head): the same logits up to bfloat16 rounding
    dense = ReducedLMHead(model.lm_head, ids, quant="none")
    assert dense.qweight is None and dense.weight.shape == (len(ids), h.shape[1])
    scale = want[:, sorted_ids].abs().max()
    assert (dense.logits(h) - want[:, sorted_ids]).abs().max() <= (1e-5 if kind is None else 2e-2) * scale


def test_int4_codes_read_back_through_the_kernel():
    from cluster.model.layers.quant import QuantizedWeight, quantize_int4

    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))  # 40 rows: padded to 48 when packed
    q, s, z = quantize_int4(w, 32)
    rows = torch.tensor([0, 7, 39])
    got = int4_codes(QuantizedWeight.from_float(w, "int4", 32), rows)
    assert torch.equal(got.q, q[rows])
    torch.testing.assert_close(got.scales, s[rows].bfloat16().float())
    torch.testing.assert_close(got.zeros, z[rows].bfloat16().float())


def test_bad_subsets_rejected(tiny):
    model_dir, _, _ = tiny
    model = _model(model_dir)
    V = model.config.vocab_size
    for bad, match in [([], "empty"), ([1, 1], "duplicate"), ([V], "lie in"), ([-1], "lie in")]:
        with pytest.raises(ValueError, match=match):
            ReducedLMHead(model.lm_head, bad)
    with pytest.raises(ValueError, match="quant"):
        ReducedLMHead(model.lm_head, [1], quant="int2")


@pytest.mark.parametrize("method", ["none", "int8", "int4_head"])
def test_every_tensor_on_the_heads_device(tiny, method):
    """Built and run under ``torch.device("meta")`` (test_device.py's guard): a tensor made without an
    explicit device would be a meta tensor and fail beside the CPU model's."""
    model_dir, ids, h = tiny
    model = _quantized(model_dir, method)
    ref = ReducedLMHead(model.lm_head, ids)
    with torch.device("meta"):
        head = ReducedLMHead(model.lm_head, ids)
        full, sub = head.full_logits(h), head.logits(h)
    assert all(t.device.type == "cpu" for t in [*head.buffers(), *head.parameters(), full, sub])
    assert torch.equal(full, ref.full_logits(h))


def _reduced_logits(W: torch.Tensor, ids: torch.Tensor, h: torch.Tensor) -> dict:
    """Per weight format, the reduced head's logits of a vocab-parallel LM head loaded from ``W``."""
    from cluster.model.layers.embedding import ParallelLMHead

    out = {}
    for method in ("none", "int8", "int4"):
        head = ParallelLMHead(*W.shape)
        head.weight.weight_loader(head.weight, W)  # this rank's shard
        if method != "none":
            head.quantize_(method, 32)
        out[method] = ReducedLMHead(head, ids).logits(h)
    return out


def _tp_rank(rank: int, addr: str, path: str, W, ids, h) -> None:
    from cluster.distributed import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    init_tensor_parallel(rank, 2, addr, "gloo", timeout_s=60)
    try:
        torch.save(_reduced_logits(W, ids, h), f"{path}.{rank}")
    finally:
        destroy_tensor_parallel()


def test_tensor_parallel_ranks_gather_the_whole_subset(tmp_path):
    """TP 2 (gloo, an odd vocabulary: the last shard is padded): every rank builds the whole subset
    from the rows the ranks hold, and its logits equal the TP 1 head's in every weight format."""
    import torch.multiprocessing as mp

    from cluster.distributed import free_tcp_address

    g = torch.Generator().manual_seed(2)
    W, h = torch.randn(1001, 64, generator=g), torch.randn(3, 64, generator=g)
    ids = torch.tensor([1000, 0, 499, 500, 501, 7, 800])  # both shards, both edges
    ref = _reduced_logits(W, ids, h)
    path = str(tmp_path / "logits")
    mp.spawn(_tp_rank, args=(free_tcp_address(), path, W, ids, h), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{path}.{rank}", weights_only=True)
        for method, want in ref.items():
            torch.testing.assert_close(got[method], want, rtol=1e-5, atol=1e-4, msg=f"rank {rank} {method}")
    torch.testing.assert_close(ref["none"], h @ W[ids.sort().values].t())


def test_heads_file_round_trip_feeds_the_reduced_head(tiny, tmp_path):
    from safetensors.torch import save_file

    model_dir, ids, h = tiny
    src = str(tmp_path / "h.safetensors")
    save_file({"exits.2.down.weight": torch.zeros(1, 1)}, src)
    add_draft_vocab(src, src, ids)  # in place
    got = load_draft_vocab(src)
    assert torch.equal(got, ids)  # rank order kept in the file
    head = ReducedLMHead(_model(model_dir).lm_head, got)
    assert head.num_tokens == len(ids) and DRAFT_VOCAB_KEY == "frspec.token_ids"
