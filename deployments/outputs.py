"""From engine deltas to OpenAI choices: per-choice accumulation, log-probabilities, usage.

Token strings in log-probabilities: the token's own bytes (byte-level BPE pieces mapped back to
bytes), shown as text when they are valid UTF-8 and as ``"bytes:\\xe4\\xb8"`` otherwise (a piece of
a multi-byte character); ``bytes`` holds them as integers (OpenAI's chat shape). Log-probabilities
are clamped at -9999 (as vLLM does) so the JSON never holds ``-Infinity``.
"""
from __future__ import annotations

import time
from typing import Optional

from cluster.engine.protocol import RequestOutput, TokenLogprob
from cluster.frontend.outputs import CompletionOutput
from deployments.responses import (ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, EarlyExitStats,
                                   PromptTokensDetails, TopLogprob, Usage)

MIN_LOGPROB = -9999.0


def _clamp(lp: float) -> float:
    return lp if lp == lp and lp > MIN_LOGPROB else MIN_LOGPROB  # NaN and -inf -> MIN_LOGPROB


class TokenText:
    """Token id -> (text, bytes) of the token alone, cached."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._byte_decoder: Optional[dict[str, int]] = None
        try:
            decoder = tokenizer.backend_tokenizer.decoder
            if type(decoder).__name__ == "ByteLevel":
                from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

                self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        except Exception:  # noqa: BLE001 - a slow or non-byte-level tokenizer: decode per token
            self._byte_decoder = None
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._piece(token_id)
        return hit

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        raw: Optional[bytes] = None
        if self._byte_decoder is not None and token_id not in self._special:
            s = self.tok.convert_ids_to_tokens(token_id)
            if isinstance(s, str) and all(c in self._byte_decoder for c in s):
                raw = bytes(self._byte_decoder[c] for c in s)
        if raw is None:
            try:
                raw = self.tok.decode([token_id]).encode()
            except Exception:  # noqa: BLE001 - ids past the tokenizer (LM-head padding)
                raw = f"<token {token_id}>".encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def text(self, token_id: int) -> str:
        return self(token_id)[0]


class ChoiceState(CompletionOutput):
    """One choice (one engine request): the shared accumulator
    (:class:`cluster.frontend.outputs.CompletionOutput`) plus what only an OpenAI choice has.

    ``index`` is OpenAI's choice index (``prompt_index * n + sample``); ``prefix`` the echoed prompt
    text (completions with ``echo``), sent before the first generated text; ``arrival`` and
    ``first_token`` are this process's ``time.monotonic()`` (TTFT / TPOT metrics of the ingress);
    ``text_offset`` counts the characters of the choice text so far (completions logprobs).
    """

    def __init__(self, index: int, prompt_index: int, prompt_ids: list[int], prefix: str = ""):
        super().__init__(request_id="", prompt_token_ids=prompt_ids)
        self.index, self.prompt_index, self.prefix = index, prompt_index, prefix
        self.arrival = time.monotonic()
        self.first_token: Optional[float] = None
        self.text_offset = 0

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt_token_ids

    def add(self, d: RequestOutput) -> "ChoiceState":
        if d.new_token_ids and self.first_token is None:
            self.first_token = time.monotonic()
        super().add(d)
        return self

    @property
    def stop_reason_json(self):
        return self.stop_reason if isinstance(self.stop_reason, (int, str)) else None


def chat_logprobs(tt: TokenText, entries: list[TokenLogprob]) -> ChatLogprobs:
    def top(tid: int, lp: float) -> TopLogprob:
        text, raw = tt(tid)
        return TopLogprob(token=text, logprob=_clamp(lp), bytes=list(raw))

    content = []
    for e in entries:
        text, raw = tt(e.token_id)
        content.append(ChatTokenLogprob(token=text, logprob=_clamp(e.logprob), bytes=list(raw),
                                        top_logprobs=[top(t, lp) for t, lp in e.top]))
    return ChatLogprobs(content=content)


def completion_logprobs(tt: TokenText, choice: ChoiceState, entries: list[TokenLogprob],
                        prompt_ids: Optional[list[int]] = None) -> CompletionLogprobs:
    """Log-probabilities of ``entries`` (advancing ``choice.text_offset``); ``prompt_ids``: echoed
    prompt tokens first, whose log-probabilities are ``null`` (the engine computes none for prompts)."""
    out = CompletionLogprobs()

    def add(tid: int, lp: Optional[float], top: Optional[dict]):
        text = tt.text(tid)
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(top)
        out.text_offset.append(choice.text_offset)
        choice.text_offset += len(text)

    for tid in prompt_ids or ():
        add(tid, None, None)
    for e in entries:
        top = {tt.text(t): _clamp(lp) for t, lp in e.top}
        top.setdefault(tt.text(e.token_id), _clamp(e.logprob))
        add(e.token_id, _clamp(e.logprob), top)
    return out


def usage_and_stats(choices: list[ChoiceState], num_layers: int) -> tuple[Usage, EarlyExitStats]:
    """Usage (prompt tokens counted once per prompt, completion tokens over all choices) and the
    early-exit statistics of all generated tokens (draft totals summed over the choices)."""
    per_prompt: dict[int, ChoiceState] = {}
    for c in choices:
        per_prompt.setdefault(c.prompt_index, c)
    p = sum(c.num_prompt_tokens for c in per_prompt.values())
    cached = sum(min(c.num_cached_tokens, c.num_prompt_tokens) for c in per_prompt.values())
    n = sum(len(c.token_ids) for c in choices)
    layers = [l for c in choices for l in c.exit_layers]
    num_layers = next((c.num_layers for c in choices if c.num_layers), num_layers)
    return (Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n,
                  prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)),
            EarlyExitStats.from_layers(num_layers, layers, mode=next((c.exit_mode for c in choices if c.exit_mode),
                                                                     None),
                                       num_draft_tokens=sum(c.num_draft_tokens for c in choices),
                                       num_accepted_tokens=sum(c.num_accepted_tokens for c in choices),
                                       num_verify_steps=sum(c.num_verify_steps for c in choices)))
