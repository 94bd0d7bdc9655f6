"""Application arguments of ``build_app`` (``serve run deployments:build_app key=value ...``).

One pydantic model validates them all (``serve run`` passes strings: pydantic coerces ``"2"`` and
``"false"``). Each deployment derives only what it needs: :meth:`ServeArgs.engine_kwargs` for the
engine, :meth:`ServeArgs.placement_group_bundles` for the replica's placement group.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.engine.protocol import MAX_DRAFT_TOKENS
from cluster.request import DefaultMode, SkipSelection

DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY_ENV = "EESERVE_API_KEY"


class ServeArgs(BaseModel):
    """Arguments of the eeserve application.

    Raises:
        pydantic.ValidationError (a ``ValueError``): an unknown key or a value out of range.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # ---- model and engine
    model: Optional[str] = Field(None, description="safetensors dir or GGUF file; None = SmolLM2-135M-Instruct")
    served_model_name: Optional[str] = Field(None, description="name in /v1/models; default: model basename")
    tensor_parallel_size: int = Field(1, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: Literal["auto", "none", "int8", "int4"] = Field(
        "auto", description="weight-only int8 / int4 linear layers and LM head; auto: the checkpoint's own "
                            "precision on the CPU (int4 for a Q4 GGUF such as the default model), none on CUDA")
    torch_compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="compiled decode graphs (torch.compile: slower first start, faster steps); "
                            "auto: on for the CPU at tensor-parallel size 1")
    max_model_len: Optional[int] = Field(None, ge=2)
    early_exit: bool = Field(True, description="False serves the full model; True uses the model's exit config")
    exit_threshold: Optional[float] = Field(None, ge=0.0, le=1.0, description="overrides the model's threshold")
    exit_mode: Optional[DefaultMode] = Field(
        None, description="default early-exit mode of requests (replaces the model's exit config's mode); None: the "
                          "model's. verified / self_speculative / layer_skip are lossless: the full model's output; "
                          "full: the full model unless a request names a mode")
    draft_layer: Optional[int] = Field(None, ge=1, description="self_speculative: the drafting exit layer; None: the "
                                                                "model's (its first exit layer)")
    num_draft_tokens: Optional[int] = Field(
        None, ge=1, le=MAX_DRAFT_TOKENS, description="lossless modes: drafts per verification; None: the model's (4)")
    skip_layers: Optional[tuple[int, ...]] = Field(
        None, description="layer_skip: the decoder layers (1-based, each below the last) drafts leave out, e.g. "
                          "skip_layers=3,5,7; None: the model's exit config's, else every other middle layer")
    skip_selection: Optional[SkipSelection] = Field(
        None, description="layer_skip: static keeps the skip set; online re-chooses one of the same size from the "
                          "verified tokens (CLaSp); None: the model's exit config's (static)")
    adaptive_drafts: Optional[bool] = Field(
        None, description="self_speculative: draft only as many tokens as the measured acceptance pays for (False: "
                          "always num_draft_tokens); None: the model's exit config's (True)")
    block_size: int = Field(16, ge=1)
    num_blocks: Optional[int] = Field(None, ge=1)
    kv_cache_memory_bytes: int = Field(1 << 30, ge=1, description="KV cache budget on CPU")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0,
                                          description="CUDA: fraction of GPU memory for weights + KV cache")
    enable_prefix_caching: bool = True
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    torch_threads: Optional[int] = Field(None, ge=1, description="torch threads per rank on CPU (default: cores / tp)")
    # ---- replicas and placement
    num_replicas: Optional[Union[int, Literal["auto"]]] = Field(None, description="None: 1, or the config file's")
    autoscaling_config: Optional[dict] = Field(
        None, description="Serve autoscaling of LLMServer (min_replicas, max_replicas, target_ongoing_requests, ...)")
    graceful_shutdown_timeout_s: Optional[float] = Field(
        None, gt=0, description="how long a replica being removed may finish its requests (Serve's default: 20)")
    max_ongoing_requests: Optional[int] = Field(None, ge=1)
    max_queued_requests: Optional[int] = Field(None, ge=-1)
    replica_num_cpus: float = Field(0.2, ge=0.0, description="CPUs of the replica's own bundle")
    num_cpus_per_rank: float = Field(0.2, ge=0.0, description="CPUs per rank bundle on CPU nodes")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    health_check_period_s: float = Field(5.0, gt=0)
    health_check_timeout_s: float = Field(60.0, gt=0)
    replica_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources of each replica (its own bundle), e.g. a node type's")
    # ---- router (deployments.router.PrefixAwareLoadRouter)
    routing_stats_period_s: float = Field(1.0, gt=0)
    router_imbalance_tokens: int = Field(1024, ge=0)
    router_block_size: int = Field(16, ge=1)
    # ---- ingress
    api_key: Optional[str] = Field(None, description=f"require this bearer key; default: ${API_KEY_ENV}")
    default_max_tokens: Optional[int] = Field(
        None, ge=1, description="max_tokens of requests that give none; None: chat gets the rest of the context "
                                "(lowered to the KV capacity by the engine), completions 16 (the OpenAI default)")
    ingress_num_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.1, ge=0.0)
    health_timeout_s: float = Field(0.5, gt=0, description="GET /health answers 503 if no replica answers in time")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header of 503 answers (overloaded, no engine)")

    @field_validator("model", "served_model_name", "api_key", "exit_mode", "draft_layer", "num_draft_tokens",
                     "adaptive_drafts", "skip_selection", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v in ("", "None", "none", "null") else v

    @field_validator("skip_layers", mode="before")
    @classmethod
    def _layer_list(cls, v):
        """``serve run`` passes a string: ``3,5,7``, ``3 5 7`` or ``[3, 5, 7]``."""
        if isinstance(v, str):
            text = v.strip().strip("[]()").replace(",", " ").split()
            return tuple(int(x) for x in text) if text and v.strip() not in ("None", "none", "null") else None
        return v

    @field_validator("autoscaling_config", mode="before")
    @classmethod
    def _json_or_none(cls, v):
        if isinstance(v, str):
            import json

            return json.loads(v) if v.strip() not in ("", "None", "none", "null") else None
        return v

    @field_validator("replica_resources", mode="before")
    @classmethod
    def _json_dict(cls, v):
        if isinstance(v, str):  # serve run ... replica_resources='{"llm_node": 1}'
            import json

            return json.loads(v) if v.strip() not in ("", "None", "none", "null") else {}
        return v if v is not None else {}

    @field_validator("num_replicas", "default_max_tokens", mode="before")
    @classmethod
    def _replicas(cls, v):
        return None if v in ("", "None", "none", "null") else v

    @model_validator(mode="after")
    def _exit_settings_need_exits(self):
        if not self.early_exit:
            given = [k for k in ("exit_mode", "draft_layer", "num_draft_tokens", "adaptive_drafts", "skip_layers",
                                 "skip_selection")
                     if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{given[0]}: needs early_exit true (early_exit false serves the full model)")
        return self

    # ------------------------------------------------------------------------------ derived
    def exit_config(self):
        """The engine's ``early_exit`` argument: None (full model), the model's own exit config
        (``MODEL_DEFAULT``), or, with ``exit_mode`` / ``draft_layer`` / ``num_draft_tokens`` /
        ``adaptive_drafts`` / ``skip_layers`` / ``skip_selection``, the model's exit config with those fields replaced (``mode`` for
        ``exit_mode``; reads the model's config files); ``exit_threshold`` replaces the config's
        threshold at every exit layer (calibrated per-layer thresholds included)."""
        import dataclasses

        from cluster.engine.factory import MODEL_DEFAULT, model_exit_config_with

        if not self.early_exit:
            return None
        over = dict(mode=self.exit_mode, draft_layer=self.draft_layer, num_draft_tokens=self.num_draft_tokens,
                    adaptive_drafts=self.adaptive_drafts, skip_layers=self.skip_layers,
                    skip_selection=self.skip_selection)
        if all(v is None for v in over.values()) and self.exit_threshold is None:
            return MODEL_DEFAULT
        ec = model_exit_config_with(self.model, **over)
        if self.exit_threshold is not None:
            ec = dataclasses.replace(ec, threshold=self.exit_threshold, layer_thresholds=None)
        return ec

    @property
    def model_name(self) -> str:
        """The served model name: explicit, else the model path's basename (without ``.gguf``)."""
        if self.served_model_name:
            return self.served_model_name
        if not self.model:
            return DEFAULT_SERVED_MODEL_NAME
        p = Path(self.model.rstrip("/"))
        return p.stem if p.suffix == ".gguf" else p.name

    @property
    def resolved_api_key(self) -> Optional[str]:
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def resolved_device(self) -> str:
        """``auto``: CUDA when the Ray cluster (if connected) or this machine has a GPU, else CPU."""
        if self.device != "auto":
            return self.device
        try:
            import ray

            if ray.is_initialized():
                return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        except Exception:
            pass
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def uses_rank_actors(self, device: str) -> bool:
        """Ranks run as Ray actors in the replica's placement group (else in the replica process)."""
        return self.tensor_parallel_size > 1 or device.startswith("cuda")

    def placement_group_bundles(self, device: str) -> Optional[list[dict]]:
        """Bundle 0 hosts the replica; bundles 1..tp host one rank each (a GPU, or CPUs)."""
        if not self.uses_rank_actors(device):
            return None
        rank = {"GPU": 1} if device.startswith("cuda") else {"CPU": self.num_cpus_per_rank or 0.001}
        own = {"CPU": self.replica_num_cpus or 0.001, **self.replica_resources}
        return [own] + [dict(rank) for _ in range(self.tensor_parallel_size)]

    def engine_kwargs(self, device: str) -> dict:
        """Keyword arguments of :func:`cluster.engine.factory.create_engine` (placement group added by the replica)."""
        return dict(model=self.model, tensor_parallel_size=self.tensor_parallel_size,
                    early_exit=self.exit_config(), dtype=self.dtype,
                    max_model_len=self.max_model_len, block_size=self.block_size, num_blocks=self.num_blocks,
                    kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                    gpu_memory_utilization=self.gpu_memory_utilization,
                    enable_prefix_caching=self.enable_prefix_caching, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens, device=device,
                    quantization=self.quantization, torch_compile=self.torch_compile)
