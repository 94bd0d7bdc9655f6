"""Replica choice for LLMServer: power of two choices on outstanding work, with prefix affinity.

Two layers:

* :class:`PrefixLoadPolicy`: pure Python (no Ray), unit-tested on fake replicas.

  - *Load* of a replica, in full-depth tokens: outstanding work + ``kv_weight * kv_usage *
    kv_capacity``. The replica reports its running + waiting tokens, KV usage and the recent mean exit
    layer of its generated tokens, stamped with the time ``ts`` of the snapshot, as a
    :class:`~deployments.replica_stats.ReplicaStats` through ``record_routing_stats`` (polled by the
    Serve controller every ``request_routing_stats_period_s``). The router corrects that stale
    snapshot with what it knows exactly and at once: it subtracts the requests it sent there that
    finished after ``ts`` and adds the ones it sent after ``ts``. So a burst from one router spreads
    before the next poll, and a conversation's next turn, sent the moment the previous one ends,
    sees its replica idle.
  - *Exit-aware cost*: a decode token runs ``mean_exit_layer`` of the model's ``num_layers`` decoder
    layers on average, so running requests (and the expected output of requests routed since the
    snapshot) count ``depth = mean_exit_layer / num_layers`` per token, while waiting tokens (prefill,
    always full depth) count 1. A replica whose requests exit early is seen as less loaded. Depth is
    clamped to [``min_depth``, 1]; a replica that reports no exit layer counts full depth.
  - *Prefix affinity*: the router remembers, per block of ``block_size`` prompt tokens (a hash chain
    over the prefix, like the engine's prefix cache), the replica that last received it. A request
    goes to the replica holding its longest remembered prefix while that replica's load exceeds the
    least-loaded replica's by at most ``min(imbalance_tokens, matched prefix tokens)``: the detour
    costs no more than the prefill it saves. Otherwise: power of two choices (two random replicas,
    less loaded first).

* :class:`PrefixAwareLoadRouter`: the Ray Serve request router (``ray.serve.request_router``
  API, alpha) that feeds the policy from ``RunningReplica.routing_stats`` (read back as
  :class:`~deployments.replica_stats.ReplicaStats`) and the :class:`EngineRequest`'s
  ``prompt_token_ids``, and keeps its local accounting through ``on_request_routed`` /
  ``on_request_completed``. ``build_app`` enables it with ``RequestRouterConfig(request_router_class=
  PrefixAwareLoadRouter, request_router_kwargs={...})``. Its constructor checks the Serve internals
  it patches (:mod:`deployments.serve_compat`).

Ray API: https://docs.ray.io/en/latest/serve/advanced-guides/custom-request-router.html
"""
from __future__ import annotations

import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.engine.protocol import EngineRequest
from deployments import serve_compat
from deployments.replica_stats import ReplicaStats

Stats = Union[ReplicaStats, Mapping[str, Any], None]  # a report, its dict form, or none yet


@dataclass
class _InFlight:
    replica: Hashable
    tokens: int
    since: float  # time routed (confirmed) or chosen (tentative)
    confirmed: bool = False
    prompt_tokens: int = 0  # of ``tokens``: the prompt (full depth); the rest is expected output


@dataclass
class _Done:
    replica: Hashable
    tokens: int
    routed: float
    done: float
    prompt_tokens: int = 0


