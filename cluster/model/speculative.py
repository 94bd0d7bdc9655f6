"""Lossless early exit: drafts from exit heads or from the model minus some layers, verified by the
full model (one mechanism, three modes).

* ``self_speculative`` (LayerSkip, Elhoushi et al. ACL 2024): ``k`` drafts, each from layer ``E`` and
  its exit head; then one verification pass runs layers ``E+1..L`` for the draft rows, reusing the
  hidden states and the K/V of layers ``1..E`` that drafting computed (the newest draft runs all
  ``L`` layers), and the longest prefix of drafts the full model agrees with is kept.
* ``verified`` (AdaDecode, Wei et al. ICML 2025): a token whose exit test passes at layer ``l`` is a
  draft; drafting goes on while exits are confident (at most ``k`` drafts); the first token that is
  not confident by the last exit layer stops drafting and joins the verification at that depth. Each
  draft row's remaining layers ``l+1..L`` run in the verification pass, beside the next tokens.
* ``layer_skip`` (SWIFT, Xia et al. 2024, arXiv 2410.06916): ``k`` drafts, each from the whole model
  with a set ``S`` of intermediate decoder layers left out, then the final norm and the LM head
  (:func:`skip_draft_forward`); every draft row then runs all ``L`` layers in the verification (its
  approximate K/V of the kept layers are overwritten there).

No K/V fill is used: every draft row's K/V of its skipped layers is computed by the verification
from its true hidden state, so the cache of accepted tokens equals the full model's. A rejected
draft's slots are simply overwritten later (the scheduler keeps them reserved).

Acceptance is exact: greedy rows keep drafts equal to the full model's argmax; sampled rows use
speculative sampling (Leviathan et al. ICML 2023, Alg. 1; Chen et al. 2023): draft ``x ~ q``,
accept with probability ``min(1, p(x) / q(x))``, else draw from ``norm(max(0, p - q))``; with all
drafts accepted a bonus token is drawn from the full model's last distribution. ``p`` and ``q`` are
the processed distributions (temperature, top-k, top-p, logit_bias, min_tokens) of the full model
and of the draft, so the output distribution equals the full model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from cluster.model.exit_heads import ExitHeads
from cluster.model.layers.attention import AttentionMetadata
from cluster.model.layers.sampler import host_to_device
from cluster.model.compile import decode_graphs, kept_segments
from cluster.model.llama import LlamaForCausalLM


@dataclass
class DraftResult:
    """One drafting pass over ``n`` requests' newest rows and ``P`` pending rows (see :func:`draft_forward`)."""

    depths: list[int]  # host, per newest row: layers it ran (the depth of its kept hidden state)
    drafted: list[bool]  # host, per newest row: its exit produced a draft token
    hidden: torch.Tensor  # [n, hidden] newest rows' hidden states after ``depths[i]`` layers
    logits: torch.Tensor  # [n, V] float32 exit logits (rows with drafted[i] False: undefined)
    pending_depths: list[int]  # host, per pending row: its depth after the pass
    pending_hidden: torch.Tensor  # [P, hidden] pending rows' hidden states at that depth


