"""Online choice of ``layer_skip``'s skip set from the full model's per-layer hidden states (CLaSp).

CLaSp (Chen et al., ACL 2025, arXiv 2505.24196, Sec. 3.2, Alg. 1) re-chooses the skip set during
decoding: after a verification, the full model's hidden states ``h_0 .. h_L`` of verified tokens
(``h_0`` the embedding, ``h_i`` the residual stream after decoder layer ``i``) are known, and a
dynamic program picks the ``M`` layers to skip whose skipped model keeps its last hidden state
closest (cosine similarity) to ``h_L``:

* ``g[i][j]``: the best hidden state after layers ``1..i`` with ``j`` of them skipped; ``g[0][0] =
  h_0``.
* Layer ``i`` kept: ``f_i(g[i-1][j])``; skipped: ``g[i-1][j-1]``; of the two candidates for
  ``g[i][j]`` the one with the larger cosine similarity to ``h_i`` is kept (the approximate optimal
  substructure of CLaSp). The skip set is read back from the choices at ``g[L][M]``.

CLaSp runs layer ``i`` on the ``M + 1`` candidate states; here the layer's output is approximated
with the full model's own residual update, ``f_i(x) ~= x + (h_i - h_{i-1})``, so the program needs only
the ``[L + 1, C, d]`` states of ``C`` verified tokens (its score sums the ``C`` tokens' cosines), runs on
their device with no host sync, and reads its ``[L, M + 1]`` choice table to the host once. The
first and the last layer are never skipped (they decide the embedding's reading and the token).
"""
from __future__ import annotations

import torch

# verifications between two re-selections of one request (CLaSp's "sparse persistence": the best
# skip set changes slowly from one verification to the next); the first verification re-selects
RESELECT_EVERY = 8


def skip_choices(states: torch.Tensor, num_skip: int) -> torch.Tensor:
    """CLaSp's dynamic program on ``states: [L + 1, C, d]`` (``h_0 .. h_L`` of ``C`` tokens, any float
    dtype): ``[L, M + 1]`` bool on ``states``' device, entry ``[i - 1, j]`` True when ``g[i][j]``
    skips layer ``i`` (:func:`skip_set_from_choices` reads the set). ``M = num_skip``; layers ``1``
    and ``L`` are never skipped.

    Raises:
        ValueError: ``num_skip`` outside ``[1, L - 2]``.
    """
    L = states.shape[0] - 1
    M = num_skip
    if not 1 <= M <= L - 2:
        raise ValueError(f"num_skip must be in [1, {L - 2}] (layers 1 and {L} are never skipped), got {M}")
    h = states.float()
    dev = h.device
    C, d = h.shape[1], h.shape[2]
    neg = torch.tensor(float("-inf"), device=dev)
    g = h[0].unsqueeze(1).expand(C, M + 1, d).contiguous()  # [C, M + 1, d]; only j = 0 is reachable
    choices = torch.zeros(L, M + 1, dtype=torch.bool, device=dev)
    for i in range(1, L + 1):
        reach = min(max(i - 2, 0), M)  # g[i-1][j] is reachable for j <= reach (layers 2..i-1 skippable)
        keep = g + (h[i] - h[i - 1]).unsqueeze(1)
        target = h[i].unsqueeze(1)
        if 1 < i < L:
            skip = torch.cat([g[:, :1], g[:, :-1]], dim=1)  # skip[j] = g[j - 1]
            sk = torch.cosine_similarity(skip, target, dim=-1).sum(0)  # [M + 1]
            kp = torch.cosine_similarity(keep, target, dim=-1).sum(0)
            j = torch.arange(M + 1, device=dev)
            sk = torch.where((j >= 1) & (j <= reach + 1), sk, neg)
            kp = torch.where(j <= reach, kp, neg)
            choose = sk > kp
            choices[i - 1] = choose
            g = torch.where(choose.view(1, M + 1, 1), skip, keep)
        else:
            g = keep
    return choices


def skip_set_from_choices(choices: list[list[bool]], num_skip: int) -> tuple[int, ...]:
    """The skip set (1-based, sorted) that reaches ``g[L][M]`` through the host copy of
    :func:`skip_choices`' table."""
    j, out = num_skip, []
    for i in range(len(choices), 0, -1):
        if j and choices[i - 1][j]:
            out.append(i)
            j -= 1
    return tuple(sorted(out))


def select_skip_layers(states: torch.Tensor, num_skip: int) -> tuple[int, ...]:
    """:func:`skip_choices` then :func:`skip_set_from_choices`: one device->host read."""
    return skip_set_from_choices(skip_choices(states, num_skip).tolist(), num_skip)
