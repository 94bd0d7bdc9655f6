"""How many drafts a ``self_speculative`` request makes in an iteration: a cost model (no torch).

Speculative decoding pays off only when the drafts are cheap and often right. With a per-draft
acceptance probability ``a`` (tokens accepted independently, as in Leviathan et al. 2023, Sec. 3.1),
``k`` drafts yield ``(1 - a**(k+1)) / (1 - a)`` verified tokens per verification on average, for a
cost of ``1 + k * c`` full decode steps, ``c`` being one draft's cost relative to a full step
(:attr:`cluster.config.SpecParams.draft_cost`: the weight bytes of layers ``1..E`` and of the draft's
LM head, plus a fixed per-pass overhead). The controller picks the ``k <= num_draft_tokens`` that
maximises tokens per unit cost, from the request's own acceptance so far (with a prior), and ``k = 0``
(plain full-depth decode, lossless anyway) when no ``k`` beats 1; then it re-probes with one draft
every :attr:`probe_every` decode steps, in case the text got easier. This is the adaptive draft
length of dynamic speculative decoding (e.g. SpecDec++, Huang et al. 2024), with a closed-form rule.
"""
from __future__ import annotations

from cluster.request import Request


class DraftLengthController:
    """Args:
        prior_acceptance, prior_weight: a Beta-style prior on the per-draft acceptance (``prior_weight``
            pseudo-observations at ``prior_acceptance``), so a request starts by trying drafts.
        probe_every: decode steps without drafts before one probing draft.
    """

    def __init__(self, prior_acceptance: float = 0.6, prior_weight: float = 4.0, probe_every: int = 32):
        self.prior_acceptance = prior_acceptance
        self.prior_weight = prior_weight
        self.probe_every = probe_every

    def acceptance(self, req: Request) -> float:
        """Estimated per-draft acceptance: accepted drafts over accepted drafts + rejections."""
        a = req.num_accepted_tokens + self.prior_weight * self.prior_acceptance
        return a / (req.num_accepted_tokens + req.num_spec_rejections + self.prior_weight)

    @staticmethod
    def gain(a: float, k: int, c: float) -> float:
        """Expected verified tokens per unit cost with ``k`` drafts (1.0 for ``k = 0``)."""
        tokens = k + 1 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
        return tokens / (1.0 + k * c)

    def num_drafts(self, req: Request, k_max: int) -> int:
        """Drafts for this iteration, ``0 <= k <= k_max``; updates the request's probe counter."""
        spec = req.spec
        if spec.mode != "self_speculative" or not spec.adaptive or k_max <= 0:
            return k_max
        a, c = self.acceptance(req), spec.draft_cost
        best = max(range(k_max + 1), key=lambda k: (self.gain(a, k, c), -k))
        if best == 0:
            req.spec_idle_steps += 1
            if req.spec_idle_steps >= self.probe_every:
                req.spec_idle_steps = 0
                return 1
        else:
            req.spec_idle_steps = 0
        return best
