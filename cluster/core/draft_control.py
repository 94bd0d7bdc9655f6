"""How many drafts a lossless request makes in an iteration: a cost model (no torch).

Speculative decoding pays off only when the drafts are cheap and often right, and on a model whose
early layers predict badly it is slower than the full model. The controller keeps decayed counts of
the verifications of each (mode, draft layer or skip set) across requests (acceptance is mostly a
property of the model and its exits) and drafts only when the modelled gain beats the full model:

* ``self_speculative``: with a per-draft acceptance probability ``a`` (tokens accepted independently,
  Leviathan et al. 2023, Sec. 3.1), ``k`` drafts yield ``(1 - a**(k+1)) / (1 - a)`` verified tokens
  per verification for a cost of ``1 + k * c`` full decode steps, ``c`` being one draft's cost
  (:attr:`cluster.request.ExitPlan.draft_cost`: the weight bytes of layers ``1..E`` and of the
  draft's LM head, plus a pass overhead). The ``k <= num_draft_tokens`` with the best tokens per unit
  cost is chosen; ``k = 0`` (plain full-depth decode, lossless anyway) when no ``k`` beats 1.
* ``layer_skip``: the same rule, ``c`` being the weight bytes of the layers kept (all but the skip
  set) and of the draft's LM head, plus the pass overhead; estimates are kept per skip set.
* ``verified``: drafts come from confident exits, so the draft length is the data's; an iteration
  with drafting yields ``t`` verified tokens (measured) for ``1 + (d + 1) * verified_pass_cost``
  steps, ``d`` being the drafts per iteration (each draft adds a pass, and the verification one).
  Drafting stops (full-depth decode without exit checks) while ``t`` does not beat that cost.

Batch size (issue 17): a forward over ``n`` rows costs ``step(n) = max(1, n / ridge_rows)`` batch-1
steps (the roofline: weight-bound, so extra rows are free, up to ``ridge_rows`` rows, then
compute-bound). At a decode batch of ``b`` rows an iteration without drafts costs ``step(b)``; with
``k`` drafts per request it costs ``k`` draft passes of ``c * step(b)`` each (a pass over the kept
layers of ``b`` rows) plus a verification of ``b * (k + 1)`` rows, ``step(b * (k + 1))``. The gain
per request is ``tokens(a, k) * step(b) / (k * c * step(b) + step(b * (k + 1)))`` (:meth:`gain`),
which at batch 1 with ``k + 1 <= ridge_rows`` is the classic ``tokens / (1 + k * c)``. At a batch
where even drafts that are always accepted cannot pay, no draft is made, not even a probe.

Without drafting, one iteration in :attr:`probe_every` decode steps drafts anyway, so the estimates
follow the text; each probe after which drafting still does not pay doubles that interval (up to
:attr:`max_probe_every`), and drafting resets it, so a model whose drafts never pay loses almost
nothing to probes. This is the adaptive draft length of dynamic speculative decoding (e.g. SpecDec++,
Huang et al. 2024) with a closed-form rule.
"""
from __future__ import annotations

from cluster.request import ExitPlan, Request

# Measured (bench/spec.py, default model, 2-core CPU, batch 1): an extra pass of a verified iteration
# (its metadata, exit checks with their host syncs, the embedding and the LM head of its rows) costs
# about 0.28 of a full decode step.
VERIFIED_PASS_COST = 0.28
# modes whose drafts cost a known fraction of a step each (ExitPlan.draft_cost): k is chosen by gain()
FIXED_COST_MODES = ("self_speculative", "layer_skip")
# An estimate, not yet pinned by a measurement: decode rows one forward takes before its time grows
# with the rows (the roofline's ridge, in rows; see the docstring's step(n)). bench/skip_cost.py on a
# loaded 2-core CPU gave a full step at batch 4 / 16 of 1.4-2.6x / 3.6-4.3x batch 1: between 1 and 8
# rows is all it says. Re-measure it on a quiet machine (python -m bench.skip_cost).
RIDGE_ROWS = 8.0


def step_cost(rows: int, ridge_rows: float = RIDGE_ROWS) -> float:
    """A forward over ``rows`` decode rows in batch-1 decode steps: ``max(1, rows / ridge_rows)``."""
    return max(1.0, rows / ridge_rows)


