"""The rank-side input of one forward: each request's rows, and the one packer that turns them into
device tensors.

* :class:`RowState`: the rows a request brings to a forward when they are not just its scheduled
  tokens (its last sampled token and its drafts, a row re-run from its exit).
* :class:`HostBatch`: one forward's rows gathered on the host (token ids, positions with their block
  tables, decode rows, prefill chunks, sample rows with their eligibility and thresholds).
* :class:`InputPacker`: the one place a :class:`HostBatch` becomes tensors: the slot mapping
  (``table[p // block_size] * block_size + p % block_size``), the padded decode block tables, the
  thresholds as float64 bits (NaN, "the exit config's per-layer default", survives the int64
  buffer), all in ONE int64 host buffer copied to the device once (pinned, non-blocking on CUDA).
* :func:`build_step`: the layout of an iteration of the model runner (:meth:`ModelRunner.prepare
  <cluster.worker.model_runner.ModelRunner.prepare>`) and :func:`sample_layout`, where each request's
  rows sit among its sample rows. The drafter (:mod:`cluster.worker.spec_decode`) builds its own
  passes' rows and packs them with the same packer.

Contract with the scheduler (:class:`~cluster.core.outputs.ScheduledRequest`): ``exit_eligible`` is
a decode row (one token past the prompt, sampled); ``full_depth`` rows run every layer with no exit
test; ``exit_threshold`` is None (packed as NaN) or in [0, 1] and is passed on, never interpreted.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from cluster.core.outputs import ScheduledRequest, SchedulerOutput
from cluster.model.exits import ExitBatch, Join
from cluster.model.layers.attention import AttentionMetadata, PrefillChunk
from cluster.model.layers.sampler import host_to_device


@dataclass
class RowState:
    """The rows one request brings to a forward: its last sampled token, then its drafts.

    ``depths[j]`` layers of row ``j`` already ran (its K/V of those layers are in the cache and
    ``hidden[j]`` is its hidden state there; 0 and None: the row starts at layer 1).
    """

    drafts: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    hidden: list[Optional[torch.Tensor]] = field(default_factory=list)  # per row: [hidden] or None
    draft_layers: list[int] = field(default_factory=list)  # exit layer that made each draft
    q: list[Optional[torch.Tensor]] = field(default_factory=list)  # per draft: [V] draft probs (sampled rows)

    def tokens(self, sr: ScheduledRequest) -> list[int]:
        return list(sr.token_ids) + self.drafts


@dataclass
class HostBatch:
    """One forward's rows on the host, in batch order (host ints only; nothing on a device).

    Tokens are counted by their ids; a drafting pass also places rows whose ids it does not send
    (pending rows that enter with a hidden state), so ``positions`` may outnumber ``ids``.
    """

    ids: list[int] = field(default_factory=list)
    placed: list[tuple[Sequence[int], Sequence[int]]] = field(default_factory=list)  # (block table, positions)
    tables: list[Sequence[int]] = field(default_factory=list)  # per decode row: its block table
    lens: list[int] = field(default_factory=list)  # per decode row: context length (incl. itself)
    chunks: list[tuple[int, int, int, Sequence[int]]] = field(default_factory=list)  # (token, n, pos, table)
    rows: list[int] = field(default_factory=list)  # per sample row: its token index
    eligible: list[bool] = field(default_factory=list)  # per sample row: may exit early
    thresholds: list[float] = field(default_factory=list)  # per thresholded row (NaN: the default)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def place(self, table: Sequence[int], positions: Sequence[int]) -> None:
        """Rows at ``positions`` of a sequence with block table ``table`` (their K/V slots)."""
        self.placed.append((table, positions))

    def tokens(self, token_ids: Sequence[int], table: Sequence[int], start: int) -> int:
        """Tokens ``token_ids`` at positions ``start ..``; returns the first one's token index."""
        t = len(self.ids)
        self.ids += token_ids
        self.place(table, range(start, start + len(token_ids)))
        return t

    def decode(self, table: Sequence[int], context_len: int) -> None:
        """The next decode row's block table and context length."""
        self.tables.append(table)
        self.lens.append(context_len)

    def decode_row(self, table: Sequence[int], position: int, token: Optional[int] = None) -> int:
        """A decode row at ``position`` (its context: every position up to it); ``token`` None: the
        row enters with a hidden state, no id. Returns its token index (the ids before it)."""
        t = len(self.ids)
        if token is not None:
            self.ids.append(token)
        self.place(table, (position,))
        self.decode(table, position + 1)
        return t

    def chunk(self, token_start: int, num_tokens: int, start_position: int, table: Sequence[int]) -> None:
        """A prefill chunk of ``num_tokens`` tokens from token index ``token_start``."""
        self.chunks.append((token_start, num_tokens, start_position, table))

    def threshold(self, value: Optional[float]) -> None:
        """A row's exit threshold: ``value`` in [0, 1], or None for the exit config's (NaN)."""
        self.thresholds.append(float("nan") if value is None else float(value))

    def sample(self, token_index: int, eligible: bool, threshold: Optional[float]) -> None:
        """A sample row (the token whose next token is sampled), with its eligibility and threshold."""
        self.rows.append(token_index)
        self.eligible.append(eligible)
        self.threshold(threshold)


