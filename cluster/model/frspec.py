"""FR-Spec reduced-vocabulary LM head (Zhao et al., arXiv 2502.14856) for exit heads and drafts.

A draft or an exit check rarely needs the whole vocabulary: the model's own answers use a small,
frequency-ranked subset of it (on SmolLM2-135M-Instruct, the 8192 of 49152 ids most frequent in its
answers to ~190 training prompts cover 90.6% of its held-out answer tokens, 16384 cover 95.3%;
``bench/frspec.py``). :class:`ReducedLMHead` holds only the subset's ``[N, hidden]`` rows of the
model's LM head and computes ``[n, N]`` logits, reading ``V / N`` times fewer weights than the full
head. Its greedy token equals the full head's exactly when the full head's is in the subset.

The subset is chosen by ``eeserve train-exits`` (:func:`cluster.training.frspec.select_vocab`) and
stored in the exit heads file under :data:`DRAFT_VOCAB_KEY` (int64, ordered by frequency rank);
:func:`load_draft_vocab` reads it back.

Weights: by default (``quant="same"``) the reduced head multiplies by exactly the operands of the full
head: the float rows of a float head, the int8 codes and scales of an int8 head, the int4 codes, scales
and zeros of an int4 head (recovered from the packed kernel weight), so its logits equal the full head's
on the subset's columns. ``quant="none"`` keeps the rows as a dense float matrix in ``dtype`` (the
dequantized rows of a quantized head).

Tensor parallelism: the model's LM head is vocab-parallel (each rank holds ``ceil(V / tp)`` rows); the
reduced head is replicated: at build time each rank contributes the subset rows it holds and one
all-reduce (sum; every row has exactly one contributor, so the sum is exact) gives every rank the
whole subset. Building is therefore a collective: every rank builds the head, with the same ids. Its
forward needs no collective (the hidden states are replicated on every rank).
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from cluster.distributed import all_reduce
from cluster.model.layers.embedding import ParallelLMHead
from cluster.model.layers.quant import ACT_DTYPE, Int4Weight, QuantizedWeight, dequantize_int8

DRAFT_VOCAB_KEY = "frspec.token_ids"  # key of the subset's token ids in an exit heads safetensors file
QUANT_MODES = ("same", "none")


def head_device(lm_head: ParallelLMHead) -> torch.device:
    """The device of the LM head's weights (float or quantized)."""
    return lm_head.weight.device if lm_head.weight is not None else lm_head.quantized.qweight.device


def int4_codes(qw: QuantizedWeight, rows: torch.Tensor) -> Int4Weight:
    """The int4 codes, scales and zeros of rows ``rows`` (``[r]`` long, on the weight's device) of a
    packed int4 :class:`QuantizedWeight`, read back through the kernel itself: with every (scale, zero)
    pair set to (1, 0) it multiplies by ``q - 8`` exactly (small integers are exact in bfloat16), so the
    codes come back without knowing the packed layout (it differs between CPU and CUDA)."""
    k, g = qw.in_features, qw.group_size
    sz = qw.scales_and_zeros  # [K / g, N (padded to 16), 2] bfloat16
    unit = torch.zeros_like(sz)
    unit[..., 0] = 1.0
    eye = torch.eye(k, dtype=ACT_DTYPE, device=sz.device)
    if qw.qweight.device.type == "cuda":
        mm = torch.ops.aten._weight_int4pack_mm(eye, qw.qweight, g, unit)
    else:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, qw.qweight, g, unit)
    q = mm.t().index_select(0, rows).float().add_(8.0).round_().to(torch.int32)  # [r, K] in [0, 15]
    scales = sz[..., 0].t().index_select(0, rows).float()
    zeros = sz[..., 1].t().index_select(0, rows).float()
    return Int4Weight(q, scales, zeros)


