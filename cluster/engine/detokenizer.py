"""Incremental (streaming) detokenization for one request.

Modelled on vLLM's v1 detokenizer (``vllm/v1/engine/detokenizer.py``: ``FastIncrementalDetokenizer``
plus ``check_stop_strings``): the tokenizer library's own streaming decoder
(:class:`tokenizers.decoders.DecodeStream`) turns token ids into text, and this class adds the
stop-string hold-back. Each step costs time proportional to its new tokens (the decode stream keeps
only a few ids of context; the stop search looks at the new text plus at most ``max(len(stop)) - 1``
held-back characters), never to the whole output.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from tokenizers.decoders import DecodeStream

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a decoder renders for incomplete UTF-8
FLUSH_CONTEXT = 4  # already-decoded ids decoded before the unfinished tail when flushing at finish


class IncrementalDetokenizer:
    """One request's streaming detokenizer (vLLM-style hold-back of incomplete characters and partial
    stop strings).

    What it holds back, and why:

    * **Incomplete characters.** A multi-byte UTF-8 character (CJK, emoji) is often split over several
      byte-level tokens; decoding the first of them alone yields U+FFFD. ``DecodeStream`` keeps such ids
      until the character completes, so no delta ever carries a replacement character that the final
      text does not have, and no emitted text is ever rewritten (the old re-decode-and-resend garbling).
    * **Possible stop-string starts.** The longest tail of the text that is a proper prefix of some
      stop string (at most ``max(len(s) for s in stop) - 1`` characters, vLLM's ``stop_buffer_length``)
      is withheld until later text completes or rules out the stop string, so text that belongs to a
      stop string is never emitted. Stop strings spanning token boundaries are found because each step
      searches the held-back tail plus the new text.

    Invariant: after the last update (``finished=True``, or a stop hit), :attr:`text` equals
    ``tokenizer.decode(output_token_ids, skip_special_tokens=...)`` cut before the first occurrence of
    any stop string. On ``finished=True`` everything withheld is flushed; a still-incomplete character
    becomes exactly what ``tokenizer.decode`` gives for it (U+FFFD for the byte-level BPE of SmolLM2).

    The decode stream starts empty: the prompt is not fed as context (``prompt_token_ids`` is accepted
    for the interface only), since context could change the output's first characters (a completed
    character split from the prompt, or a SentencePiece leading space) and break the invariant.
    ``clean_up_tokenization_spaces`` is not applied (it is off for SmolLM2, and transformers skips it for
    every BPE tokenizer); a warning is logged for a tokenizer that would apply it.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self._backend = (getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
                         or tokenizer)  # the Rust ``tokenizers.Tokenizer``
        if (getattr(tokenizer, "clean_up_tokenization_spaces", False)
                and type(self._backend.model).__name__ != "BPE"):
            logger.warning("streamed text skips clean_up_tokenization_spaces of %s", type(tokenizer).__name__)
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = tuple(s for s in stop if s)
        self._hold_max = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._decoded = 0  # the stream's text so far covers exactly self._ids[:self._decoded]
        self._pending = ""  # decoded text withheld: it may be the start of a stop string
        self._parts: list[str] = []
        self._finished = False
        self.chars_examined = 0  # characters the stop-string search has looked at (tests bound it)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def output_token_ids(self) -> list[int]:
        """Every id fed before the detokenizer finished (the live list: do not mutate)."""
        return self._ids

    @property
    def finished(self) -> bool:
        return self._finished

    def update(self, new_token_ids: list[int], finished: bool) -> tuple[str, Optional[str]]:
        """Feed this step's new tokens. Returns (text safe to emit now, stop string hit or None).

        - text withheld: an incomplete UTF-8 sequence, and the tail of the text that could still be the
          start of a stop string (at most ``max(len(s) for s in stop) - 1`` characters).
        - on a stop-string hit (the earliest occurrence wins; ties go to the first in ``stop``): returns
          the text up to (excluding) the stop string and the stop string; the detokenizer is then
          finished and further updates return ("", None) and record no ids.
        - finished=True (EOS, length, abort): flushes everything withheld except a still-incomplete
          character at the very end (``max_tokens`` cut it), which is dropped as vLLM does, rather than
          rendered as U+FFFD: the final text is ``tokenizer.decode(ids)`` without trailing U+FFFD.
        """
        if self._finished:
            return "", None
        chunks = []
        for tid in new_token_ids:  # one id at a time: withhold only an incomplete character, not the step
            self._ids.append(tid)
            chunk = self._step(tid)
            if chunk is not None:
                chunks.append(chunk)
                self._decoded = len(self._ids)
        new = "".join(chunks)
        if finished and self._decoded < len(self._ids):
            new += self._flush_tail()
        buf = self._pending + new
        self._pending = ""
        hit: Optional[tuple[int, str]] = None
        if self._stop and new:
            self.chars_examined += len(buf)
            for s in self._stop:
                i = buf.find(s)
                if i >= 0 and (hit is None or i < hit[0]):
                    hit = (i, s)
        if hit is not None:
            self._finished = True
            return self._emit(buf[:hit[0]]), hit[1]
        if finished:
            self._finished = True
        elif self._stop:
            hold = self._partial_stop_len(buf)
            if hold:
                buf, self._pending = buf[:-hold], buf[-hold:]
        return self._emit(buf), None

    def _emit(self, s: str) -> str:
        if s:
            self._parts.append(s)
        return s

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of a stop string."""
        for k in range(min(self._hold_max, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _step(self, tid: int) -> Optional[str]:
        try:
            return self._stream.step(self._backend, tid)
        except Exception as e:  # noqa: BLE001
            if "invalid prefix" not in str(e).lower():
                raise
            # DecodeStream's rare non-monotonic-decode error (vLLM issue 17448): restart it on the last
            # decoded ids as context and replay the ids it has not turned into text yet.
            logger.warning("DecodeStream invalid prefix; restarting the stream")
            c = self._decoded
            self._stream = DecodeStream(self._ids[max(0, c - FLUSH_CONTEXT):c], skip_special_tokens=self._skip)
            return self._stream.step(self._backend, self._ids[c:])

    def _flush_tail(self) -> str:
        """The text of the ids the stream still withholds, as the full decode renders it (decode them
        after a few already-decoded ids of context, drop the context's own text), without the
        trailing U+FFFD of the incomplete character that made the stream withhold them."""
        c, dec = self._decoded, self._backend.decode
        ctx = self._ids[max(0, c - FLUSH_CONTEXT):c]
        head = dec(ctx, skip_special_tokens=self._skip)
        full = dec(ctx + self._ids[c:], skip_special_tokens=self._skip)
        if not full.startswith(head):  # not seen with byte-level BPE; exact, O(output) fallback
            whole = dec(self._ids[:c], skip_special_tokens=self._skip)
            head, full = whole, dec(self._ids, skip_special_tokens=self._skip)
        self._decoded = len(self._ids)
        return full[len(head):].rstrip(REPLACEMENT_CHAR)
