"""Prompt or chat -> a checked :class:`~cluster.engine.protocol.EngineRequest`, built once.

After vLLM v1's ``Processor``: every check a request needs only the model for happens here, before
anything reaches an engine (so the HTTP ingress answers a bad request with a 400 without asking a
replica). The engine then checks only what depends on its own state: the KV cache fit and the exit
plan (:meth:`cluster.engine.engine.LLMEngine.validate`).

The rules, each checked here and nowhere else: prompt ids, ``stop_token_ids``
and ``logit_bias`` ids lie in ``[0, vocab_size)``; the prompt leaves room for one token in the
context window and prompt + ``max_tokens`` fits it (a default ``max_tokens`` is lowered instead);
a guided-decoding schema compiles. A non-empty prompt, ``min_tokens <= max_tokens`` and the ranges of
every field are the pydantic declarations of :class:`~cluster.sampling.SamplingParams` and
``EngineRequest``, which this module maps to :class:`InvalidRequestError` naming the caller's field.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from pydantic import ValidationError

from cluster.config import ModelConfig
from cluster.engine.protocol import EngineRequest, InvalidRequestError, lower_max_tokens
from cluster.sampling import SamplingParams

Prompt = Union[str, Sequence[int]]


class Processor:
    """Builds engine requests for one model.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        model_config: gives ``vocab_size`` and ``max_model_len``.
        guided_factory: a :class:`cluster.engine.guided.GuidedDecoderFactory` to check guided-decoding
            schemas with (an engine's own, to compile each schema once); None: built at first use.
    """

    def __init__(self, tokenizer, model_config: ModelConfig, guided_factory=None):
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size
        self.max_model_len = model_config.max_model_len
        self._eos = model_config.stop_ids_with(tokenizer)
        self._guided_factory = guided_factory

    # ------------------------------------------------------------------------------ prompts -> ids
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string is encoded without special tokens; ids pass through
        (checked by :meth:`process`)."""
        return self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)

    def chat_ids(self, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat (OpenAI-style ``{"role", "content"}`` dicts) through the model's chat template.

        Raises:
            InvalidRequestError: (``messages``) the model has no chat template, or the template
                refuses the conversation (e.g. a role order it does not allow).
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("messages", "messages: this model has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja errors: bad role order, unsupported content
            raise InvalidRequestError("messages", f"messages: cannot apply the chat template: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------------------ the request
    def process(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None, *,
                prompt_param: str = "prompt", max_tokens_is_default: bool = False,
                **exit_fields) -> EngineRequest:
        """The checked :class:`EngineRequest` of one prompt.

        Args:
            prompt: a string (tokenized here) or token ids.
            prompt_param: the name of the prompt in the caller's API (``messages`` for a chat).
            max_tokens_is_default: the caller gave no ``max_tokens``: it is lowered to the room the
                context window leaves (the engine lowers it further to what its KV cache holds).
            exit_fields: :class:`EngineRequest`'s ``early_exit``, ``exit_threshold``, ``exit_mode``,
                ``draft_layer``, ``num_draft_tokens``.

        Raises:
            InvalidRequestError: an empty prompt or ids outside ``[0, vocab_size)`` (``prompt_param``);
                ``stop_token_ids`` / ``logit_bias`` ids outside it; a prompt without room for one
                token, or prompt + ``max_tokens`` beyond ``max_model_len`` (``context_length_exceeded``);
                a lowered default ``max_tokens`` below ``min_tokens``; a guided-decoding schema that
                does not compile (``response_format``); a field out of its declared range.
        """
        ids = self.tokenize(prompt)
        sp = params if params is not None else SamplingParams()
        self._check_ids(ids, prompt_param)
        self._check_ids(sp.stop_token_ids, "stop_token_ids")
        self._check_ids(list(sp.logit_bias), "logit_bias")
        n, limit = len(ids), self.max_model_len
        if n >= limit:
            raise InvalidRequestError(prompt_param, f"This model's maximum context length is {limit} tokens. However, "
                                      f"your prompt has {n} tokens; no room is left for the completion.",
                                      code="context_length_exceeded")
        if n + sp.max_tokens > limit:
            if not max_tokens_is_default:
                raise InvalidRequestError("max_tokens", f"This model's maximum context length is {limit} tokens. "
                                          f"However, you requested {n + sp.max_tokens} tokens ({n} in the prompt, "
                                          f"{sp.max_tokens} in the completion).", code="context_length_exceeded")
            sp = lower_max_tokens(sp, limit - n)
        if sp.guided_decoding is not None:
            self._guided().validate(sp.guided_decoding)
        try:
            return EngineRequest(request_id=request_id, prompt_token_ids=ids, sampling_params=sp,
                                 max_tokens_is_default=max_tokens_is_default, **exit_fields)
        except ValidationError as e:  # e.g. an empty prompt (EngineRequest declares prompt_token_ids non-empty)
            err = InvalidRequestError.from_validation(e)
            if err.param == "prompt_token_ids":
                err = InvalidRequestError(prompt_param, f"{prompt_param}: the prompt is empty (it must not be empty)"
                                          if not ids else err.message.replace("prompt_token_ids", prompt_param))
            raise err from None

    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        v = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= v):
            raise InvalidRequestError(param, f"{param}: token ids must lie in [0, {v})")

    def _guided(self):
        if self._guided_factory is None:
            from cluster.engine.guided import GuidedDecoderFactory

            self._guided_factory = GuidedDecoderFactory(self.tokenizer, self.vocab_size, stop_token_ids=list(self._eos))
        return self._guided_factory

