"""ReplicaStats: the load report an LLMServer replica sends to the request router.

Serve carries a replica's routing stats as a dict (``record_routing_stats`` must return one), so the
replica returns ``dataclasses.asdict(stats)`` and the router reads it back with
:meth:`ReplicaStats.of`: the keys are written here only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union


@dataclass(frozen=True)
class ReplicaStats:
    """One replica's outstanding work at time ``ts`` (every field defaults to "nothing reported").

    Attributes:
        running_tokens: prompt + generated tokens of its requests that have produced output.
        waiting_tokens: prompt tokens of its requests still waiting for their first token.
        num_running, num_waiting: the engine's running and waiting request counts.
        kv_usage: fraction of the KV cache's blocks in use, in [0, 1].
        kv_capacity_tokens: KV cache size in tokens (blocks x block size).
        mean_exit_layer: decoder layers run per generated token, mean of the recent window (None: not
            reported; counted as full depth).
        num_layers: the model's decoder layers (None: not reported).
        ts: wall-clock time (``time.time()``, seconds) of the snapshot (None: unknown).
    """

    running_tokens: int = 0
    waiting_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    kv_capacity_tokens: int = 0
    mean_exit_layer: Optional[float] = None
    num_layers: Optional[int] = None
    ts: Optional[float] = None

    def as_dict(self) -> dict:
        """The dict Serve carries (``record_routing_stats``'s return value)."""
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, stats: Union["ReplicaStats", Mapping[str, Any], None]) -> "ReplicaStats":
        """``stats`` as a ReplicaStats: None or ``{}`` (no report yet) gives the defaults.

        Raises:
            TypeError: a key that is not a field (a replica and router of different versions)."""
        if isinstance(stats, ReplicaStats):
            return stats
        return cls(**(stats or {}))
