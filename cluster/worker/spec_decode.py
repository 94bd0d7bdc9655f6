"""The model runner's side of lossless early exit: the drafting loop and the acceptance of drafts.

One iteration of a request scheduled with ``num_draft_tokens = k > 0`` (see
:mod:`cluster.model.speculative` for the two modes and the references):

1. :meth:`SpecDecoder.draft`: up to ``k`` drafting passes over every such request of the batch at
   once (pass ``t`` runs each request's ``t``-th row from layer 1 to its draft exit); each pass reads
   its drafts to the host (one small transfer; with tensor parallelism rank 0's draws are broadcast).
2. The iteration's one forward (:func:`~cluster.model.exits.forward_with_exits`) runs, beside the
   other requests' decodes and prefill chunks, every draft row as a decode row that joins at the
   depth its draft reached (:class:`~cluster.model.exits.Join`), so the full model's distribution
   after each row is known.
3. :meth:`SpecDecoder.accept` (rank 0): greedy or speculative-sampling acceptance.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from cluster.core.outputs import ScheduledRequest
from cluster.distributed import broadcast_from_driver
from cluster.model.layers.attention import AttentionMetadata
from cluster.model.layers.sampler import host_to_device, process_logits
from cluster.model.speculative import accept_greedy, accept_sampled, draft_forward

if TYPE_CHECKING:
    from cluster.worker.model_runner import ModelRunner


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


class SpecDecoder:
    """Drafting and acceptance for one :class:`~cluster.worker.model_runner.ModelRunner`."""

    def __init__(self, runner: "ModelRunner"):
        self.runner = runner

    # ------------------------------------------------------------------------------- drafting
    def draft(self, srs: list[ScheduledRequest]) -> dict[str, RowState]:
        """Draft for ``srs`` (each with ``num_draft_tokens > 0`` and a ``spec``); returns each request's
        :class:`RowState` (``len(drafts) + 1`` rows). Writes the drafts' K/V of the layers they ran."""
        r = self.runner
        heads, bs = r.heads, r.block_size
        last_exit = max(heads.cfg.exit_layers) if heads is not None else 0
        st = {sr.request_id: RowState() for sr in srs}
        cur = {sr.request_id: sr.token_ids[0] for sr in srs}
        live, t = list(srs), 0
        while live:
            n = len(live)
            forced = [sr.spec.draft_layer or 0 for sr in live]
            stop = [sr.spec.draft_layer or last_exit for sr in live]
            if not max(stop):  # ``verified`` without exit layers cannot draft (the config forbids it)
                raise RuntimeError("verified drafting needs exit layers")
            # rows: the live requests' pending rows (earlier rows below the deepest depth a pass can
            # reach), then each live request's newest row
            pend = [(q, j) for q, sr in enumerate(live) for j, dep in enumerate(st[sr.request_id].depths)
                    if dep < stop[q]]
            row_sr = [live[q] for q, _ in pend] + live
            pos = [live[q].start_position + j for q, j in pend] + [sr.start_position + t for sr in live]
            R = len(pos)
            width = max(len(sr.block_table) for sr in live)
            buf = [cur[sr.request_id] for sr in live] + pos
            buf += [sr.block_table[p // bs] * bs + p % bs for sr, p in zip(row_sr, pos)]
            for sr in row_sr:
                buf += sr.block_table + [0] * (width - len(sr.block_table))
            buf += [p + 1 for p in pos]
            thr = [float("nan") if sr.exit_threshold is None else float(sr.exit_threshold) for sr in live]
            buf += array("q", array("d", thr).tobytes())
            ids, positions, slots, bt, lens, thr_bits = host_to_device(buf, torch.long, r.device).split(
                [n, R, R, R * width, R, n])
            meta = AttentionMetadata(slots, R, bt.view(R, width), lens)
            pstates = torch.stack([st[live[q].request_id].hidden[j] for q, j in pend]) if pend else None
            res = draft_forward(r.model, heads, ids, positions, meta, r.kv_caches, forced,
                                thr_bits.view(torch.float64).to(torch.float32), stop,
                                [q for q, _ in pend], [st[live[q].request_id].depths[j] for q, j in pend], pstates)
            for k, (q, j) in enumerate(pend):  # pending rows that ran in this pass advanced
                rs = st[live[q].request_id]
                if res.pending_depths[k] != rs.depths[j]:
                    rs.depths[j] = res.pending_depths[k]
                    rs.hidden[j] = res.pending_hidden[k]
            drafted = [k for k in range(n) if res.drafted[k]]
            toks, qs = self._draw([live[k] for k in drafted], res.logits, drafted, t)
            nxt = []
            for k, sr in enumerate(live):
                rs = st[sr.request_id]
                rs.depths.append(res.depths[k])
                rs.hidden.append(res.hidden[k])
                if k not in toks:
                    continue  # not confident: drafting ends, this row finishes in the verification
                rs.drafts.append(toks[k])
                rs.draft_layers.append(res.depths[k])
                rs.q.append(qs[k])
                cur[sr.request_id] = toks[k]
                if len(rs.drafts) < sr.num_draft_tokens:
                    nxt.append(sr)
                else:  # the last draft's own row has not run yet
                    rs.depths.append(0)
                    rs.hidden.append(None)
            live, t = nxt, t + 1
        return st

    def _draw(self, srs: list[ScheduledRequest], logits: torch.Tensor, rows: list[int],
              t: int) -> tuple[dict[int, int], dict[int, Optional[torch.Tensor]]]:
        """Draft tokens of the drafting rows ``rows`` (``srs`` their requests): the argmax of the
        processed exit logits for greedy requests, a draw from the processed distribution ``q`` for
        the others (rank 0 draws; the tokens are broadcast). Returns ``{row: token}, {row: q or None}``."""
        if not rows:
            return {}, {}
        r = self.runner
        dev = logits.device
        sel = logits.index_select(0, host_to_device(rows, torch.long, dev))
        params = [sr.sampling_params for sr in srs]
        x = process_logits(sel, params, num_output_tokens=[sr.num_output_tokens + t for sr in srs],
                           eos_token_ids=[sr.eos_token_ids for sr in srs])
        tok = x.argmax(dim=-1)
        qs: dict[int, Optional[torch.Tensor]] = {k: None for k in rows}
        if r.is_driver:
            states = r.sampling_states
            for j, sr in enumerate(srs):
                if sr.sampling_params.greedy:
                    continue
                q = torch.softmax(x[j], dim=-1)
                gen = states.generator(sr.request_id, sr.sampling_params.seed, dev)
                tok[j] = torch.multinomial(q, 1, generator=gen)[0]
                qs[rows[j]] = q
        broadcast_from_driver(tok)
        return dict(zip(rows, tok.tolist())), qs

    # ----------------------------------------------------------------------------- acceptance
    def accept(self, srs: list[ScheduledRequest], rows_of: dict[str, RowState], logits: torch.Tensor,
               first_row: dict[str, int]) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, str]]:
        """Verify every request's drafts against the full model's logits ``[S, V]`` (rows
        ``first_row[rid] ..`` of the batch, one per row of its :class:`RowState`).

        Returns ``({rid: verified tokens}, {rid: their exit layers}, {rid: error})``: accepted drafts
        keep their draft's exit layer, the full model's own token has ``num_layers``. A request whose
        acceptance raises fails alone.
        """
        r = self.runner
        L = r.model_config.num_layers
        dev = logits.device
        tokens: dict[str, list[int]] = {}
        failed: dict[str, str] = {}
        greedy = [sr for sr in srs if sr.sampling_params.greedy]
        if greedy:  # one batched argmax and one transfer for every greedy request
            idx, params, nout, eos = [], [], [], []
            for sr in greedy:
                m = len(rows_of[sr.request_id].drafts)
                idx += range(first_row[sr.request_id], first_row[sr.request_id] + m + 1)
                params += [sr.sampling_params] * (m + 1)
                nout += [sr.num_output_tokens + j for j in range(m + 1)]
                eos += [sr.eos_token_ids] * (m + 1)
            x = process_logits(logits.index_select(0, host_to_device(idx, torch.long, dev)), params,
                               num_output_tokens=nout, eos_token_ids=eos)
            targets = x.argmax(dim=-1).tolist()
            j = 0
            for sr in greedy:
                rs = rows_of[sr.request_id]
                m = len(rs.drafts)
                tokens[sr.request_id] = accept_greedy(rs.drafts, targets[j:j + m + 1])
                j += m + 1
        for sr in srs:
            if sr.sampling_params.greedy:
                continue
            rid = sr.request_id
            rs = rows_of[rid]
            m = len(rs.drafts)
            try:
                rows = host_to_device(list(range(first_row[rid], first_row[rid] + m + 1)), torch.long, dev)
                x = process_logits(logits.index_select(0, rows), [sr.sampling_params] * (m + 1),
                                   num_output_tokens=[sr.num_output_tokens + j for j in range(m + 1)],
                                   eos_token_ids=[sr.eos_token_ids] * (m + 1))
                p = torch.softmax(x, dim=-1)
                q = torch.stack(rs.q) if m else p[:0]
                gen = r.sampling_states.generator(rid, sr.sampling_params.seed, dev)
                tokens[rid] = accept_sampled(p, q, rs.drafts, gen)
            except Exception as e:  # noqa: BLE001 - this request alone fails
                failed[rid] = f"speculative sampling failed: {type(e).__name__}: {e}"
        layers = {rid: rows_of[rid].draft_layers[:len(toks) - 1] + [L] for rid, toks in tokens.items()}
        return tokens, layers, failed
