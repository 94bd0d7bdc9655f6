"""Lossless early exit: drafts from exit heads, verified by the full model (one mechanism, two modes).

* ``self_speculative`` (LayerSkip, Elhoushi et al. ACL 2024): ``k`` drafts, each from layer ``E`` and
  its exit head; then one verification pass runs layers ``E+1..L`` for the draft rows, reusing the
  hidden states and the K/V of layers ``1..E`` that drafting computed (the newest draft runs all
  ``L`` layers), and the longest prefix of drafts the full model agrees with is kept.
* ``verified`` (AdaDecode, Wei et al. ICML 2025): a token whose exit test passes at layer ``l`` is a
  draft; drafting goes on while exits are confident (at most ``k`` drafts); the first token that is
  not confident by the last exit layer stops drafting and joins the verification at that depth. Each
  draft row's remaining layers ``l+1..L`` run in the verification pass, beside the next tokens.

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

from cluster.model.exits import ExitHeads
from cluster.model.layers.attention import AttentionMetadata
from cluster.model.layers.sampler import host_to_device
from cluster.model.llama import LlamaForCausalLM


@dataclass
class DraftResult:
    """One drafting pass over ``n`` decode rows (see :func:`draft_forward`)."""

    depths: list[int]  # host: layers each row ran (the depth of its kept hidden state)
    drafted: list[bool]  # host: the row's exit produced a draft token
    hidden: torch.Tensor  # [n, hidden] hidden state after ``depths[i]`` layers
    logits: torch.Tensor  # [n, V] float32 exit logits (rows with drafted[i] False: undefined)


def exit_logits(model: LlamaForCausalLM, heads: Optional[ExitHeads], layer: int, h: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary float32 logits ``[n, V]`` of the exit head at ``layer`` for ``h: [n, hidden]``:
    the trained head of that layer if there is one, else the shared final norm + LM head (LayerSkip)."""
    if heads is not None and str(layer) in heads.heads:
        return model.lm_head.full_logits(heads.local_logits(layer, h))
    return model.lm_head.full_logits(model.final_local_logits(h))


def draft_forward(model: LlamaForCausalLM, heads: Optional[ExitHeads], input_ids: torch.Tensor,
                  positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor],
                  forced: Sequence[int], thresholds: torch.Tensor, stop_depth: Sequence[int]) -> DraftResult:
    """Run ``n`` decode rows (``meta`` has no prefill) from layer 1 until each row drafts or stops.

    Row ``i`` drafts at layer ``forced[i]`` if that is > 0 (``self_speculative``), else at its first
    exit layer whose exit test passes with threshold ``thresholds[i]`` (NaN: the exit config's,
    ``verified``); it stops without a draft at ``stop_depth[i]``. A row writes the K/V of the layers
    it runs only (no KV fill). Rows leave the batch as they finish. Host syncs: one per exit layer
    checked (the pass mask), as :func:`~cluster.model.exits.forward_with_exits`.

    Args:
        input_ids, positions: ``[n]`` long on the model's device.
        thresholds: ``[n]`` float32.

    Returns:
        :class:`DraftResult`.
    """
    layers = model.model.layers
    n = input_ids.shape[0]
    dev = input_ids.device
    exit_at = set(heads.cfg.exit_layers) if heads is not None else set()
    h = model.model.embed_tokens(input_ids)
    hidden = h.new_empty(n, h.shape[1])
    logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=dev)
    depths, drafted = [0] * n, [False] * n
    active = list(range(n))  # host: original row of each row of ``h``
    cur_pos, cur_meta, cur_thr = positions, meta, thresholds
    for i in range(max(stop_depth)):
        h = layers[i](h, cur_pos, cur_meta, kv_caches[i])
        d = i + 1
        exiting = [k for k, r in enumerate(active) if forced[r] == d]
        check = [k for k, r in enumerate(active) if not forced[r] and d in exit_at]
        local_rows: dict[int, int] = {}
        local = None
        if check:
            whole = len(check) == len(active)
            idx = None if whole else host_to_device(check, torch.long, dev)
            ok, local = heads.decide(d, h if whole else h.index_select(0, idx),
                                     cur_thr if whole else cur_thr.index_select(0, idx))
            passed = ok.tolist()  # the one device->host sync of this exit layer
            for j, (k, p) in enumerate(zip(check, passed)):
                if p:
                    exiting.append(k)
                    local_rows[k] = j
        stopping = [k for k, r in enumerate(active) if stop_depth[r] == d and k not in exiting]
        leaving = sorted(exiting + stopping)
        if not leaving:
            continue
        rows = [active[k] for k in leaving]
        if exiting:
            exiting.sort()
            ex_rows = [active[k] for k in exiting]
            idx = host_to_device(exiting + ex_rows, torch.long, dev).split(len(exiting))
            if local is not None and len(local_rows) == len(exiting):  # softmax measures: logits exist
                lj = host_to_device([local_rows[k] for k in exiting], torch.long, dev)
                lg = model.lm_head.full_logits(local.index_select(0, lj))
            else:
                lg = exit_logits(model, heads, d, h.index_select(0, idx[0]))
            logits.index_copy_(0, idx[1], lg)
            for r in ex_rows:
                drafted[r] = True
        idx = host_to_device(leaving + rows, torch.long, dev).split(len(leaving))
        hidden.index_copy_(0, idx[1], h.index_select(0, idx[0]))
        for r in rows:
            depths[r] = d
        keep = [k for k in range(len(active)) if k not in set(leaving)]
        if not keep:
            break
        keep_dev = host_to_device(keep, torch.long, dev)
        h, cur_pos, cur_thr = h.index_select(0, keep_dev), cur_pos.index_select(0, keep_dev), cur_thr.index_select(0, keep_dev)
        cur_meta = cur_meta.select_decodes(keep_dev, len(keep))
        active = [active[k] for k in keep]
    return DraftResult(depths, drafted, hidden, logits)


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