@dataclass
class DeviceBatch:
    """A :class:`HostBatch` on the device: views of one host->device copy (``T`` tokens, ``P``
    placed rows, ``D`` decode rows of ``W`` blocks at most, ``S`` sample rows, ``E`` eligible ones,
    ``K`` thresholds)."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [P] long
    slot_mapping: torch.Tensor  # [P] long
    block_tables: torch.Tensor  # [D, W] long, padded with 0
    context_lens: torch.Tensor  # [D] long
    prefills: list[PrefillChunk]
    sample_rows: torch.Tensor  # [S] long
    eligible: torch.Tensor  # [S] bool
    eligible_rows: torch.Tensor  # [E] long: indices j with eligible[j]
    thresholds: torch.Tensor  # [K] float32 (NaN: the exit config's)

    def attention_metadata(self) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping, self.block_tables.shape[0], self.block_tables,
                                 self.context_lens, self.prefills)


class InputPacker:
    """Packs a :class:`HostBatch` for ``device`` with paged KV blocks of ``block_size`` slots."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def slots(self, host: HostBatch) -> list[int]:
        """Flat cache slot of every placed row, in order."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for table, ps in host.placed for p in ps]

    def pack(self, host: HostBatch) -> DeviceBatch:
        """ONE int64 host buffer (ids, positions, slots, padded decode tables, context lengths, chunk
        tables, sample rows, eligibility, eligible rows, thresholds as float64 bits) copied to the
        device once; the returned tensors are views of that copy. Reads no device value."""
        positions = [p for _, ps in host.placed for p in ps]
        P, D, S = len(positions), len(host.tables), len(host.rows)
        width = max((len(b) for b in host.tables), default=1)
        eligible_rows = [j for j, e in enumerate(host.eligible) if e]
        buf = host.ids + positions + self.slots(host)
        for b in host.tables:
            buf += b
            buf += [0] * (width - len(b))
        buf += host.lens
        for c in host.chunks:
            buf += c[3]
        buf += host.rows
        buf += [int(e) for e in host.eligible]
        buf += eligible_rows
        buf += array("q", array("d", host.thresholds).tobytes())  # float64 bits: NaN survives
        parts = ([len(host.ids), P, P, D * width, D] + [len(c[3]) for c in host.chunks]
                 + [S, S, len(eligible_rows), len(host.thresholds)])
        views = host_to_device(buf, torch.long, self.device).split(parts)
        ids, positions_t, slots, bt, lens = views[:5]
        n = len(host.chunks)
        prefills = [PrefillChunk(c[0], c[1], c[2], v) for c, v in zip(host.chunks, views[5:5 + n])]
        rows, elig, elig_rows, thr_bits = views[5 + n:]
        return DeviceBatch(ids, positions_t, slots, bt.view(D, width), lens, prefills, rows, elig.bool(), elig_rows,
                           thr_bits.view(torch.float64).to(torch.float32))


def build_step(so: SchedulerOutput, packer: InputPacker, exits: bool, rows_of: Optional[dict[str, RowState]] = None
               ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, ExitBatch]:
    """``(input_ids [T], positions [T], AttentionMetadata, ExitBatch)`` of one iteration, from one
    :meth:`InputPacker.pack` (``exits``: the runner has exit heads).

    ``rows_of``: requests whose rows are given by a :class:`RowState` (drafts to verify, a row
    re-run from its exit): each row is a decode row of its own (its context: every position up to
    it), sampled, never exit-eligible; rows with ``depth > 0`` join at that depth (:class:`Join`).
    Layout of the ``T`` tokens: joining rows first, deepest first (so the rows that run at a layer
    are always a suffix of the batch), then the other decode rows, then prefill chunks. Sample rows
    follow ``so.scheduled``' order (a ``rows_of`` request: its rows in order, :func:`sample_layout`).
    """
    host = HostBatch()
    rows_of = rows_of or {}
    with_rows = [(sr, rows_of[sr.request_id]) for sr in so.scheduled if sr.request_id in rows_of]
    # joining rows in their order of appearance: (depth, token, position, table, hidden state)
    appear = [(rs.depths[j], tok, sr.start_position + j, sr.block_table, rs.hidden[j])
              for sr, rs in with_rows for j, tok in enumerate(rs.tokens(sr)) if rs.depths[j]]
    deepest_first = sorted(range(len(appear)), key=lambda k: -appear[k][0])  # stable: ties keep their order
    joining = [appear[k] for k in deepest_first]
    for _, tok, p, table, _ in joining:
        host.decode_row(table, p, tok)
    token_of = {k: t for t, k in enumerate(deepest_first)}
    fresh = {(sr.request_id, j): host.decode_row(sr.block_table, sr.start_position + j, tok)
             for sr, rs in with_rows for j, tok in enumerate(rs.tokens(sr)) if not rs.depths[j]}
    order = iter(range(len(appear)))
    for sr in so.scheduled:
        rs = rows_of.get(sr.request_id)
        if rs is not None:
            for j, depth in enumerate(rs.depths):
                host.sample(token_of[next(order)] if depth else fresh[(sr.request_id, j)], False, None)
            continue
        n, s0, table = len(sr.token_ids), sr.start_position, sr.block_table
        t = host.tokens(sr.token_ids, table, s0)
        if sr.exit_eligible:
            host.decode(table, s0 + 1)
        else:
            host.chunk(t, n, s0, table)
        if sr.sample:
            host.sample(t + n - 1, sr.exit_eligible and exits and not sr.full_depth, sr.exit_threshold)
    dev = packer.pack(host)
    joins = []
    k = len(joining)
    while k:  # shallowest first; the rows of one depth are consecutive tokens
        d = joining[k - 1][0]
        j = k
        while j and joining[j - 1][0] == d:
            j -= 1
        joins.append(Join(d, j, k - j, torch.stack([e[4] for e in joining[j:k]])))
        k = j
    batch = ExitBatch(dev.sample_rows, dev.eligible, dev.thresholds, host_rows=host.rows,
                      host_eligible=host.eligible, eligible_rows=dev.eligible_rows, joins=joins)
    return dev.input_ids, dev.positions, dev.attention_metadata(), batch


def sample_layout(so: SchedulerOutput,
                  rows_of: dict[str, RowState]) -> tuple[dict[str, int], dict[int, ScheduledRequest]]:
    """Where each request's rows sit among the sample rows (:func:`build_step`'s order): ``({request
    with rows_of: its first sample row}, {sample row: request sampled the plain way})``."""
    first, plain, j = {}, {}, 0
    for sr in so.scheduled:
        if sr.request_id in rows_of:
            first[sr.request_id] = j
            j += len(rows_of[sr.request_id].depths)
        elif sr.sample:
            plain[j] = sr
            j += 1
    return first, plain
