"""Free-running quality of early-exit answers against the full model's answers.

Teacher-forced agreement (``cluster/training/calibrate.py``) scores each exit decision along the full
model's own output; a free-running answer instead follows its own tokens, so one differing token
changes everything after it. These measures compare whole answers (token-id lists):

* :func:`exact_match` and :func:`common_prefix_fraction`: strict, position by position;
* :func:`rouge_l`: the LCS F-measure (Lin 2004, ROUGE-L with beta = 1), CALM's textual consistency
  (Schuster et al. 2022): insensitive to where a difference happens;
* :func:`answer_nll` / :func:`answers_nll`: the mean negative log-likelihood per token of an answer
  under the *full* model (a Hugging Face transformers causal LM on the same checkpoint, see
  :func:`load_hf_causal_lm`): how plausible the full model finds the early-exit answer.

:func:`quality_report` aggregates them over a set of answers. Pure Python/numpy; torch only for NLL.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

Tokens = Sequence[int]


# ------------------------------------------------------------------------------- string measures
def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a) * len(b)) DP).

    Row by row with numpy: ``cur[j] = max(cur[j-1], prev[j], prev[j-1] + 1 if a[i] == b[j])``, which
    is the running maximum of ``max(prev[j], prev[j-1] + 1 if match)``.
    """
    if not len(a) or not len(b):
        return 0
    if len(b) > len(a):
        a, b = b, a  # rows over the longer one, vectors over the shorter
    bv = np.asarray(b, dtype=np.int64)
    prev = np.zeros(len(bv) + 1, dtype=np.int64)
    for x in a:
        t = np.maximum(prev[1:], np.where(bv == x, prev[:-1] + 1, 0))
        cur = np.empty_like(prev)
        cur[0] = 0
        np.maximum.accumulate(t, out=cur[1:])
        prev = cur
    return int(prev[-1])


def rouge_l(candidate: Tokens, reference: Tokens, beta: float = 1.0) -> float:
    """ROUGE-L F-measure of ``candidate`` against ``reference`` (Lin 2004).

    ``P = LCS / len(candidate)``, ``R = LCS / len(reference)``,
    ``F = (1 + beta^2) P R / (R + beta^2 P)``; both empty: 1.0; one empty (or no common token): 0.0.
    """
    if not len(candidate) and not len(reference):
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return (1 + beta * beta) * p * r / (r + beta * beta * p)


def exact_match(candidate: Tokens, reference: Tokens) -> bool:
    """Whether the two answers are the same token sequence."""
    return list(candidate) == list(reference)


def common_prefix_fraction(candidate: Tokens, reference: Tokens) -> float:
    """Length of the shared prefix / ``len(reference)`` (empty reference: 1.0 if the candidate is empty too)."""
    if not len(reference):
        return 1.0 if not len(candidate) else 0.0
    n = 0
    for x, y in zip(candidate, reference):
        if x != y:
            break
        n += 1
    return n / len(reference)


def mean_lower_bound(values: Sequence[float], z: float) -> float:
    """``mean - z * standard error`` of ``values`` (one-sided normal bound; z = 0: the mean)."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return float("nan")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean() - z * se)


# ------------------------------------------------------------------------------------------- NLL
def load_hf_causal_lm(model: Optional[str] = None, dtype: str = "float32"):
    """The full model as a transformers causal LM: ``model`` a safetensors directory, a GGUF file, a
    directory holding one GGUF, or None (the default model's GGUF, dequantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.model.loader import default_model_path

    path = Path(model) if model else Path(default_model_path())
    gguf = path if path.suffix == ".gguf" else None
    if gguf is None and path.is_dir() and not any(path.glob("*.safetensors")):
        found = sorted(path.glob("*.gguf"))
        gguf = found[0] if len(found) == 1 else None
    kw = {"dtype": getattr(torch, dtype)}
    if gguf is not None:
        return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kw).eval()
    return AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def answers_nll(hf_model, prompt_ids: Sequence[Tokens], answer_ids: Sequence[Tokens],
                batch_size: int = 4) -> list[float]:
    """Mean NLL per token (nats) of each ``answer_ids[i]`` following ``prompt_ids[i]`` under ``hf_model``
    (a transformers causal LM: ``hf_model(input_ids=, attention_mask=).logits``).

    Rows are right-padded in batches of ``batch_size``; an empty answer gives NaN.
    """
    import torch

    out: list[float] = [float("nan")] * len(answer_ids)
    rows = [i for i, a in enumerate(answer_ids) if len(a)]
    dev = next(hf_model.parameters()).device
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        seqs = [list(prompt_ids[i]) + list(answer_ids[i]) for i in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=dev)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev)
        with torch.inference_mode():
            logits = hf_model(input_ids=ids, attention_mask=mask).logits
            for row, i in enumerate(chunk):
                start, n = len(prompt_ids[i]), len(answer_ids[i])
                if start == 0:
                    raise ValueError("answers_nll: the prompt must hold at least one token")
                logp = torch.log_softmax(logits[row, start - 1:start - 1 + n].float(), dim=-1)
                target = ids[row, start:start + n]
                out[i] = float(-logp.gather(-1, target[:, None]).mean())
    return out


def answer_nll(hf_model, prompt_ids: Tokens, answer_ids: Tokens) -> float:
    """Mean NLL per token of one answer under ``hf_model`` (see :func:`answers_nll`)."""
    return answers_nll(hf_model, [prompt_ids], [answer_ids])[0]


# ---------------------------------------------------------------------------------------- report
def quality_report(outputs: Sequence[Tokens], references: Sequence[Tokens], hf_model=None,
                   prompt_ids: Optional[Sequence[Tokens]] = None, nll: Optional[Sequence[float]] = None) -> dict:
    """Free-running quality of ``outputs`` against ``references`` (same prompts, in order).

    Returns ``exact_match_rate``, ``rouge_l`` (mean over answers), ``prefix_fraction`` (mean
    :func:`common_prefix_fraction`) and ``num_answers``; with ``nll`` (per-answer mean NLLs) or
    ``hf_model`` and ``prompt_ids`` also ``nll`` (mean NLL per token under the full model, weighted
    by answer length, empty answers left out).
    """
    if len(outputs) != len(references):
        raise ValueError(f"quality_report: {len(outputs)} outputs but {len(references)} references")
    n = len(outputs)
    rep = {"num_answers": n,
           "exact_match_rate": sum(exact_match(o, r) for o, r in zip(outputs, references)) / n if n else 1.0,
           "rouge_l": float(np.mean([rouge_l(o, r) for o, r in zip(outputs, references)])) if n else 1.0,
           "prefix_fraction": float(np.mean([common_prefix_fraction(o, r) for o, r in zip(outputs, references)]))
           if n else 1.0}
    if nll is None and hf_model is not None and prompt_ids is not None:
        nll = answers_nll(hf_model, prompt_ids, outputs)
    if nll is not None:
        w = [(v, len(o)) for v, o in zip(nll, outputs) if len(o) and not math.isnan(v)]
        rep["nll"] = sum(v * k for v, k in w) / sum(k for _, k in w) if w else float("nan")
    return rep
