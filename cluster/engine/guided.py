"""Guided decoding for OpenAI ``response_format`` (``json_object`` / ``json_schema``) with xgrammar.

xgrammar (https://github.com/mlc-ai/xgrammar, vLLM's default structured-output backend) compiles a
JSON Schema into a grammar over the tokenizer's vocabulary and keeps one ``GrammarMatcher`` per
request. Per step the engine calls :meth:`GuidedDecoder.bitmask` (before the model step), the
sampler sets the logits of disallowed tokens to ``-inf``, and the engine feeds the sampled token to
:meth:`GuidedDecoder.accept`. Stop (EOS) tokens are allowed only once the document is complete;
tokens past the tokenizer (LM-head padding) and other special tokens are never allowed.

``json_object`` compiles the schema ``{"type": "object"}`` (as vLLM does), so the output is a JSON
object, not any JSON value. Whitespace between JSON tokens is fixed (``any_whitespace=False``:
``{"a": 1, "b": [2, 3]}``) by default, which stops small models from emitting endless whitespace.
xgrammar is imported lazily, so importing this module is cheap.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from cluster.engine.protocol import InvalidRequestError

_OBJECT_SCHEMA = '{"type": "object"}'
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


class GuidedDecoder:
    """One request's grammar state: an xgrammar ``GrammarMatcher`` over the model's vocabulary.

    Not thread-safe; use it from the engine loop only. Create it with :meth:`GuidedDecoderFactory.create`.
    """

    def __init__(self, matcher, keep_mask: np.ndarray, stop_mask: np.ndarray, banned: frozenset):
        self._m, self._keep, self._stop_mask, self._banned = matcher, keep_mask, stop_mask, banned
        self._mask: Optional[np.ndarray] = None  # the current state's mask, filled on first use

    def _fill(self) -> np.ndarray:
        if self._mask is None:
            if self._m.is_terminated():  # after a stop token: only stop tokens (never an all-0 mask)
                self._mask = self._stop_mask.copy()
            else:
                self._mask = np.zeros_like(self._keep)
                self._m.fill_next_token_bitmask(self._mask)
                self._mask &= self._keep
        return self._mask

    def bitmask(self) -> np.ndarray:
        """The tokens allowed next: int32 ``[ceil(vocab_size / 32)]``, bit ``j`` (LSB first) of word
        ``i`` set iff token ``32 * i + j`` is allowed (xgrammar's layout). A fresh array per call;
        never all zero (after a stop token was accepted: the stop tokens)."""
        return self._fill().copy()

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. Returns False (and leaves the state unchanged) if the
        grammar rejects it (not allowed, out of range, or after a stop token was accepted)."""
        t = int(token_id)
        ok = t not in self._banned and not self._m.is_terminated() and bool(self._m.accept_token(t))
        if ok:
            self._mask = None
        return ok

    def is_terminated(self) -> bool:
        """True once a stop token was accepted, or the document is complete and nothing but a stop
        token may follow (the engine can finish the request without another model step)."""
        if self._m.is_terminated():
            return True
        mask = self._fill()  # xgrammar allows a stop token iff the document is complete
        return bool(np.any(mask & self._stop_mask)) and not np.any(mask & ~self._stop_mask)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (for speculative decoding). Raises
        RuntimeError (from xgrammar) if ``num_tokens`` exceeds the number accepted."""
        if num_tokens > 0:
            self._m.rollback(int(num_tokens))
            self._mask = None


class GuidedDecoderFactory:
    """One per engine: xgrammar ``TokenizerInfo`` + an LRU cache of compiled grammars by schema text.

    Args:
        tokenizer: the Hugging Face tokenizer of the served model.
        vocab_size: the MODEL's vocabulary (rows of the LM head, the logits width); may exceed
            ``len(tokenizer)``: the padding ids are never allowed.
        stop_token_ids: the engine's EOS ids (default: the tokenizer's ``eos_token_id``); allowed
            only when the document is complete.
        cache_size: compiled grammars kept (least recently used dropped first).
        any_whitespace: let the grammar allow any whitespace between JSON tokens (vLLM's default);
            False (default) fixes the layout to ``", "`` / ``": "`` separators.

    Attributes:
        num_compiles: grammars compiled so far (cache misses).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Optional[Sequence[int]] = None,
                 cache_size: int = 64, any_whitespace: bool = False):
        import xgrammar as xgr

        stops = None if stop_token_ids is None else [int(t) for t in stop_token_ids]
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.vocab_size, self.stop_token_ids = int(vocab_size), list(info.stop_token_ids)
        # xgrammar treats added special tokens (<|im_start|>, <|endoftext|>, ...) as their literal
        # text, e.g. inside a JSON string; we never allow the non-stop ones
        special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        special |= set(tokenizer.all_special_ids)
        self._banned = frozenset(i for i in special if 0 <= i < vocab_size and i not in self.stop_token_ids)
        self._keep = _pack([i for i in range(vocab_size) if i not in self._banned], vocab_size)
        self._stop_mask = _pack(self.stop_token_ids, vocab_size)
        # our own LRU replaces xgrammar's cache (so that memory and num_compiles are ours to bound/count)
        self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self._xgr, self._any_ws, self._cache_size = xgr, any_whitespace, cache_size
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiles = 0

    def _compiled(self, params):
        text = _OBJECT_SCHEMA if params.json_object else params.json_schema
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
            try:
                json.loads(text)
            except (TypeError, ValueError) as e:
                raise InvalidRequestError("response_format", f"json_schema is not valid JSON: {e}") from None
            try:
                grammar = self._compiler.compile_json_schema(text, any_whitespace=self._any_ws)
            except (RuntimeError, ValueError, TypeError) as e:
                msg = (_LOG_PREFIX.sub("", str(e).strip()).splitlines() or [type(e).__name__])[0]
                raise InvalidRequestError("response_format", f"invalid or unsupported json_schema: {msg}") from None
            self.num_compiles += 1
            self._cache[text] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return grammar

    def validate(self, params) -> None:
        """Compile (cached) ``params`` (a :class:`cluster.sampling.GuidedDecodingParams`) at request
        admission. Raises :class:`InvalidRequestError` (``param="response_format"``,
        ``code="invalid_value"``) for schema text that is not JSON or not a valid/supported schema."""
        self._compiled(params)

    def create(self, params) -> GuidedDecoder:
        """A fresh :class:`GuidedDecoder` for one request; raises like :meth:`validate`."""
        matcher = self._xgr.GrammarMatcher(self._compiled(params))
        return GuidedDecoder(matcher, self._keep, self._stop_mask, self._banned)


def _pack(token_ids, vocab_size: int) -> np.ndarray:
    """int32 ``[ceil(vocab_size / 32)]`` bitmask (xgrammar's layout) with the bits of ``token_ids`` set."""
    bits = np.zeros((vocab_size + 31) // 32 * 32, dtype=bool)
    bits[[t for t in token_ids if 0 <= t < vocab_size]] = True
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)
