"""A request's view of its generated tokens on the engine side: text and grammar.

:class:`TokenStream` is the :class:`~cluster.request.TokenObserver` the engine hangs on each
:class:`~cluster.request.Request`: the scheduler feeds it every token it appends, so stop strings and
a completed grammar are decided where EOS, stop tokens and ``max_tokens`` are (``Scheduler.update``),
and the engine reads the text of each delta from it.
"""
from __future__ import annotations

from typing import Optional

from cluster.engine.detokenizer import IncrementalDetokenizer


class TokenStream:
    """Incremental text (:class:`IncrementalDetokenizer`) and, for guided decoding, the grammar
    matcher (:class:`cluster.engine.guided.GuidedDecoder`) of one request.

    Args:
        detokenizer: the request's streaming detokenizer (it holds the stop strings).
        guided: the request's grammar matcher, or None.
    """

    def __init__(self, detokenizer: IncrementalDetokenizer, guided=None):
        self.detokenizer = detokenizer
        self.guided = guided
        self.first_token_time: Optional[float] = None
        self.num_sent = 0  # output tokens already reported in a delta
        self._text: list[str] = []  # text not yet reported

    def observe(self, token_id: int, final: bool) -> tuple[bool, Optional[str]]:
        """See :meth:`cluster.request.TokenObserver.observe`.

        Raises:
            RuntimeError: the grammar rejects the token.
        """
        grammar_done = False
        if self.guided is not None and not final:
            if not self.guided.accept(token_id):
                raise RuntimeError(f"the grammar rejected sampled token {token_id}")
            grammar_done = self.guided.is_terminated()
        text, stop = self.detokenizer.update([token_id], finished=final or grammar_done)
        if text:
            self._text.append(text)
        return stop is not None or grammar_done, stop

    def take_text(self) -> str:
        """The text produced since the last call (safe to show: see the detokenizer's hold-back)."""
        text, self._text = "".join(self._text), []
        return text
