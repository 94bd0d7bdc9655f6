"""The model runner's side of lossless early exit: the drafting loop and the acceptance of drafts.

One iteration of a request scheduled with ``num_draft_tokens = k > 0`` (see
:mod:`cluster.model.speculative` for the two modes and the references):

1. :meth:`SpecDecoder.draft`: up to ``k`` drafting passes over every such request of the batch at
   once (pass ``t`` runs each request's ``t``-th row from layer 1 to its draft exit; ``layer_skip``
   requests have passes of their own, one per draft step and skip set, through every layer but the
   skipped ones); each pass reads its drafts to the host (one small transfer; with tensor
   parallelism rank 0's draws are broadcast).
2. The iteration's one forward (:func:`~cluster.model.exits.forward_with_exits`) runs, beside the
   other requests' decodes and prefill chunks, every draft row as a decode row that joins at the
   depth its draft reached (:class:`~cluster.model.exits.Join`; ``layer_skip`` rows at depth 0: all
   ``L`` layers), so the full model's distribution after each row is known.
3. :meth:`SpecDecoder.accept` (rank 0): greedy or speculative-sampling acceptance.

``layer_skip`` requests with ``skip_selection="online"`` draft with a skip set this rank keeps per
request (CLaSp): every :data:`~cluster.model.skip_select.RESELECT_EVERY` verifications, starting with
the first, the verification keeps the per-layer hidden states of the request's rows
(:meth:`SpecDecoder.capture_rows`; every row ran all ``L`` layers of the full model, so each is a
full-model trajectory whatever its acceptance) and :meth:`SpecDecoder.reselect` runs the dynamic
program of :mod:`cluster.model.skip_select` on them; rank 0's choice is broadcast, so every rank
drafts with the same set. Rows of requests with equal skip sets draft in one pass.
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.core.outputs import ScheduledRequest
from cluster.distributed import broadcast_from_driver
from cluster.model.exit_heads import ExitHeads
from cluster.model.layers.sampler import host_to_device, process_logits
from cluster.model.llama import LlamaForCausalLM
from cluster.model.skip_select import RESELECT_EVERY, skip_choices, skip_set_from_choices
from cluster.model.speculative import accept_greedy, accept_sampled, draft_forward, skip_draft_forward
from cluster.worker.input_batch import HostBatch, InputPacker, RowState
from cluster.worker.sampling_states import SamplingStates


class SpecDecoder:
    """Drafting and acceptance on one rank, beside the model runner.

    Args:
        model, heads: the rank's model and its exit heads (None: no exit layers; ``verified`` drafting
            raises; ``self_speculative`` and ``layer_skip`` use the final norm and the LM head).
        kv_caches: the rank's per-layer KV caches ``[2, num_blocks, block_size, KVH_local, d]``: the
            runner's list, which it refills in place when the cache is (re)allocated.
        packer: the runner's :class:`~cluster.worker.input_batch.InputPacker` (block size, device).
        num_layers: decoder layers of the model (the exit layer of the full model's own token).
        sampling_states: the driver rank's per-request sampling state (seeded generators).
        is_driver: rank 0, which draws sampled drafts and accepts (its draws are broadcast).
    """

    def __init__(self, model: LlamaForCausalLM, heads: Optional[ExitHeads], kv_caches: list[torch.Tensor],
                 packer: InputPacker, num_layers: int, sampling_states: SamplingStates, is_driver: bool):
        self.model = model
        self.heads = heads
        self.kv_caches = kv_caches
        self.packer = packer
        self.num_layers = num_layers
        self.sampling_states = sampling_states
        self.is_driver = is_driver
        # online skip selection, per request: [its current skip set, verifications so far]
        self.online: dict[str, list] = {}
        # this iteration's re-selections: (request id, its skip set's size, its rows in the capture)
        self._due: list[tuple[str, int, int]] = []

    # ------------------------------------------------------------------- online skip selection
    def skip_set(self, sr: ScheduledRequest) -> tuple[int, ...]:
        """The skip set ``sr`` drafts with now: its plan's, or (``online``) the one last chosen for it."""
        if sr.spec.skip_selection != "online":
            return sr.spec.skip_layers
        return self.online.setdefault(sr.request_id, [sr.spec.skip_layers, 0])[0]

    def drop(self, request_id: str) -> None:
        """Forget a finished request's online skip set."""
        self.online.pop(request_id, None)

    def capture_rows(self, so, rows_of: dict[str, RowState], token_of_sample: list[int]) -> Optional[torch.Tensor]:
        """The ``[C] long`` token indices (``token_of_sample``: the token of each sample row of the
        verification, :attr:`~cluster.model.exits.ExitBatch.host_rows`) of the rows of the requests
        that re-select their skip set after this iteration's verification; None when none does."""
        if not self._due:
            return None
        from cluster.worker.input_batch import sample_layout

        first = sample_layout(so, rows_of)[0]
        due = {rid for rid, _, _ in self._due}
        idx, order = [], []
        for sr in so.scheduled:
            rid = sr.request_id
            if rid in due:
                n = len(rows_of[rid].depths)
                idx += [token_of_sample[first[rid] + j] for j in range(n)]
                order.append((rid, len(self.online[rid][0]), n))
        self._due = order
        return host_to_device(idx, torch.long, self.packer.device)

    def reselect(self, captured: torch.Tensor) -> None:
        """CLaSp's re-selection for the requests of :meth:`capture_rows` from ``captured: [L + 1, C,
        hidden]`` (their rows' states after each layer): one dynamic program per request on the
        device, their choice tables broadcast from rank 0 and read to the host together (one sync)."""
        due, self._due = self._due, []
        tables, j = [], 0
        for rid, m, n in due:
            tables.append(skip_choices(captured[:, j:j + n], m).flatten())
            j += n
        flat = broadcast_from_driver(torch.cat(tables).to(torch.uint8)).tolist()
        j = 0
        for rid, m, _ in due:
            size = self.num_layers * (m + 1)
            rows = [flat[j + i * (m + 1): j + (i + 1) * (m + 1)] for i in range(self.num_layers)]
            self.online[rid][0] = skip_set_from_choices(rows, m)
            j += size

    # ------------------------------------------------------------------------------- drafting
    def draft(self, srs: list[ScheduledRequest]) -> dict[str, RowState]:
        """Draft for ``srs`` (each with ``num_draft_tokens > 0`` and a ``spec``); returns each request's
        :class:`RowState` (``len(drafts) + 1`` rows). Writes the drafts' K/V of the layers they ran."""
        self._due = []
        skips = [sr for sr in srs if sr.spec.mode == "layer_skip"]
        exits = [sr for sr in srs if sr.spec.mode != "layer_skip"]
        st = self._draft_exits(exits) if exits else {}
        if skips:
            st.update(self._draft_skips(skips))
        return st

    def _draft_skips(self, srs: list[ScheduledRequest]) -> dict[str, RowState]:
        """``layer_skip`` drafting: per skip set, one pass per draft step over its live requests'
        newest rows (:func:`skip_draft_forward`). Every row joins the verification at depth 0."""
        st = {sr.request_id: RowState(depths=[0], hidden=[None]) for sr in srs}
        groups: dict[tuple[int, ...], list[ScheduledRequest]] = {}
        for sr in srs:
            groups.setdefault(self.skip_set(sr), []).append(sr)
            if sr.spec.skip_selection == "online":
                state = self.online[sr.request_id]
                if state[1] % RESELECT_EVERY == 0:
                    self._due.append((sr.request_id, len(state[0]), 0))
                state[1] += 1
        for skip, live in groups.items():
            kept = self.num_layers - len(skip)  # the "exit layer" of its drafts: the layers they ran
            cur = {sr.request_id: sr.token_ids[0] for sr in live}
            t = 0
            while live:
                host = HostBatch(ids=[cur[sr.request_id] for sr in live])
                for sr in live:
                    host.decode_row(sr.block_table, sr.start_position + t)
                dev = self.packer.pack(host)
                logits = skip_draft_forward(self.model, self.heads, dev.input_ids, dev.positions,
                                            dev.attention_metadata(), self.kv_caches, skip)
                toks, qs = self._draw(live, logits, list(range(len(live))), t)
                nxt = []
                for k, sr in enumerate(live):
                    rs = st[sr.request_id]
                    rs.drafts.append(toks[k])
                    rs.draft_layers.append(kept)
                    rs.q.append(qs[k])
                    rs.depths.append(0)  # the draft's own row: all L layers in the verification
                    rs.hidden.append(None)
                    cur[sr.request_id] = toks[k]
                    if len(rs.drafts) < sr.num_draft_tokens:
                        nxt.append(sr)
                live, t = nxt, t + 1
        return st

    def _draft_exits(self, srs: list[ScheduledRequest]) -> dict[str, RowState]:
        """``verified`` / ``self_speculative`` drafting: passes from layer 1 to each row's exit
        (:func:`draft_forward`), earlier rows that did not reach their draft depth riding along."""
        heads = self.heads
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
            # reach), then each live request's newest row (the only rows with a token id)
            pend = [(q, j) for q, sr in enumerate(live) for j, dep in enumerate(st[sr.request_id].depths)
                    if dep < stop[q]]
            host = HostBatch(ids=[cur[sr.request_id] for sr in live])
            for q, j in pend:
                host.decode_row(live[q].block_table, live[q].start_position + j)
            for sr in live:
                host.decode_row(sr.block_table, sr.start_position + t)
                host.threshold(sr.exit_threshold)
            dev = self.packer.pack(host)
            pstates = torch.stack([st[live[q].request_id].hidden[j] for q, j in pend]) if pend else None
            res = draft_forward(self.model, heads, dev.input_ids, dev.positions, dev.attention_metadata(),
                                self.kv_caches, forced, dev.thresholds, stop,
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
        dev = logits.device
        sel = logits.index_select(0, host_to_device(rows, torch.long, dev))
        params = [sr.sampling_params for sr in srs]
        x = process_logits(sel, params, num_output_tokens=[sr.num_output_tokens + t for sr in srs],
                           eos_token_ids=[sr.eos_token_ids for sr in srs])
        tok = x.argmax(dim=-1)
        qs: dict[int, Optional[torch.Tensor]] = {k: None for k in rows}
        if self.is_driver:
            states = self.sampling_states
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
        L = self.num_layers
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
                gen = self.sampling_states.generator(rid, sr.sampling_params.seed, dev)
                tokens[rid] = accept_sampled(p, q, rs.drafts, gen)
            except Exception as e:  # noqa: BLE001 - this request alone fails
                failed[rid] = f"speculative sampling failed: {type(e).__name__}: {e}"
        layers = {rid: rows_of[rid].draft_layers[:len(toks) - 1] + [L] for rid, toks in tokens.items()}
        return tokens, layers, failed