def _gather_rows(parts: list[torch.Tensor], n: int, local_pos: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``parts`` (rows of the subset it holds, at subset positions ``local_pos``) ->
    the whole subset's ``[n, ...]`` float32 tensors on every rank (one all-reduce each; identity at tp 1)."""
    out = []
    for p in parts:
        full = torch.zeros((n, *p.shape[1:]), dtype=torch.float32, device=p.device)
        full.index_copy_(0, local_pos, p.float())
        out.append(all_reduce(full))
    return out


class ReducedLMHead(nn.Module):
    """``[n, hidden]`` normed hidden states -> logits over a token subset only.

    Args:
        lm_head: the model's (vocab-parallel, possibly tied, possibly quantized) LM head.
        token_ids: ``[N]`` distinct vocabulary ids in any order (e.g. by frequency rank as
            :func:`cluster.training.frspec.select_vocab` returns them); the head keeps them sorted
            ascending in :attr:`token_ids`, so column ``j`` of :meth:`logits` is token ``token_ids[j]``
            and argmax ties resolve to the lowest vocabulary id, as over the full logits.
        quant: ``same`` (the full head's own weight format, exact logits) or ``none`` (dense ``dtype``).
        dtype: float dtype of a ``none`` head's rows (default: the LM head's float weight dtype, else
            bfloat16, the quantized kernels' activation dtype).

    Raises:
        ValueError: empty subset, duplicate ids, an id outside ``[0, vocab_size)``, unknown ``quant``.
    """

    def __init__(self, lm_head: ParallelLMHead, token_ids: Union[torch.Tensor, Iterable[int]],
                 quant: str = "same", dtype: Optional[torch.dtype] = None):
        super().__init__()
        if quant not in QUANT_MODES:
            raise ValueError(f"quant: must be one of {QUANT_MODES}, got {quant!r}")
        ids = (token_ids.detach().to("cpu", torch.long) if isinstance(token_ids, torch.Tensor)
               else torch.tensor(list(token_ids), dtype=torch.long, device="cpu")).flatten()
        V = lm_head.vocab_size
        if ids.numel() == 0:
            raise ValueError("token_ids: the subset is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"token_ids: ids must lie in [0, {V}), got [{int(ids.min())}, {int(ids.max())}]")
        ids = ids.sort().values
        if bool((ids[1:] == ids[:-1]).any()):
            raise ValueError("token_ids: duplicate ids")
        dev = head_device(lm_head)
        self.vocab_size = V
        n = ids.numel()
        self.register_buffer("token_ids", ids.to(dev))
        # this rank's rows of the subset: subset positions `pos`, local LM head rows `rows`
        mask = (self.token_ids >= lm_head.vocab_start) & (self.token_ids < lm_head.vocab_end)
        pos = mask.nonzero().flatten()
        rows = self.token_ids.index_select(0, pos) - lm_head.vocab_start
        qw = lm_head.quantized
        self.qweight: Optional[QuantizedWeight] = None
        self.weight: Optional[torch.Tensor] = None
        if qw is not None and quant == "same" and qw.method == "int8":
            q, s = _gather_rows([qw.qweight.index_select(0, rows), qw.scales.index_select(0, rows)], n, pos)
            self.qweight = QuantizedWeight("int8", n, qw.in_features)
            self.qweight.register_buffer("qweight", q.to(torch.int8).contiguous())
            self.qweight.register_buffer("scales", s.to(qw.scales.dtype))
        elif qw is not None and quant == "same":  # int4
            w = int4_codes(qw, rows)
            q, s, z = _gather_rows([w.q, w.scales, w.zeros], n, pos)
            self.qweight = QuantizedWeight.from_int4(Int4Weight(q.to(torch.int32), s, z))
        else:
            if dtype is None:
                dtype = lm_head.weight.dtype if qw is None else ACT_DTYPE
            local = self._float_rows(lm_head, rows)
            (w,) = _gather_rows([local], n, pos)
            self.weight = nn.Parameter(w.to(dtype), requires_grad=False)

    @staticmethod
    def _float_rows(lm_head: ParallelLMHead, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of the matrix the LM head multiplies by, float32."""
        qw = lm_head.quantized
        if qw is None:
            return lm_head.weight.index_select(0, rows).float()
        if qw.method == "int8":
            return dequantize_int8(qw.qweight.index_select(0, rows), qw.scales.index_select(0, rows))
        return int4_codes(qw, rows).dequantize()

    @classmethod
    def from_model(cls, model, token_ids, **kw) -> "ReducedLMHead":
        """The reduced head of ``model.lm_head`` (a :class:`cluster.model.llama.LlamaForCausalLM`)."""
        return cls(model.lm_head, token_ids, **kw)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one forward reads."""
        mods = [self.qweight] if self.qweight is not None else []
        ts = [t for m in mods for t in m.buffers()] + ([self.weight] if self.weight is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` (after the final norm) -> ``[n, N]`` float32 logits of :attr:`token_ids`."""
        if self.qweight is not None:
            return self.qweight(h).float()
        return F.linear(h.to(self.weight.dtype), self.weight).float()

    forward = logits

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` -> ``[n, V]`` float32: the subset's logits in their vocabulary columns,
        ``-inf`` elsewhere (argmax and softmax equal the subset's)."""
        sub = self.logits(h)
        out = torch.full((sub.shape[0], self.vocab_size), float("-inf"), dtype=torch.float32, device=sub.device)
        return out.index_copy_(1, self.token_ids, sub)

    def to_vocab(self, idx: torch.Tensor) -> torch.Tensor:
        """Subset column indices (e.g. ``logits(h).argmax(-1)``) -> vocabulary ids."""
        return self.token_ids[idx]

    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """``[n]`` vocabulary ids of the greedy token within the subset."""
        return self.to_vocab(self.logits(h).argmax(dim=-1))

    def extra_repr(self) -> str:
        kind = self.qweight.method if self.qweight is not None else str(self.weight.dtype).replace("torch.", "")
        return f"tokens={self.num_tokens}/{self.vocab_size}, {kind}"


def load_draft_vocab(heads_path: str) -> Optional[torch.Tensor]:
    """The FR-Spec subset stored in an exit heads file (``[N]`` int64, by frequency rank), or None."""
    from safetensors import safe_open

    with safe_open(heads_path, framework="pt") as f:
        return f.get_tensor(DRAFT_VOCAB_KEY).long() if DRAFT_VOCAB_KEY in f.keys() else None
