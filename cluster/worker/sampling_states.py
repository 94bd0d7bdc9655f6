"""The driver rank's per-request sampling state: seeded generators and penalty token histories."""
from __future__ import annotations

from typing import Optional

import torch

from cluster.model.layers.sampler import TokenHistory, host_to_device


class SamplingStates:
    """Per-request sampling state of the driver rank, kept until the request id shows up in
    ``SchedulerOutput.finished_req_ids`` (preemption keeps it).

    * a ``torch.Generator`` on the logits' device for each request with a seed;
    * for requests whose params ``uses_penalties``: one row of ``counts [capacity, V]`` int32 (how
      often each token was sampled so far; the runner adds each sampled token) and of
      ``prompt_mask [capacity, V]`` bool (token in the prompt), both on the logits' device. Rows are
      reused after a request finishes; capacity doubles when full.
    """

    def __init__(self):
        self.generators: dict[str, torch.Generator] = {}
        self.slots: dict[str, int] = {}
        self._free: list[int] = []
        self.counts: Optional[torch.Tensor] = None
        self.prompt_mask: Optional[torch.Tensor] = None

    def generator(self, request_id: str, seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
        if seed is None:
            return None
        g = self.generators.get(request_id)
        if g is None:
            g = self.generators[request_id] = torch.Generator(device=device).manual_seed(seed)
        return g

    def add_prompt(self, request_id: str, prompt_token_ids: list[int], vocab_size: int, device: torch.device) -> None:
        """Start the token history of a request with penalties (sent once, at its first scheduling)."""
        if request_id in self.slots:
            return
        if not self._free:
            self._grow(vocab_size, device)
        slot = self.slots[request_id] = self._free.pop()
        self.counts[slot].zero_()
        self.prompt_mask[slot].zero_()
        ids = [t for t in prompt_token_ids if 0 <= t < vocab_size]
        if ids:
            self.prompt_mask[slot, host_to_device(ids, torch.long, device)] = True

    def _grow(self, vocab_size: int, device: torch.device) -> None:
        old = 0 if self.counts is None else self.counts.shape[0]
        cap = max(8, 2 * old)
        counts = torch.zeros(cap, vocab_size, dtype=torch.int32, device=device)
        mask = torch.zeros(cap, vocab_size, dtype=torch.bool, device=device)
        if old:
            counts[:old] = self.counts
            mask[:old] = self.prompt_mask
        self.counts, self.prompt_mask = counts, mask
        self._free.extend(range(cap - 1, old - 1, -1))

    def history(self, request_ids: list[str]) -> tuple[Optional[TokenHistory], Optional[torch.Tensor]]:
        """The :class:`TokenHistory` of the batch rows that have one, and their slots ``[m]`` (device)."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self.slots]
        if not rows:
            return None, None
        slots = host_to_device([self.slots[request_ids[i]] for i in rows], torch.long, self.counts.device)
        return TokenHistory(rows, self.counts.index_select(0, slots), self.prompt_mask.index_select(0, slots)), slots

    def append(self, history: Optional[TokenHistory], slots: Optional[torch.Tensor], token_ids: torch.Tensor,
               failed: dict[int, str]) -> None:
        """Count the sampled tokens ``token_ids [n]`` (device) of the history rows; failed rows got none."""
        if history is None:
            return
        keep = [j for j, r in enumerate(history.rows) if r not in failed]
        if not keep:
            return
        if len(keep) < len(history.rows):
            slots = slots.index_select(0, host_to_device(keep, torch.long, slots.device))
        toks = token_ids.index_select(0, host_to_device([history.rows[j] for j in keep], torch.long, token_ids.device))
        self.counts.index_put_((slots, toks), torch.ones_like(toks, dtype=torch.int32), accumulate=True)

    def drop(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)
