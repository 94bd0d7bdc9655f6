"""eeserve engine: early-exit LLM inference with paged KV cache and iteration-level batching."""
from cluster.config import CacheConfig, ExitConfig, ModelConfig, ParallelConfig, SchedulerConfig
from cluster.engine.protocol import EngineRequest, InvalidRequestError, RequestOutput
from cluster.frontend.outputs import CompletionOutput
from cluster.llm import LLM
from cluster.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "ExitConfig", "CompletionOutput", "EngineRequest",
           "RequestOutput", "InvalidRequestError", "ModelConfig", "CacheConfig",
           "SchedulerConfig", "ParallelConfig"]