def exit_logits(model: LlamaForCausalLM, heads: Optional[ExitHeads], layer: int, h: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary float32 logits ``[n, V]`` of a draft at ``layer`` for ``h: [n, hidden]``: the
    trained head of that layer if there is one, else the shared final norm (LayerSkip), then the
    FR-Spec reduced head if the exit heads have one, else the LM head (:meth:`ExitHeads.draft_logits`)."""
    if heads is not None:
        return heads.draft_logits(layer, h)
    return model.lm_head.full_logits(model.final_local_logits(h))


def draft_forward(model: LlamaForCausalLM, heads: Optional[ExitHeads], input_ids: torch.Tensor,
                  positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor],
                  forced: Sequence[int], thresholds: torch.Tensor, stop_depth: Sequence[int],
                  pending_owner: Sequence[int] = (), pending_depth: Sequence[int] = (),
                  pending_states: Optional[torch.Tensor] = None) -> DraftResult:
    """One drafting pass: ``n`` requests' newest rows run from layer 1 until each drafts or stops, and
    the requests' pending rows (earlier drafts whose layers are not complete) ride along.

    Rows: ``P`` pending rows first, then the ``n`` newest rows (``meta`` covers the ``P + n`` rows,
    all decode rows). Newest row ``i`` drafts at layer ``forced[i]`` if that is > 0
    (``self_speculative``), else at its first exit layer whose exit test passes with threshold
    ``thresholds[i]`` (NaN: the exit config's, ``verified``); it stops without a draft at
    ``stop_depth[i]``. Pending row ``r`` of request ``pending_owner[r]``, at depth
    ``pending_depth[r]`` with hidden state ``pending_states[r]``, runs the layers past its depth
    while its request is in the pass (AdaDecode's overlap: a draft's remaining layers share the
    weight reads of the next token's layers). A row writes the K/V of the layers it runs only (no
    KV fill). Host syncs: one per exit layer checked (the pass mask).

    Args:
        input_ids: ``[n]`` long; positions: ``[P + n]`` long; thresholds: ``[n]`` float32.

    Returns:
        :class:`DraftResult`.
    """
    layers = model.model.layers
    n = input_ids.shape[0]
    P = len(pending_owner)
    R = P + n
    dev = input_ids.device
    exit_at = set(heads.cfg.exit_layers) if heads is not None else set()
    H = model.model.embed_tokens(input_ids)
    if P:
        H = torch.cat([pending_states.to(H.dtype), H])
    owner = list(pending_owner) + list(range(n))
    join = list(pending_depth) + [0] * n
    depth_of = list(join)
    logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=dev)
    hidden = H.new_empty(n, H.shape[1])
    depths, drafted = [0] * n, [False] * n
    alive = [True] * n
    act_prev, act_dev, meta_act, pos_act = None, None, meta, positions
    for i in range(max(stop_depth)):
        act = [r for r in range(R) if alive[owner[r]] and join[r] <= i]
        if act != act_prev:
            whole = len(act) == R
            act_dev = None if whole else host_to_device(act, torch.long, dev)
            meta_act = meta if whole else meta.select_decodes(act_dev, len(act))
            pos_act = positions if whole else positions.index_select(0, act_dev)
            act_prev = act
        out = layers[i](H if act_dev is None else H.index_select(0, act_dev), pos_act, meta_act, kv_caches[i])
        if act_dev is None:
            H = out
        else:
            H = H.index_copy(0, act_dev, out)
        d = i + 1
        for r in act:
            depth_of[r] = d
        live = [q for q in range(n) if alive[q]]
        exiting = [q for q in live if forced[q] == d]
        check = [q for q in live if not forced[q] and d in exit_at]
        local_rows: dict[int, int] = {}
        local = None
        if check:
            idx = host_to_device([P + q for q in check] + check, torch.long, dev).split(len(check))
            ok, local = heads.decide(d, H.index_select(0, idx[0]), thresholds.index_select(0, idx[1]))
            for j, (q, passed) in enumerate(zip(check, ok.tolist())):  # the one sync of this exit layer
                if passed:
                    exiting.append(q)
                    local_rows[q] = j
        leaving = sorted(set(exiting) | {q for q in live if stop_depth[q] == d})
        if not leaving:
            continue
        if exiting:
            exiting.sort()
            idx = host_to_device([P + q for q in exiting] + exiting, torch.long, dev).split(len(exiting))
            if local is not None and len(local_rows) == len(exiting) and heads.draft_head is None:  # logits exist
                lg = model.lm_head.full_logits(local.index_select(0, host_to_device(
                    [local_rows[q] for q in exiting], torch.long, dev)))
            else:
                lg = exit_logits(model, heads, d, H.index_select(0, idx[0]))
            logits.index_copy_(0, idx[1], lg)
            for q in exiting:
                drafted[q] = True
        idx = host_to_device([P + q for q in leaving] + leaving, torch.long, dev).split(len(leaving))
        hidden.index_copy_(0, idx[1], H.index_select(0, idx[0]))
        for q in leaving:
            depths[q] = d
            alive[q] = False
        if not any(alive):
            break
    return DraftResult(depths, drafted, hidden, logits, depth_of[:P], H[:P])


def skip_draft_forward(model: LlamaForCausalLM, heads: Optional[ExitHeads], input_ids: torch.Tensor,
                       positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor],
                       skip: Sequence[int]) -> torch.Tensor:
    """One ``layer_skip`` drafting pass: ``n`` decode rows (``input_ids, positions: [n]`` long, ``meta``
    their metadata) run every decoder layer whose 1-based number is not in ``skip``, writing their
    K/V for those layers only, then the final norm and the draft head (the FR-Spec reduced head of
    ``heads`` if it has one, else the LM head; :func:`exit_logits` at the last layer, which never
    has an exit head of its own). No exit test, no host sync.

    Returns:
        ``[n, V]`` float32 full-vocabulary draft logits.
    """
    skipped = set(skip)
    h = model.model.embed_tokens(input_ids)
    graphs = decode_graphs(model)
    segments = kept_segments(skipped, model.config.num_layers) if graphs is not None else []
    if segments and all(graphs.is_ready(*seg) for seg in segments):  # compiled at start-up
        for start, end in segments:
            h = graphs.run(h, positions, meta, kv_caches, start, end)[0]
        return exit_logits(model, heads, model.config.num_layers, h)
    for i, layer in enumerate(model.model.layers):
        if i + 1 not in skipped:
            h = layer(h, positions, meta, kv_caches[i])
    return exit_logits(model, heads, model.config.num_layers, h)


def accept_greedy(drafts: Sequence[int], targets: Sequence[int]) -> list[int]:
    """Greedy verification: ``targets[i]`` is the full model's token after ``drafts[:i]`` (``len(drafts)
    + 1`` of them). Returns the verified tokens: the drafts up to the first disagreement, then the
    full model's token there (or, all accepted, its token after the last draft)."""
    out: list[int] = []
    for d, t in zip(drafts, targets):
        if d != t:
            out.append(int(t))
            return out
        out.append(int(d))
    out.append(int(targets[len(drafts)]))
    return out


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int],
                   generator: Optional[torch.Generator]) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023, Alg. 1): ``p: [m+1, V]`` full-model and ``q: [m, V]``
    draft probabilities (processed, rows sum to 1) for ``m = len(drafts)`` drafts drawn from ``q``.

    Draft ``i`` is accepted while ``u_i * q_i(x_i) <= p_i(x_i)`` (``u_i ~ U[0, 1)``, i.e. with
    probability ``min(1, p/q)``); at the first rejection the token is drawn from ``norm(max(0, p_i -
    q_i))``; with every draft accepted a bonus token is drawn from ``p_m``. The returned tokens are
    distributed as tokens drawn from ``p`` one by one. One device->host read (the accept mask) plus
    one for the drawn token. Every tensor is made on ``p``'s device.
    """
    m = len(drafts)
    dev = p.device
    if m:
        d = host_to_device(list(drafts), torch.long, dev).unsqueeze(1)
        pd = p[:m].gather(1, d).squeeze(1)
        qd = q.gather(1, d).squeeze(1)
        u = torch.rand(m, generator=generator, device=dev)
        ok = (u * qd <= pd).tolist()
        a = ok.index(False) if False in ok else m
    else:
        a = 0
    if a == m:
        dist = p[m]
    else:
        dist = (p[a] - q[a]).clamp_min(0)
        s = dist.sum()
        dist = torch.where(s > 0, dist / s.clamp_min(torch.finfo(dist.dtype).tiny), p[a])
    tok = int(torch.multinomial(dist, 1, generator=generator).item())
    return [int(x) for x in drafts[:a]] + [tok]