class DraftLengthController:
    """Args:
        prior_acceptance, prior_weight: a Beta-style prior on the per-draft acceptance (``prior_weight``
            pseudo-verifications), so an engine starts by trying drafts.
        probe_every: decode steps without drafts (per mode and draft layer) before one probing iteration.
        max_probe_every: the interval doubles after each probe that does not make drafting pay, up to this.
        decay: each verification multiplies the older counts by this (recent text weighs more).
        ridge_rows: rows a forward takes before its time grows with them (:func:`step_cost`).
    """

    def __init__(self, prior_acceptance: float = 0.6, prior_weight: float = 4.0, probe_every: int = 32,
                 max_probe_every: int = 512, decay: float = 0.995,
                 verified_pass_cost: float = VERIFIED_PASS_COST, ridge_rows: float = RIDGE_ROWS):
        self.ridge_rows = ridge_rows
        self.prior_acceptance = prior_acceptance
        self.prior_weight = prior_weight
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        self.decay = decay
        self.verified_pass_cost = verified_pass_cost
        # (mode, draft_layer, skip_layers) -> [accepted drafts, rejections, drafts, verifications] (decayed)
        self.stats: dict[tuple, list[float]] = {}
        self._idle: dict[tuple, int] = {}
        self._interval: dict[tuple, int] = {}  # current probing interval (backs off while drafts do not pay)

    @staticmethod
    def _key(spec: ExitPlan) -> tuple:
        return spec.mode, spec.draft_layer, spec.skip_layers, spec.skip_selection

    def observe(self, spec: ExitPlan, num_drafts: int, num_accepted: int) -> None:
        """Record one verification of ``num_drafts`` drafts, ``num_accepted`` of them accepted."""
        s = self.stats.setdefault(self._key(spec), [0.0, 0.0, 0.0, 0.0])
        for i in range(4):
            s[i] *= self.decay
        s[0] += num_accepted
        s[1] += num_accepted < num_drafts
        s[2] += num_drafts
        s[3] += 1

    def acceptance(self, spec: ExitPlan) -> float:
        """Estimated per-draft acceptance: accepted drafts over accepted drafts + rejections."""
        acc, rej, _, _ = self.stats.get(self._key(spec), (0.0, 0.0, 0.0, 0.0))
        return (acc + self.prior_weight * self.prior_acceptance) / (acc + rej + self.prior_weight)

    @staticmethod
    def gain(a: float, k: int, c: float, batch: int = 1, ridge_rows: float = float("inf")) -> float:
        """``self_speculative`` / ``layer_skip``: expected verified tokens per unit cost with ``k``
        drafts of cost ``c`` each at decode batch ``batch`` (1 for ``k = 0``; the module docstring's
        rule; the default ``ridge_rows`` makes verification rows free: ``tokens / (1 + k * c)``)."""
        tokens = k + 1 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
        base = step_cost(batch, ridge_rows)
        return tokens * base / (k * c * base + step_cost(batch * (k + 1), ridge_rows))

    def verified_gain(self, spec: ExitPlan, batch: int = 1) -> float:
        """``verified``: measured verified tokens per iteration over the iteration's modelled cost
        (prior: 2 tokens and 1 draft per iteration, ``prior_weight`` iterations) at decode batch
        ``batch`` (its verification covers the drafts' rows too)."""
        acc, _, drafts, steps = self.stats.get(self._key(spec), (0.0, 0.0, 0.0, 0.0))
        w = self.prior_weight
        tokens = (acc + steps + 2.0 * w) / (steps + w)
        per_iter = (drafts + w) / (steps + w)
        base = step_cost(batch, self.ridge_rows)
        verify = step_cost(round(batch * (1.0 + per_iter)), self.ridge_rows) / base
        return tokens / (verify + (per_iter + 1.0) * self.verified_pass_cost)

    def num_drafts(self, req: Request, k_max: int, batch: int = 1) -> int:
        """Drafts for this iteration, ``0 <= k <= k_max`` (``k_max`` itself without ``spec.adaptive``;
        ``k_max`` already holds the request's ``num_draft_tokens``), at a decode batch of ``batch``
        rows. Without a ``k`` that pays, 0, or 1 (``k_max``, ``verified``) on a probing iteration;
        never a probe at a batch where drafts that are always accepted would not pay."""
        spec = req.exit_plan
        if not spec.adaptive or k_max <= 0:
            return k_max
        fixed_cost = spec.mode in FIXED_COST_MODES
        r = self.ridge_rows
        if fixed_cost:
            a, c = self.acceptance(spec), spec.draft_cost
            best = max(range(k_max + 1), key=lambda k: (self.gain(a, k, c, batch, r), -k))
            hopeless = max(self.gain(1.0, k, c, batch, r) for k in range(1, k_max + 1)) <= 1.0
        else:
            best = k_max if self.verified_gain(spec, batch) > 1.0 else 0
            hopeless = step_cost(2 * batch, r) / step_cost(batch, r) + 2.0 * self.verified_pass_cost >= 2.0
        key = self._key(spec)
        if not best and hopeless:
            return 0
        if best:
            self._idle[key] = 0
            self._interval[key] = self.probe_every
            return best
        self._idle[key] = self._idle.get(key, 0) + 1
        interval = self._interval.get(key, self.probe_every)
        if self._idle[key] >= interval:
            self._idle[key] = 0
            self._interval[key] = min(2 * interval, self.max_probe_every)
            return 1 if fixed_cost else k_max
        return 0
