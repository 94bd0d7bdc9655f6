"""Hidden states for exit-head training: a plain full-sequence forward of our own model.

Each sequence (prompt + the full model's greedy answer) runs as one causal prefill chunk through
:class:`cluster.model.llama.LlamaForCausalLM` (the same layers, weights and numerics the engine
serves), several sequences packed per call. Only the exit-eligible decode positions are kept: a
position ``p >= len(prompt)`` whose next token ``ids[p + 1]`` the full model generated. For them we
keep the hidden state after every exit layer, the last layer's hidden state (the teacher), the
generated next token and the teacher's top-k token ids.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from cluster.model.layers.attention import AttentionMetadata, PrefillChunk
from cluster.model.llama import LlamaForCausalLM
from cluster.training.data import Sequence


@dataclass
class Features:
    """Per decode position ``[N, ...]`` tensors (float32 hidden states)."""

    hidden: dict[int, torch.Tensor]  # exit layer -> [N, hidden] state after that many layers
    final: torch.Tensor  # [N, hidden] last layer's state (before the final norm)
    target: torch.Tensor  # [N] long: the full model's greedy next token (as generated)
    final_argmax: torch.Tensor  # [N] long: argmax of this forward's final logits (sanity check)
    topk: torch.Tensor  # [N, k] long: the teacher's top-k token ids
    seq: torch.Tensor  # [N] long: index of the sequence each position belongs to
    meta: dict = field(default_factory=dict)

    @property
    def num_positions(self) -> int:
        return int(self.target.shape[0])

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        torch.save({"hidden": self.hidden, "final": self.final, "target": self.target,
                    "final_argmax": self.final_argmax, "topk": self.topk, "seq": self.seq, "meta": self.meta}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Features":
        return cls(**torch.load(path, weights_only=True))


def _groups(seqs: list[list[int]], max_tokens: int) -> Iterable[list[int]]:
    group, total = [], 0
    for i, ids in enumerate(seqs):
        if group and total + len(ids) > max_tokens:
            yield group
            group, total = [], 0
        group.append(i)
        total += len(ids)
    if group:
        yield group


@dataclass
class PackedBatch:
    """Sequences packed as one causal prefill batch (each from position 0), for a plain forward of
    the decoder layers outside the engine."""

    input_ids: torch.Tensor  # [T] long, all sequences' tokens back to back
    positions: torch.Tensor  # [T] long
    meta: AttentionMetadata  # one prefill chunk per sequence
    kv: torch.Tensor  # [2, blocks, block_size, KVH, d]: every layer writes its K/V before it attends,
    #                   so one cache pair serves all layers
    keep: torch.Tensor  # [R] long: the flattened indices of the rows asked for


def pack_sequences(model: LlamaForCausalLM, seqs: list[list[int]], rows: list[torch.Tensor],
                   block_size: int = 16) -> PackedBatch:
    """Pack ``seqs`` (token ids) into one causal batch on the model's device; ``rows``: per sequence,
    the token indices to keep (:attr:`PackedBatch.keep`)."""
    dev = next(model.parameters()).device
    attn = model.model.layers[0].self_attn
    ids, positions, slots, chunks, keep = [], [], [], [], []
    block, t = 0, 0
    for s, r in zip(seqs, rows):
        n = len(s)
        nb = -(-n // block_size)
        ids.extend(s)
        positions.append(torch.arange(n))
        slots.append(block * block_size + torch.arange(n))
        chunks.append(PrefillChunk(t, n, 0, torch.arange(block, block + nb, device=dev)))
        keep.append(r + t)
        block, t = block + nb, t + n
    kv = torch.empty(2, block, block_size, attn.num_kv_heads, attn.head_dim, dtype=next(model.parameters()).dtype,
                     device=dev)
    meta = AttentionMetadata(torch.cat(slots).to(dev), 0, torch.zeros(0, 1, dtype=torch.long, device=dev),
                             torch.zeros(0, dtype=torch.long, device=dev), chunks)
    return PackedBatch(torch.tensor(ids, dtype=torch.long, device=dev), torch.cat(positions).to(dev), meta, kv,
                       torch.cat(keep).to(dev))


@torch.inference_mode()
def full_sequence_hidden(model: LlamaForCausalLM, seqs: list[list[int]], rows: list[torch.Tensor],
                         layers: Iterable[int], block_size: int = 16) -> dict[int, torch.Tensor]:
    """One packed causal forward of ``seqs`` (each from position 0).

    Args:
        rows: per sequence, the token indices whose hidden states to keep.
        layers: layer counts to keep (``num_layers`` = the last layer's state, before the final norm).

    Returns:
        ``{layer: [sum(len(rows)), hidden]}`` float32.
    """
    want = set(layers)
    mc = model.config
    b = pack_sequences(model, seqs, rows, block_size)
    h = model.model.embed_tokens(b.input_ids)
    out = {}
    for i, layer in enumerate(model.model.layers):
        h = layer(h, b.positions, b.meta, b.kv)
        if i + 1 in want:
            out[i + 1] = h[b.keep].float()
    assert set(out) == want, f"layers {sorted(want - set(out))} are not in 1..{mc.num_layers}"
    return out


def decode_rows(seq: Sequence) -> torch.Tensor:
    """Indices ``p`` in ``[len(prompt), len(ids) - 2]`` (decode positions with a known next token)."""
    p = len(seq.prompt_ids)
    return torch.arange(p, p + seq.num_decode_positions)


@torch.inference_mode()
def extract_features(model: LlamaForCausalLM, seqs: list[Sequence], exit_layers: Iterable[int], topk: int = 16,
                     max_tokens: int = 2048, progress: bool = True, desc: str = "hidden states") -> Features:
    """Hidden states at ``exit_layers`` and teacher data for every decode position of ``seqs``."""
    L = model.config.num_layers
    exit_layers = sorted(set(exit_layers))
    ids = [s.ids for s in seqs]
    hidden = {l: [] for l in exit_layers}
    final, target, argmax, tops, seq_idx = [], [], [], [], []
    bar = tqdm(total=sum(map(len, ids)), desc=desc, unit="tok", disable=not progress)
    for group in _groups(ids, max_tokens):
        rows = [decode_rows(seqs[i]) for i in group]
        out = full_sequence_hidden(model, [ids[i] for i in group], rows, [*exit_layers, L])
        for l in exit_layers:
            hidden[l].append(out[l])
        final.append(out[L])
        for i, r in zip(group, rows):
            target.append(torch.tensor(ids[i], dtype=torch.long)[r + 1])
            seq_idx.append(torch.full((len(r),), i, dtype=torch.long))
        for part in out[L].split(256):
            logits = model.lm_head.full_logits(model.final_local_logits(part.to(next(model.parameters()).dtype)))
            t = logits.topk(max(topk, 1), dim=-1).indices
            argmax.append(t[:, 0])
            tops.append(t[:, :topk])
        bar.update(sum(len(ids[i]) for i in group))
    bar.close()
    cat = lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape)  # noqa: E731
    H = model.config.hidden_size
    return Features(hidden={l: cat(v, (0, H)) for l, v in hidden.items()}, final=cat(final, (0, H)),
                    target=cat(target, (0,)).long(), final_argmax=cat(argmax, (0,)).long(),
                    topk=cat(tops, (0, topk)).long(), seq=cat(seq_idx, (0,)).long())


def cached_features(path: Optional[str], model: LlamaForCausalLM, seqs: list[Sequence], exit_layers: Iterable[int],
                    key: dict, **kw) -> Features:
    """:func:`extract_features`, reusing ``path`` when it was made for the same ``key`` and layers."""
    exit_layers = sorted(set(exit_layers))
    if path and os.path.exists(path):
        feats = Features.load(path)
        if feats.meta.get("key") == key and set(exit_layers) <= set(feats.hidden):
            feats.hidden = {l: feats.hidden[l] for l in exit_layers}
            return feats
    feats = extract_features(model, seqs, exit_layers, **kw)
    feats.meta = {"key": key}
    if path:
        feats.save(path)
    return feats
