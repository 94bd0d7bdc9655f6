"""The batched sampler: one vectorized pass over a batch of logits on their own device.

:func:`sample` processes the logits in vLLM's order (see :class:`cluster.sampling.SamplingParams`):
logit_bias and min_tokens, the guided-decoding mask, repetition / frequency / presence penalties,
temperature, top-k, top-p (nucleus, Holtzman et al. 2020), then a draw. ``temperature == 0`` means
greedy (argmax of the processed logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from cluster.model.layers.host import host_to_device
from cluster.model.layers.sampler_output import SamplerOutput, add_logprobs
from cluster.sampling import SamplingParams  # noqa: F401  (types in docstrings)

if TYPE_CHECKING:
    import numpy
    import torch

_NEG_INF = float("-inf")


@dataclass
class TokenHistory:
    """Token history of the batch rows whose requests use penalties (kept by the model runner).

    Row ``j`` of both tensors belongs to batch row ``rows[j]``; both live on the logits' device.
    """

    rows: list[int]
    # [m, V] integer dtype: how often each token id occurs among the request's output tokens
    output_counts: "torch.Tensor"
    # [m, V] bool: the token id occurs in the request's prompt
    prompt_mask: "torch.Tensor"


def sample(
    logits: "torch.Tensor",
    params: Sequence[SamplingParams],
    generators: Optional[Sequence[Optional["torch.Generator"]]] = None,
    *,
    history: Optional[TokenHistory] = None,
    num_output_tokens: Optional[Sequence[int]] = None,
    eos_token_ids: Optional[Sequence[Sequence[int]]] = None,
    guided_bitmasks: Optional[Sequence[Optional["numpy.ndarray"]]] = None,
) -> SamplerOutput:
    """Draw one token per row, the whole batch in one vectorized pass.

    Processing per row, in :class:`SamplingParams`' order: ``logit_bias`` added; while
    ``num_output_tokens < min_tokens`` the EOS ids (unless ``ignore_eos``) and ``stop_token_ids``
    set to -inf; tokens the guided bitmask disallows set to -inf (if min_tokens would then leave no
    token, the grammar wins and the min_tokens mask is dropped for that row); repetition penalty
    (CTRL, Keskar et al. 2019) over prompt + output tokens; frequency and presence penalties (OpenAI
    API docs) over output tokens; temperature; top-k; top-p (Holtzman et al. 2020, at least one token
    kept); the draw. Greedy rows (``temperature == 0``) take the argmax of the processed logits.
    The draw is the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)`` i.i.d. (a sample from
    ``probs``): rows with a generator draw their ``q`` row from it (so a seeded row's token does not
    depend on its batch-mates), the other rows share one batched draw from the device's default RNG.

    Fault isolation: if the batched pass raises, every row is retried alone; rows that still raise
    are reported in :attr:`SamplerOutput.failed` and get token -1, the others are sampled. All checks
    that can fail (ids outside the vocabulary, a bitmask that allows nothing, penalties without
    history, a generator on another device) run on the host before any device work and before any
    generator advances, so a retry draws the same numbers; an out-of-range index never reaches a
    CUDA kernel (a device-side assert could not be caught per row).

    Host syncs: none here (no ``.item()``, ``.tolist()`` or data-dependent branch; it runs on meta
    tensors). Small host->device copies of per-row parameters (pinned, non-blocking on CUDA). The
    sampling step's single device->host transfer is :meth:`SamplerOutput.to_host` (one ``.tolist()``).

    Args:
        logits: ``[n, V]`` float logits (any float dtype, full vocabulary) on any device; not modified.
            Every tensor made here is created on ``logits.device``.
        params: ``n`` sampling parameter sets, one per row.
        generators: ``n`` ``torch.Generator`` on ``logits.device`` or ``None`` (default RNG); None:
            all default.
        history: token history of the rows whose params ``uses_penalties`` (required for those rows).
        num_output_tokens: ``n`` ints, tokens generated so far per row (for ``min_tokens``); None: 0.
        eos_token_ids: ``n`` tuples of EOS ids masked while below ``min_tokens``; None: none.
        guided_bitmasks: ``n`` int32 numpy arrays ``[ceil(V / 32)]`` or None per row: bit ``j`` of
            word ``i`` set iff token ``32 * i + j`` is allowed (xgrammar's layout; tokens past the
            array are disallowed).

    Returns:
        A :class:`SamplerOutput`: ``token_ids`` ``[n]`` int64 on ``logits.device``, failed rows,
        and for rows with ``logprobs`` set the raw-logit logprobs (log-softmax before processing).
    """
    import torch

    n = logits.shape[0]
    if len(params) != n:
        raise ValueError(f"{len(params)} params for {n} rows of logits")
    if n == 0:
        return SamplerOutput(token_ids=torch.empty(0, dtype=torch.long, device=logits.device))
    gens = list(generators) if generators is not None else [None] * n
    nout = list(num_output_tokens) if num_output_tokens is not None else [0] * n
    eos = list(eos_token_ids) if eos_token_ids is not None else [()] * n
    masks = list(guided_bitmasks) if guided_bitmasks is not None else [None] * n
    failed: dict[int, str] = {}
    try:
        tokens = _process_and_draw(logits, params, gens, history, nout, eos, masks)
    except Exception:  # noqa: BLE001 - find the failing rows; the others are still sampled
        tokens = torch.full((n,), -1, dtype=torch.long, device=logits.device)
        pos = {r: j for j, r in enumerate(history.rows)} if history is not None else {}
        for i in range(n):
            h = None
            if i in pos:
                j = pos[i]
                h = TokenHistory([0], history.output_counts[j:j + 1], history.prompt_mask[j:j + 1])
            try:
                tokens[i:i + 1] = _process_and_draw(logits[i:i + 1], [params[i]], [gens[i]], h, [nout[i]], [eos[i]],
                                                    [masks[i]])
            except Exception as e:  # noqa: BLE001 - this row alone fails
                failed[i] = f"sampling failed: {type(e).__name__}: {e}"
    out = SamplerOutput(token_ids=tokens, failed=failed)
    add_logprobs(out, logits, params)
    return out


def _guided_words(mask, vocab_size: int):
    """One row's bitmask as int32 ``[ceil(V / 32)]`` (zero-padded or cut); raises if it allows nothing."""
    import numpy as np

    a = np.asarray(mask)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"guided bitmask must be a 1-D integer array, got {a.dtype} {a.shape}")
    words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
    m = min(len(words), a.shape[0])
    words[:m] = a[:m].astype(np.int32)
    if vocab_size % 32:
        words[-1] &= np.int32((1 << (vocab_size % 32)) - 1)
    if not words.any():
        raise ValueError("guided decoding: the token bitmask allows no token of the vocabulary")
    return words


