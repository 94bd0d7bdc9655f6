"""The front end shared by every way in: the offline :class:`cluster.llm.LLM` and the HTTP ingress.

:mod:`cluster.frontend.processor` turns a prompt or a chat into a checked
:class:`~cluster.engine.protocol.EngineRequest` (vLLM v1's ``Processor``);
:mod:`cluster.frontend.outputs` accumulates the engine's deltas into a result (text, token ids,
logprobs, exit statistics).
"""
from cluster.frontend.outputs import CompletionOutput
from cluster.frontend.processor import Processor

__all__ = ["CompletionOutput", "Processor"]