class PrefixLoadPolicy:
    """Routing decisions over replica ids and their reported stats (see module docstring).

    Args:
        block_size: prompt tokens per prefix-hash block.
        imbalance_tokens: the most extra load (tokens) prefix affinity may accept.
        kv_weight: weight of KV occupancy (``kv_usage * kv_capacity_tokens``) in the load.
        max_kv_usage: a replica at or above this KV usage gets no affinity traffic.
        expected_output_tokens: output tokens assumed per request for local accounting.
        max_prefix_blocks: size of the prefix table (LRU).
        unconfirmed_ttl_s, confirmed_ttl_s: local in-flight entries older than this are dropped.
        done_ttl_s: how long finished requests are kept to correct stale snapshots.
        min_depth: lower bound of the exit-depth factor (mean exit layer / layers).
        clock: wall-clock time (comparable with the replicas' ``ts``).
    """

    def __init__(self, block_size: int = 16, imbalance_tokens: int = 1024, kv_weight: float = 0.5,
                 max_kv_usage: float = 0.95, expected_output_tokens: int = 128,
                 max_prefix_blocks: int = 200_000, unconfirmed_ttl_s: float = 60.0,
                 confirmed_ttl_s: float = 3600.0, done_ttl_s: float = 60.0,
                 min_depth: float = 0.05, rng: Optional[random.Random] = None, clock=time.time):
        self.block_size = block_size
        self.imbalance_tokens = imbalance_tokens
        self.kv_weight = kv_weight
        self.max_kv_usage = max_kv_usage
        self.expected_output_tokens = expected_output_tokens
        self.max_prefix_blocks = max_prefix_blocks
        self.unconfirmed_ttl_s = unconfirmed_ttl_s
        self.confirmed_ttl_s = confirmed_ttl_s
        self.done_ttl_s = done_ttl_s
        self.min_depth = min_depth
        self.rng = rng or random.Random()
        self.clock = clock
        self._prefix: OrderedDict[int, Hashable] = OrderedDict()
        self._inflight: dict[str, _InFlight] = {}
        self._done: deque[_Done] = deque()
        self.num_affinity_routes = 0
        self.num_balanced_routes = 0

    # ---------------------------------------------------------------------------- prefix table
    def block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """Chained hashes of the prompt's full blocks (block i's hash covers tokens [0, (i+1)*bs))."""
        bs, out, parent = self.block_size, [], 0
        for i in range(len(token_ids) // bs):
            parent = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            out.append(parent)
        return out

    def match(self, hashes: Sequence[int], candidates) -> tuple[Optional[Hashable], int]:
        """(replica holding the longest remembered prefix among ``candidates``, matched blocks)."""
        best, n = None, 0
        for i, h in enumerate(hashes):
            owner = self._prefix.get(h)
            if owner is None:
                break
            if owner in candidates:
                best, n = owner, i + 1
        return best, n

    def remember(self, hashes: Sequence[int], replica: Hashable) -> None:
        for h in hashes:
            self._prefix[h] = replica
            self._prefix.move_to_end(h)
        while len(self._prefix) > self.max_prefix_blocks:
            self._prefix.popitem(last=False)

    def forget_replica(self, replica: Hashable) -> None:
        for h in [h for h, r in self._prefix.items() if r == replica]:
            del self._prefix[h]
        for k in [k for k, f in self._inflight.items() if f.replica == replica]:
            del self._inflight[k]
        self._done = deque(d for d in self._done if d.replica != replica)

    # ------------------------------------------------------------------------------------ load
    def local_tokens(self, replica: Hashable) -> int:
        return sum(f.tokens for f in self._inflight.values() if f.replica == replica)

    def depth(self, stats: Stats) -> float:
        """Fraction of the decoder layers a generated token runs on this replica lately
        (``mean_exit_layer / num_layers``, clamped to [min_depth, 1]); 1 when not reported."""
        st = ReplicaStats.of(stats)
        if st.mean_exit_layer is None or not st.num_layers:
            return 1.0
        d = float(st.mean_exit_layer) / float(st.num_layers)
        return min(1.0, max(self.min_depth, d)) if d == d else 1.0

    def _cost(self, f, depth: float) -> float:
        """Full-depth tokens of one local entry: its prompt at full depth, its output at ``depth``."""
        return f.prompt_tokens + (f.tokens - f.prompt_tokens) * depth

    def load(self, replica: Hashable, stats: Stats) -> float:
        """Outstanding work of ``replica`` in full-depth tokens (see module docstring)."""
        st = ReplicaStats.of(stats)
        depth = self.depth(st)
        reported = float(st.running_tokens) * depth + float(st.waiting_tokens)
        kv = float(st.kv_usage) * float(st.kv_capacity_tokens)
        mine = [f for f in self._inflight.values() if f.replica == replica]
        ts = st.ts
        if ts is None:  # no snapshot time: the larger of the two views
            return max(reported, sum(self._cost(f, depth) for f in mine)) + self.kv_weight * kv
        before = sum(self._cost(f, depth) for f in mine if f.since <= ts)
        after = sum(self._cost(f, depth) for f in mine if f.since > ts)
        gone = sum(self._cost(d, depth) for d in self._done if d.replica == replica and d.routed <= ts < d.done)
        still = max(reported - gone, float(before), 0.0)
        if reported > 0:
            kv *= min(1.0, still / reported)
        return still + after + self.kv_weight * kv

    def _expire(self) -> None:
        now = self.clock()
        for k in [k for k, f in self._inflight.items()
                  if now - f.since > (self.confirmed_ttl_s if f.confirmed else self.unconfirmed_ttl_s)]:
            del self._inflight[k]
        while self._done and now - self._done[0].done > self.done_ttl_s:
            self._done.popleft()

    # ---------------------------------------------------------------------------------- choose
    def choose(self, replicas: Mapping[Hashable, Stats],
               token_ids: Optional[Sequence[int]] = None, request_key: Optional[str] = None,
               max_tokens: Optional[int] = None) -> list[list[Hashable]]:
        """Ranks of replica ids, most preferred first (one id per rank).

        Args:
            replicas: candidate replica id -> its reported :class:`ReplicaStats` (or its dict form;
                None or empty: not reported yet).
            token_ids: the prompt (None: no prefix affinity).
            request_key: id for local accounting (None: none).
        """
        if not replicas:
            return []
        self._expire()
        ids = list(replicas)
        stats = {r: ReplicaStats.of(replicas[r]) for r in ids}
        loads = {r: self.load(r, stats[r]) for r in ids}
        hashes = self.block_hashes(token_ids) if token_ids else []
        ranks: list[Hashable] = []
        owner, n_blocks = self.match(hashes, replicas) if hashes else (None, 0)
        if owner is not None:
            allowed = min(self.imbalance_tokens, n_blocks * self.block_size)
            kv_usage = float(stats[owner].kv_usage)
            if loads[owner] - min(loads.values()) <= allowed and kv_usage < self.max_kv_usage:
                ranks.append(owner)
        if ranks:
            self.num_affinity_routes += 1
        else:
            self.num_balanced_routes += 1
        pair = self.rng.sample(ids, 2) if len(ids) >= 2 else ids
        pair.sort(key=lambda r: loads[r])  # stable: equal loads keep the random order
        ranks += [r for r in pair if r not in ranks]
        if request_key is not None:
            prompt = len(token_ids or ())
            tokens = prompt + min(max_tokens or self.expected_output_tokens, self.expected_output_tokens)
            self._inflight[request_key] = _InFlight(ranks[0], tokens, self.clock(), prompt_tokens=prompt)
            if hashes:
                self.remember(hashes, ranks[0])
        return [[r] for r in ranks]

    def on_routed(self, request_key: str, replica: Hashable, token_ids: Optional[Sequence[int]] = None) -> None:
        """The request was accepted by ``replica`` (it may differ from the first rank)."""
        f = self._inflight.get(request_key)
        if f is not None:
            f.replica, f.confirmed, f.since = replica, True, self.clock()
        if token_ids:
            self.remember(self.block_hashes(token_ids), replica)

    def on_completed(self, request_key: str) -> None:
        f = self._inflight.pop(request_key, None)
        if f is not None and f.confirmed:
            self._done.append(_Done(f.replica, f.tokens, f.since, self.clock(), f.prompt_tokens))


def _request_fields(pending_request: Optional[PendingRequest]) -> tuple[Optional[list[int]], Optional[int]]:
    """(prompt token ids, max_tokens) of an ``LLMServer.generate`` call (its :class:`EngineRequest`
    argument); (None, None) for any other call."""
    if pending_request is None:
        return None, None
    for arg in list(pending_request.args or ()) + list((pending_request.kwargs or {}).values()):
        if isinstance(arg, EngineRequest):
            return list(arg.prompt_token_ids), arg.sampling_params.max_tokens
    return None, None


class PrefixAwareLoadRouter(RequestRouter):
    """Ray Serve request router running :class:`PrefixLoadPolicy` (kwargs: the policy's arguments)."""

    _policy: Optional[PrefixLoadPolicy] = None

    def __init__(self, *args, **kwargs):
        """Serve's constructor, then the check of the Serve internals this router patches.

        Raises:
            RuntimeError: the installed Ray lacks one (:func:`serve_compat.check_router_internals`)."""
        super().__init__(*args, **kwargs)
        serve_compat.check_router_internals(self)

    def initialize_state(self, **kwargs):
        self._policy = PrefixLoadPolicy(**kwargs)

    @property
    def policy(self) -> PrefixLoadPolicy:
        if self._policy is None:
            self._policy = PrefixLoadPolicy()
        return self._policy

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        serve_compat.index_pending_request(self, pending_request)  # one Serve bug: see serve_compat
        token_ids, max_tokens = _request_fields(pending_request)
        key = pending_request.metadata.internal_request_id if pending_request is not None else None
        stats = {rid: ReplicaStats.of(r.routing_stats) for rid, r in by_id.items()}
        ranks = self.policy.choose(stats, token_ids, key, max_tokens)
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        token_ids, _ = _request_fields(pending_request)
        self.policy.on_routed(pending_request.metadata.internal_request_id, replica_id, token_ids)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.policy.on_completed(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self.policy.forget_replica(replica_id)
