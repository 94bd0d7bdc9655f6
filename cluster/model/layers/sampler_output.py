"""The sampler's result on the device and its one device-to-host transfer; logprobs of the sampled rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from cluster.model.layers.host import host_to_device

if TYPE_CHECKING:
    import torch


@dataclass
class SamplerOutput:
    """:func:`sample`'s result, still on the device; :meth:`to_host` brings it over in one transfer."""

    # [n] int64 on the logits' device: the sampled token per row, -1 for failed rows
    token_ids: "torch.Tensor"
    # batch row -> error message for rows that got no token (decided on the host, no sync)
    failed: dict[int, str] = field(default_factory=dict)
    # rows (not failed) that asked for logprobs, ascending, and the k each asked for
    logprob_rows: list[int] = field(default_factory=list)
    logprob_ks: list[int] = field(default_factory=list)
    # [len(logprob_rows)] float32: log-softmax of the raw logits at the sampled token
    sampled_logprobs: Optional["torch.Tensor"] = None
    # [len(logprob_rows), max k] int64 / float32: the most likely tokens of the raw logits, best first
    top_ids: Optional["torch.Tensor"] = None
    top_logprobs: Optional["torch.Tensor"] = None

    def to_host(self, *extra: "torch.Tensor"):
        """Copy everything to Python with ONE device-to-host transfer (one ``.tolist()``).

        Token ids, the ``extra`` integer tensors (e.g. the exit layers) and the logprobs are packed
        into one float64 tensor (exact for ids and layers below 2**53; float32 logprobs convert
        exactly) on the tokens' device.

        Returns:
            ``(token_ids, extras, logprobs)``: ``list[int]`` of ``n`` ids (-1 for failed rows), one
            ``list[int]`` per ``extra`` tensor, and ``{row: (sampled token's logprob, [(token id,
            logprob), ...] k most likely first)}`` for :attr:`logprob_rows`.
        """
        import torch

        dev = self.token_ids.device
        parts = [self.token_ids.to(torch.float64)]
        parts += [e.to(device=dev, dtype=torch.float64).reshape(-1) for e in extra]
        if self.logprob_rows:
            parts += [self.sampled_logprobs.to(torch.float64)]
            if self.top_ids is not None:
                parts += [self.top_ids.to(torch.float64).reshape(-1), self.top_logprobs.to(torch.float64).reshape(-1)]
        flat = torch.cat(parts).tolist()  # the one device-to-host transfer of the sampling step
        pos = 0

        def take(k):
            nonlocal pos
            pos += k
            return flat[pos - k:pos]

        token_ids = [int(t) for t in take(self.token_ids.numel())]
        extras = [[int(v) for v in take(e.numel())] for e in extra]
        logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if self.logprob_rows:
            m = len(self.logprob_rows)
            sampled = take(m)
            kmax = 0 if self.top_ids is None else self.top_ids.shape[1]
            ids, vals = take(m * kmax), take(m * kmax)
            for j, (row, k) in enumerate(zip(self.logprob_rows, self.logprob_ks)):
                top = [(int(ids[j * kmax + c]), vals[j * kmax + c]) for c in range(min(k, kmax))]
                logprobs[row] = (sampled[j], top)
        return token_ids, extras, logprobs


def add_logprobs(out: SamplerOutput, logits, params) -> None:
    """Fill ``out``'s logprob fields, batched over the rows that ask for them (not failed rows)."""
    import torch

    rows = [i for i, p in enumerate(params) if p.logprobs is not None and i not in out.failed]
    if not rows:
        return
    ks = [params[i].logprobs for i in rows]
    idx = host_to_device(rows, torch.long, logits.device)
    lsm = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    out.logprob_rows, out.logprob_ks = rows, ks
    out.sampled_logprobs = lsm.gather(1, out.token_ids.index_select(0, idx).unsqueeze(1)).squeeze(1)
    kmax = min(max(ks), logits.shape[1])
    if kmax > 0:
        out.top_logprobs, out.top_ids = lsm.topk(kmax, dim=-1)