def _unpack_bitmask(words: "torch.Tensor", vocab_size: int) -> "torch.Tensor":
    """int32 ``[g, W]`` bit-packed masks -> bool ``[g, V]`` (``True``: allowed), on ``words.device``."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift of negative words: bit j still right
    return bits.flatten(1)[:, :vocab_size].bool()


def _apply_penalties(x, output_counts, prompt_mask, rep, freq, pres) -> "torch.Tensor":
    """Penalties on ``x [m, V]`` float32: repetition (CTRL: positive logits of prompt and output
    tokens divided by ``rep``, negative ones multiplied), then ``x -= count * freq + (count > 0) *
    pres`` over output tokens (OpenAI). ``rep``, ``freq``, ``pres``: ``[m]`` float32."""
    import torch

    counts = output_counts.to(x.dtype)
    in_output = output_counts > 0
    seen = prompt_mask | in_output
    rep = rep.unsqueeze(1)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    return x - counts * freq.unsqueeze(1) - in_output.to(x.dtype) * pres.unsqueeze(1)


@dataclass
class _Batch:
    """Host-side inputs of one batched pass, gathered and checked by :func:`_prepare`."""

    vocab_size: int
    bias: tuple[list[int], list[int], list[float]]  # rows, token ids, values of logit_bias
    ban: tuple[list[int], list[int]]  # rows, token ids masked by min_tokens
    guided_rows: list[int]
    guided_words: list  # int32 numpy [ceil(V / 32)] per guided row
    # per row: temperature (1 for greedy), top_k (V: off), top_p (1: off), greedy flag, repetition,
    # frequency and presence penalty: one host->device copy for all of them
    cols: list[list[float]]
    seeded: list[int]  # sampled (non-greedy) rows with their own generator
    top_p_rows: list[int]  # sampled rows with top_p < 1
    max_top_k: int = 0  # largest active top_k (0: none)
    any_unseeded: bool = False
    any_greedy: bool = False
    any_penalty: bool = False


def _prepare(params, gens, history, nout, eos, masks, vocab_size: int, device) -> _Batch:
    """Gather per-row inputs on the host and run every check that can fail (no device work)."""
    V = vocab_size
    b = _Batch(V, ([], [], []), ([], []), [], [], [], [], [])
    hist_rows = set(history.rows) if history is not None else set()
    for i, p in enumerate(params):
        for tok, v in p.logit_bias.items():
            if not 0 <= tok < V:
                raise ValueError(f"logit_bias: token id {tok} is outside the vocabulary [0, {V})")
            b.bias[0].append(i)
            b.bias[1].append(tok)
            b.bias[2].append(v)
        if nout[i] < p.min_tokens:
            stops = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids).union(eos[i])
            for tok in stops:
                if 0 <= tok < V:  # ids the model cannot produce need no mask
                    b.ban[0].append(i)
                    b.ban[1].append(tok)
        if masks[i] is not None:
            b.guided_rows.append(i)
            b.guided_words.append(_guided_words(masks[i], V))
        if p.uses_penalties:
            if i not in hist_rows:
                raise ValueError("penalties need the request's token history, which the sampler was not given")
            b.any_penalty = True
        pen = [p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
        if p.greedy:
            b.any_greedy = True
            b.cols.append([1.0, V, 1.0, 1.0] + pen)
            continue
        g = gens[i]
        if g is None:
            b.any_unseeded = True
        elif g.device != device:
            raise ValueError(f"the request's generator is on {g.device}, the logits on {device}")
        else:
            b.seeded.append(i)
        k = p.top_k if 0 < p.top_k < V else V
        if k < V:
            b.max_top_k = max(b.max_top_k, k)
        if p.top_p < 1.0:
            b.top_p_rows.append(i)
        b.cols.append([p.temperature, k, p.top_p, 0.0] + pen)
    return b


def _process(logits, b: _Batch, history: Optional[TokenHistory]):
    """Device side of the logits processing: ``(x [n, V] float32, f [7, n] float32 per-row columns)``.

    Greedy rows get logit_bias, masks and penalties only; sampled rows also temperature, top-k and
    top-p. Removed tokens are -inf.
    """
    import numpy as np
    import torch

    V, dev = b.vocab_size, logits.device
    f = host_to_device(b.cols, torch.float32, dev).T
    if not (b.seeded or b.any_unseeded or b.bias[0] or b.ban[0] or b.guided_rows or b.any_penalty):
        return logits, f  # plain greedy batch: argmax of the raw logits, no copy
    x = logits.to(torch.float32, copy=True)
    if b.bias[0]:
        idx = host_to_device(b.bias[:2], torch.long, dev)
        x.index_put_((idx[0], idx[1]), host_to_device(b.bias[2], torch.float32, dev), accumulate=True)
    g_idx = host_to_device(b.guided_rows, torch.long, dev) if b.guided_rows else None
    pre_ban = None
    if b.ban[0]:
        if b.guided_rows and not set(b.guided_rows).isdisjoint(b.ban[0]):
            pre_ban = x.index_select(0, g_idx)
        idx = host_to_device(b.ban, torch.long, dev)
        x.index_put_((idx[0], idx[1]), x.new_full((len(b.ban[0]),), _NEG_INF))
    if b.guided_rows:
        disallowed = ~_unpack_bitmask(host_to_device(np.stack(b.guided_words), torch.int32, dev), V)
        sub = x.index_select(0, g_idx).masked_fill_(disallowed, _NEG_INF)
        if pre_ban is not None:  # a grammar that allows only stop tokens wins over min_tokens
            dead = torch.isneginf(sub).all(dim=-1, keepdim=True)
            sub = torch.where(dead, pre_ban.masked_fill_(disallowed, _NEG_INF), sub)
        x.index_copy_(0, g_idx, sub)
    if b.any_penalty:
        h_idx = host_to_device(history.rows, torch.long, dev)
        hf = f.index_select(1, h_idx)
        x.index_copy_(0, h_idx, _apply_penalties(x.index_select(0, h_idx), history.output_counts,
                                                 history.prompt_mask, hf[4], hf[5], hf[6]))
    if not b.seeded and not b.any_unseeded:  # all greedy
        return x, f
    x.div_(f[0].unsqueeze(1))
    if b.max_top_k:  # top-k by the k-th largest value (a partial topk, no full sort)
        top = x.topk(b.max_top_k, dim=-1).values
        k = f[1].long()
        kth = top.gather(1, (k.clamp(max=b.max_top_k) - 1).unsqueeze(1))
        kth = torch.where((k < V).unsqueeze(1), kth, torch.full_like(kth, _NEG_INF))
        x.masked_fill_(x < kth, _NEG_INF)  # ties with the k-th are kept (as HF's TopKLogitsWarper)
    if b.top_p_rows:  # only these rows are sorted
        whole = len(b.top_p_rows) == x.shape[0]
        p_idx = None if whole else host_to_device(b.top_p_rows, torch.long, dev)
        sub = x if whole else x.index_select(0, p_idx)
        top_p = (f[2] if whole else f[2].index_select(0, p_idx)).unsqueeze(1)
        sorted_x, order = sub.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # drop tokens whose preceding cumulative mass already reaches top_p (the first stays)
        sorted_x.masked_fill_((probs.cumsum(dim=-1) - probs) >= top_p, _NEG_INF)
        sub = torch.empty_like(sub).scatter_(1, order, sorted_x)
        x = sub if whole else x.index_copy_(0, p_idx, sub)
    return x, f


def _draw(x, f, b: _Batch, gens) -> "torch.Tensor":
    """``[n]`` int64 tokens from processed logits: argmax for greedy rows, the exponential race for
    the others. Generators advance only here, after everything that can fail."""
    import torch

    if not b.seeded and not b.any_unseeded:
        return x.argmax(dim=-1)
    probs = x.softmax(dim=-1)
    q = torch.empty_like(probs)
    if b.any_unseeded:
        q.exponential_()
    for i in b.seeded:  # one generator per seeded row: the only per-row device op
        q[i].exponential_(generator=gens[i])
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    drawn = probs.div_(q).argmax(dim=-1)
    if b.any_greedy:
        drawn = torch.where(f[3] > 0, x.argmax(dim=-1), drawn)
    return drawn


def _process_and_draw(logits, params, gens, history, nout, eos, masks) -> "torch.Tensor":
    """The batched pass of :func:`sample` (see there): ``[n]`` int64 token ids on ``logits.device``."""
    b = _prepare(params, gens, history, nout, eos, masks, logits.shape[1], logits.device)
    x, f = _process(logits, b, history)
    return _draw(x, f, b, gens)


def process_logits(
    logits: "torch.Tensor",
    params: Sequence[SamplingParams],
    *,
    history: Optional[TokenHistory] = None,
    num_output_tokens: Optional[Sequence[int]] = None,
    eos_token_ids: Optional[Sequence[Sequence[int]]] = None,
    guided_bitmasks: Optional[Sequence[Optional["numpy.ndarray"]]] = None,
) -> "torch.Tensor":
    """The logits :func:`sample` draws from: ``[n, V]`` float32 on ``logits.device`` (arguments as
    there). Removed tokens are -inf; greedy rows skip temperature, top-k and top-p.

    Raises:
        ValueError: a row's inputs are invalid (e.g. a ``logit_bias`` id ``>= V``, a bitmask that
            allows nothing, penalties without history).
    """
    n = logits.shape[0]
    nout = list(num_output_tokens) if num_output_tokens is not None else [0] * n
    eos = list(eos_token_ids) if eos_token_ids is not None else [()] * n
    masks = list(guided_bitmasks) if guided_bitmasks is not None else [None] * n
    b = _prepare(params, [None] * n, history, nout, eos, masks, logits.shape[1], logits.device)
    return _process(logits, b, history)[0]
