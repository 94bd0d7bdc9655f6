"""The offline search for ``layer_skip``'s skip set (SWIFT, Xia et al. 2024, arXiv 2410.06916, Sec. 4):
which decoder layers a draft leaves out so that drafting pays the most.

A skip set ``S`` (1-based decoder layers; the first and the last are kept, as in SWIFT) is scored by
what makes speed: with a per-draft acceptance ``a`` and ``k`` drafts per verification, a verification
yields ``(1 - a**(k+1)) / (1 - a)`` tokens (Leviathan et al. 2023, Sec. 3.1) for ``1 + k * c`` full
decode steps, ``c`` being a draft's cost (the weight bytes of the kept layers and of the draft's LM
head, plus the pass overhead: :meth:`cluster.engine.engine.LLMEngine.draft_cost`); the modelled speedup
at batch 1 is the ratio (:meth:`cluster.core.draft_control.DraftLengthController.gain`).

The acceptance ``a`` of a candidate is estimated as SWIFT scores layer sets, by one parallel pass: the
full model's greedy continuations of the calibration prompts are fixed, each prompt + continuation runs
teacher-forced through the model with the layers of ``S`` left out (then the final norm and the draft
head: the FR-Spec reduced head where the exit heads have one), and ``a`` is the share of decode
positions whose draft argmax equals the full model's argmax there (:class:`SkipScorer`; the full
model's hidden state entering every layer is cached, so a candidate runs only from its first skipped
layer on).

The search (:func:`search_skip_sets`), seeded, within a trial budget: every single layer's skip, then
the layers ordered by their single-skip acceptance skipped greedily (the ``n`` least harmful, for each
``n``), then Optuna's TPE sampler (Bayesian optimisation over the layer mask, Bergstra et al. 2011;
SWIFT uses Bayesian optimisation too) started from the best of those.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from cluster.core.draft_control import DraftLengthController
from cluster.model.exit_heads import ExitHeads
from cluster.model.llama import LlamaForCausalLM
from cluster.model.speculative import exit_logits
from cluster.training.features import _groups, pack_sequences


@dataclass(frozen=True)
class SkipCandidate:
    """One scored skip set."""

    skip: tuple[int, ...]  # 1-based decoder layers left out
    acceptance: float  # estimated per-draft acceptance (teacher-forced argmax agreement)
    draft_cost: float  # one draft, as a fraction of a full decode step
    skip_ratio: float  # len(skip) / num_layers
    num_draft_tokens: int  # k of the model
    tokens_per_verification: float  # (1 - a**(k+1)) / (1 - a)
    speedup: float  # modelled, batch 1: tokens_per_verification / (1 + k * draft_cost)
    source: str  # the search phase that proposed it: single / greedy / tpe / given

    def as_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d


def modelled(acceptance: float, k: int, draft_cost: float) -> tuple[float, float]:
    """``(tokens per verification, modelled speedup)`` of at most ``k`` drafts with per-draft
    acceptance ``acceptance`` and cost ``draft_cost`` (fraction of a decode step) each, at the draft
    length in ``1..k`` that the adaptive draft control would pick (the best gain); see the module docstring."""
    best = max(range(1, max(1, k) + 1), key=lambda kk: DraftLengthController.gain(acceptance, kk, draft_cost))
    gain = DraftLengthController.gain(acceptance, best, draft_cost)
    return gain * (1.0 + best * draft_cost), gain


class SkipScorer:
    """Teacher-forced draft acceptance of skip sets against the full model (see the module docstring).

    Args:
        model: the model as served (e.g. int4 weights for the default model).
        heads: the engine's exit heads (their FR-Spec draft head, if any, makes the draft logits), or None.
        seqs: token ids, each a prompt followed by the full model's greedy continuation.
        rows: per sequence, the decode positions ``p`` to score (the draft for token ``p + 1``).
        max_tokens: tokens per packed forward.

    The full model's hidden state entering every layer at every token is kept: ``num_layers * T *
    hidden`` float values for ``T`` tokens in all.
    """

    def __init__(self, model: LlamaForCausalLM, heads: Optional[ExitHeads], seqs: list[list[int]],
                 rows: list[torch.Tensor], max_tokens: int = 2048):
        self.model, self.heads = model, heads
        self.num_layers = model.config.num_layers
        self.batches, self.inputs, self.targets = [], [], []
        with torch.inference_mode():
            for group in _groups(seqs, max_tokens):
                b = pack_sequences(model, [seqs[i] for i in group], [rows[i] for i in group])
                h = model.model.embed_tokens(b.input_ids)
                ins = []
                for layer in model.model.layers:
                    ins.append(h)
                    h = layer(h, b.positions, b.meta, b.kv)
                self.batches.append(b)
                self.inputs.append(ins)
                self.targets.append(self._argmax(h[b.keep], full=True))
        self.num_positions = sum(int(t.numel()) for t in self.targets)

    def _argmax(self, h: torch.Tensor, full: bool) -> torch.Tensor:
        m, L = self.model, self.num_layers
        out = []
        for part in h.split(256):
            lg = m.lm_head.full_logits(m.final_local_logits(part)) if full else exit_logits(m, self.heads, L, part)
            out.append(lg.argmax(-1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    @torch.inference_mode()
    def acceptance(self, skip: Iterable[int]) -> float:
        """Share of the scored positions whose draft (the model without the layers ``skip``) argmax
        equals the full model's; 1.0 for an empty ``skip``.

        Raises:
            ValueError: a layer outside ``[1, num_layers]``.
        """
        skip = set(skip)
        if any(not 1 <= l <= self.num_layers for l in skip):
            raise ValueError(f"skip layers must be in [1, {self.num_layers}], got {sorted(skip)}")
        if not skip:
            return 1.0
        first = min(skip)
        hits = 0
        for b, ins, tgt in zip(self.batches, self.inputs, self.targets):
            h = ins[first - 1]
            for i in range(first - 1, self.num_layers):
                if i + 1 not in skip:
                    h = self.model.model.layers[i](h, b.positions, b.meta, b.kv)
            hits += int((self._argmax(h[b.keep], full=False) == tgt).sum())
        return hits / max(1, self.num_positions)


def search_skip_sets(acceptance: Callable[[tuple[int, ...]], float], draft_cost: Callable[[tuple[int, ...]], float],
                     num_layers: int, num_draft_tokens: int, trials: int = 120, seed: int = 0,
                     layers: Optional[Sequence[int]] = None, max_greedy: Optional[int] = None,
                     given: Sequence[tuple[int, ...]] = (), progress: bool = True) -> list[SkipCandidate]:
    """Score skip sets within ``trials`` evaluations and return them all, best modelled speedup first.

    Phases (each cut short when the budget runs out): the sets in ``given`` (e.g. the default rule's);
    every single layer of ``layers`` (default ``2..num_layers - 1``: SWIFT keeps the first and the last
    layers); the ``n`` layers with the best single-skip acceptance for ``n = 2..max_greedy`` (default
    ``len(layers) // 2 + 1``); then Optuna's TPE sampler (seeded with ``seed``; multivariate, over one
    boolean per layer) with the best sets so far enqueued as its first trials. A set already scored is
    not scored again (and uses no budget).

    Raises:
        ImportError: the TPE phase is reached and optuna is not installed (``pip install eeserve[calibrate]``).
    """
    layers = list(layers if layers is not None else range(2, num_layers))
    max_greedy = max_greedy if max_greedy is not None else len(layers) // 2 + 1
    seen: dict[tuple[int, ...], SkipCandidate] = {}
    bar = tqdm(total=trials, desc="skip-set search", unit="set", disable=not progress)

    def score(skip: Iterable[int], source: str) -> Optional[SkipCandidate]:
        skip = tuple(sorted(set(skip)))
        if not skip:
            return None
        if skip in seen:
            return seen[skip]
        if len(seen) >= trials:
            return None
        a, c = acceptance(skip), draft_cost(skip)
        tokens, speed = modelled(a, num_draft_tokens, c)
        seen[skip] = cand = SkipCandidate(skip, a, c, len(skip) / num_layers, num_draft_tokens, tokens, speed, source)
        bar.update(1)
        bar.set_postfix(best=f"{max(x.speedup for x in seen.values()):.3f}x")
        return cand

    try:
        for g in given:
            score(g, "given")
        singles = {l: score((l,), "single") for l in layers}
        order = sorted((l for l in layers if singles[l] is not None), key=lambda l: (-singles[l].acceptance, l))
        for n in range(2, min(max_greedy, len(order)) + 1):
            score(order[:n], "greedy")
        if len(seen) < trials:
            _tpe(score, seen, layers, trials, seed)
    finally:
        bar.close()
    return sorted(seen.values(), key=lambda c: (-c.speedup, -c.acceptance, c.skip))


def _tpe(score, seen: dict, layers: list[int], trials: int, seed: int) -> None:
    """The TPE phase of :func:`search_skip_sets` (Optuna, maximising the modelled speedup)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10))
    best = sorted(seen.values(), key=lambda c: -c.speedup)[:3]
    for c in best:
        study.enqueue_trial({f"skip_{l}": l in c.skip for l in layers})
    # duplicates cost no budget: give TPE room to propose new sets, but bounded
    for _ in range(4 * trials):
        if len(seen) >= trials:
            break
        trial = study.ask()
        skip = tuple(l for l in layers if trial.suggest_categorical(f"skip_{l}", [False, True]))
        cand = score(skip, "tpe")
        study.tell(trial, cand.speedup if cand is not None else 0.0)


def best_per_size(cands: Iterable[SkipCandidate], sizes: Iterable[int]) -> dict[int, Optional[SkipCandidate]]:
    """For each ``|S|`` in ``sizes``, the scored set of that size with the highest acceptance (None if none)."""
    out: dict[int, Optional[SkipCandidate]] = {}
    cands = list(cands)
    for n in sizes:
        same = [c for c in cands if len(c.skip) == n]
        out[n] = max(same, key=lambda c: (c.acceptance, -c.draft_cost)) if same else None
    return out


def predicted_engine_stats(acceptance: float, k: int) -> dict:
    """What a fixed ``k`` drafts per verification should measure with i.i.d. per-draft acceptance
    ``acceptance``: accepted drafts over drafts (``sum_{i=1..k} a**i / k``) and tokens per verification."""
    acc = sum(acceptance ** i for i in range(1, k + 1))
    return {"accepted_per_draft": acc / k, "tokens_per_verification": 1.0 + acc}


def acceptance_from_ratio(ratio: float, k: int) -> float:
    """The i.i.d. per-draft acceptance ``a`` whose ``sum_{i=1..k} a**i / k`` is ``ratio`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if predicted_engine_stats(mid, k)["accepted_per_draft"] < ratio:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
