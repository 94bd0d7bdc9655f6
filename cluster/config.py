"""Frozen configuration dataclasses, one per concern (see ../shared/DESIGN.md).

Each part of the stack receives only its own sub-config. Derived values are properties, never
mutated fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from cluster.request import DEFAULT_MODES, LOSSLESS_MODES, LOSSY_MODES, SKIP_SELECTIONS, DefaultMode, LossyMode, SkipSelection

ConfidenceMeasure = Literal["max_prob", "top2_margin", "classifier"]
CONFIDENCE_MEASURES = ("max_prob", "top2_margin", "classifier")
ExitHeadKind = Literal["shared", "trained"]
QUANT_CHOICES = ("none", "int8", "int4")  # same as cluster.model.layers.quant.QUANT_CHOICES


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2-style q/k/v bias).

    Built from a Hugging Face config with :meth:`from_hf_config`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    dtype: str = "float32"
    quantization: str = "none"  # weight-only: none | int8 (per output channel) | int4 (group-wise)
    quant_group_size: int = 32  # int4 group size along the input dimension (32, 64 or 128; 32 measured best)
    torch_compile: bool = False  # compiled decode graphs (cluster.model.compile)
    # quantized layers also keep a dense bfloat16 copy for prompt tokens (quant.dense_rows_from)
    dense_prefill: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    # The HF config object itself (used for RoPE init functions); excluded from eq/hash.
    hf_config: object = field(default=None, compare=False, repr=False)

    SUPPORTED_TYPES = ("llama", "qwen2", "mistral")

    def __post_init__(self):
        if self.quantization not in QUANT_CHOICES:
            raise ValueError(f"quantization: must be one of {QUANT_CHOICES}, got {self.quantization!r}")
        if self.quant_group_size not in (32, 64, 128):
            raise ValueError(f"quant_group_size: must be 32, 64 or 128, got {self.quant_group_size}")

    def stop_ids_with(self, tokenizer) -> tuple[int, ...]:
        """The model's EOS ids (from its config), else the tokenizer's ``eos_token_id``, else none."""
        if self.eos_token_ids:
            return tuple(self.eos_token_ids)
        return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()

    @classmethod
    def from_hf_config(cls, hf_config, dtype: str = "float32", max_model_len: Optional[int] = None,
                       quantization: str = "none", quant_group_size: int = 32,
                       torch_compile: bool = False, dense_prefill: bool = False) -> "ModelConfig":
        """Build from a ``transformers`` ``PretrainedConfig``.

        Raises:
            ValueError: the architecture (``model_type``) is not a supported Llama-family decoder.
        """
        mt = getattr(hf_config, "model_type", None)
        if mt not in cls.SUPPORTED_TYPES:
            raise ValueError(
                f"model: unsupported architecture {mt!r}; supported model_type values: {cls.SUPPORTED_TYPES}"
            )
        nh = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // nh
        eos = hf_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        attention_bias = bool(getattr(hf_config, "attention_bias", mt == "qwen2"))
        limit = int(getattr(hf_config, "max_position_embeddings", 2048))
        return cls(
            model_type=mt,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=nh,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or nh,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_model_len=min(max_model_len or limit, limit),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            dtype=dtype,
            quantization=quantization,
            quant_group_size=quant_group_size,
            torch_compile=torch_compile,
            dense_prefill=dense_prefill and quantization != "none",
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=eos_ids,
            hf_config=hf_config,
        )

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.dtype in ("bfloat16", "float16") else 4

    def kv_bytes_per_token(self, tensor_parallel_size: int = 1) -> int:
        """Bytes of K and V for one token over all layers on one tensor-parallel rank."""
        kv_heads = self.num_kv_heads // tensor_parallel_size
        return 2 * self.num_layers * kv_heads * self.head_dim * self.dtype_bytes


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: ``bfloat16`` on CUDA, ``float32`` elsewhere; any other value as given."""
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return dtype


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache shape.

    ``num_blocks=None`` derives the count: on CUDA from the device's memory after the weights load,
    ``gpu_memory_utilization`` being the fraction of the GPU's total memory this engine may use
    (weights, activations and KV cache; vLLM's meaning, see :mod:`cluster.worker.memory`); on the
    CPU from ``kv_cache_memory_bytes`` (per tensor-parallel rank).
    """

    block_size: int = 16
    num_blocks: Optional[int] = None
    kv_cache_memory_bytes: int = 1 << 30
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")

    def resolve_num_blocks(self, model: ModelConfig, tensor_parallel_size: int = 1) -> int:
        """Number of KV blocks without measuring a device: ``num_blocks`` if set, else
        ``kv_cache_memory_bytes`` divided by block bytes (the CPU's budget)."""
        if self.num_blocks is not None:
            return self.num_blocks
        per_block = model.kv_bytes_per_token(tensor_parallel_size) * self.block_size
        return max(1, self.kv_cache_memory_bytes // per_block)


@dataclass(frozen=True)
class SchedulerConfig:
    """Iteration-level scheduler limits (vLLM names)."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism. ``backend=None`` picks NCCL on CUDA and gloo on CPU.

    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (rank actors use their own GPU, ``cuda:0`` under Ray).
    ``debug_default_device`` (tests): every worker step runs inside ``with torch.device(...)``, e.g.
    ``"meta"``, so a tensor created without an explicit device fails as it would beside a CUDA model.
    """

    tensor_parallel_size: int = 1
    backend: Optional[str] = None
    device: str = "cpu"
    debug_default_device: Optional[str] = None

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")

    @property
    def dist_backend(self) -> str:
        return self.backend or ("nccl" if self.device.startswith("cuda") else "gloo")


@dataclass(frozen=True)
class ExitConfig:
    """Early-exit settings (arXiv 2407.20272).

    Attributes:
        exit_layers: 1-based layer counts after which a token may exit (exit layer ``l`` means the
            hidden state after ``l`` decoder layers). The final layer is always an implicit exit.
        head: ``shared`` uses the final norm + LM head at every exit (LayerSkip style);
            ``trained`` loads per-exit heads from ``heads_path``.
        confidence: ``max_prob`` (max softmax probability) or ``top2_margin`` (top-1 minus top-2
            probability), both computed from the exit's full-vocabulary logits; ``classifier``: a
            small learned exit classifier on the hidden state (CALM's "meta" measure) predicts the
            probability that the exit head's argmax equals the final layer's; logits are computed
            only for rows that pass (needs ``head='trained'`` with classifiers in ``heads_path``).
        threshold: a token exits at the first exit layer whose confidence is >= threshold.
        layer_thresholds: optional per-exit-layer thresholds aligned with ``exit_layers`` (written by
            ``eeserve calibrate``); they replace ``threshold`` for requests that use the default
            threshold. A per-request threshold still applies to every exit layer.
        policy: ``paper``: the batch runs layer by layer and leaves the full computation only once
            every sequence is confident; ``per_sequence``: confident sequences leave at once and only
            receive KV fill. Both are lossy: an exit's token is final. Stop tokens (EOS, a request's
            ``stop_token_ids``) are only emitted at full depth: a row whose exit argmax is one keeps
            computing (it is re-run from its exit layer to the last layer in the same iteration).
        mode: the mode of requests that name none: ``full`` (the full model; requests may still ask
            for any mode), None (the lossy ``policy``), ``paper`` / ``per_sequence`` (lossy, sets the policy), or a
            lossless speculative mode whose greedy output equals the full model's token for token:
            ``verified`` (AdaDecode, Wei et al. ICML 2025: a token whose exit is confident is a draft;
            drafting goes on until an exit is not confident or ``num_draft_tokens`` drafts exist; the
            drafts' remaining layers then run in one verification pass, the longest agreeing prefix
            is kept) or ``self_speculative`` (LayerSkip, Elhoushi et al. ACL 2024: ``num_draft_tokens``
            drafts from layer ``draft_layer`` and its exit head, verified in one pass through layers
            ``draft_layer+1..L`` that reuses the drafts' hidden states and KV) or ``layer_skip`` (SWIFT,
            Xia et al. 2024: drafts from the whole model minus the layers ``skip_layers``, then the
            final norm and LM head; no exit layers needed). Requests may pick their own mode. See
            :mod:`cluster.model.speculative`.
        draft_layer: ``self_speculative``: the layer count whose exit head drafts (default: the first
            exit layer; with ``head='trained'`` it must be one of ``exit_layers``).
        skip_layers: ``layer_skip``: the model's default skip set (1-based decoder layers, each below
            the last; e.g. written by a calibration search); ``()``: the rule of
            :func:`cluster.request.default_skip_layers` (every other layer of the middle half).
        skip_selection: ``layer_skip``: ``static`` keeps the skip set; ``online`` re-chooses a set of
            the same size during decoding from the verified tokens' hidden states (CLaSp, Chen et al.
            ACL 2025; :mod:`cluster.model.skip_select`), never the first or the last layer.
        num_draft_tokens: drafts per verification (``self_speculative``: exactly this many, fewer only
            near ``max_tokens``; ``verified``: at most this many).
        draft_vocab: drafts use the FR-Spec reduced-vocabulary LM head (Zhao et al., arXiv 2502.14856)
            when ``heads_path`` holds one (``frspec.token_ids``, written by ``eeserve train-exits``):
            a draft then reads ``N / V`` of the LM head (verification always uses the full head).
        adaptive_drafts: the lossless modes draft only while their measured acceptance pays for the
            drafts by a cost model (:mod:`cluster.core.draft_control`): ``self_speculative`` picks 0 to
            ``num_draft_tokens`` drafts, ``verified`` drafts or decodes at full depth, so neither is
            slower than the full model on a model whose early layers predict badly (probes after 32
            steps, backing off to 512, keep the estimate fresh); False: always draft (LayerSkip's fixed setting).
        spec_max_batch: speculation runs only while at most this many sequences decode in the
            iteration; larger batches decode at full depth without drafts (vLLM's
            ``speculative_disable_by_batch_size``). Default 1: measured on the default model, drafting
            at batch 4 ran at 0.60x of the full model (the drafting passes of different sequences
            run one after another) against 0.89x at batch 1 (bench/spec.py, before draft control).
    """

    exit_layers: tuple[int, ...] = ()
    head: ExitHeadKind = "shared"
    heads_path: Optional[str] = None
    confidence: ConfidenceMeasure = "max_prob"
    threshold: float = 0.9
    policy: LossyMode = "paper"
    layer_thresholds: Optional[tuple[float, ...]] = None
    mode: Optional[DefaultMode] = None
    draft_layer: Optional[int] = None
    num_draft_tokens: int = 4
    spec_max_batch: int = 1
    draft_vocab: bool = True
    adaptive_drafts: bool = True
    skip_layers: tuple[int, ...] = ()
    skip_selection: SkipSelection = "static"

    def __post_init__(self):
        if self.skip_selection not in SKIP_SELECTIONS:
            raise ValueError(f"skip_selection must be one of {SKIP_SELECTIONS}, got {self.skip_selection!r}")
        if self.mode is not None and self.mode not in DEFAULT_MODES:
            raise ValueError(f"mode must be one of {DEFAULT_MODES}, got {self.mode!r}")
        if self.mode in LOSSY_MODES:
            object.__setattr__(self, "policy", self.mode)
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if self.spec_max_batch < 0:
            raise ValueError(f"spec_max_batch must be >= 0, got {self.spec_max_batch}")
        if self.mode == "verified" and not self.exit_layers:
            raise ValueError("mode='verified' needs exit_layers (drafts come from confident exits)")
        if self.draft_layer is not None and self.draft_layer < 1:
            raise ValueError(f"draft_layer must be >= 1, got {self.draft_layer}")
        if (self.draft_layer is not None and self.head == "trained"
                and self.draft_layer not in self.exit_layers):
            raise ValueError(f"draft_layer {self.draft_layer}: with head='trained' it must be one of "
                             f"exit_layers {self.exit_layers} (the layers that have a trained head)")
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        if list(self.skip_layers) != sorted(set(self.skip_layers)) or any(l < 1 for l in self.skip_layers):
            raise ValueError(f"skip_layers must be strictly increasing layer numbers >= 1, got {self.skip_layers}")
        if self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {self.confidence!r}")
        if self.head not in ("shared", "trained"):
            raise ValueError(f"head must be 'shared' or 'trained', got {self.head!r}")
        if self.policy not in LOSSY_MODES:
            raise ValueError(f"policy must be one of {LOSSY_MODES}, got {self.policy!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if list(self.exit_layers) != sorted(set(self.exit_layers)) or any(l < 1 for l in self.exit_layers):
            raise ValueError(f"exit_layers must be strictly increasing layer counts >= 1, got {self.exit_layers}")
        if self.head == "trained" and not self.heads_path:
            raise ValueError("heads_path is required when head='trained'")
        if self.confidence == "classifier" and self.head != "trained":
            raise ValueError("confidence='classifier' requires head='trained' (classifiers live in heads_path)")
        if self.layer_thresholds is not None:
            if len(self.layer_thresholds) != len(self.exit_layers):
                raise ValueError(f"layer_thresholds must have one value per exit layer ({len(self.exit_layers)}), "
                                 f"got {len(self.layer_thresholds)}")
            if any(not 0.0 <= t <= 1.0 for t in self.layer_thresholds):
                raise ValueError(f"layer_thresholds must lie in [0, 1], got {self.layer_thresholds}")

    @property
    def is_lossless(self) -> bool:
        return self.mode in LOSSLESS_MODES

    @property
    def default_draft_layer(self) -> Optional[int]:
        """``draft_layer``, else the first exit layer (None without exit layers)."""
        if self.draft_layer is not None:
            return self.draft_layer
        return self.exit_layers[0] if self.exit_layers else None

    def threshold_for(self, layer: int) -> float:
        """The default confidence threshold at exit layer ``layer`` (per-layer if calibrated)."""
        if self.layer_thresholds is None:
            return self.threshold
        return self.layer_thresholds[self.exit_layers.index(layer)]

    def validate_for(self, num_layers: int) -> None:
        """Raises ValueError if an exit layer, the draft layer or a skipped layer is not below ``num_layers``."""
        bad = [l for l in self.exit_layers if l >= num_layers]
        if bad:
            raise ValueError(f"exit_layers {bad} must be < num_layers ({num_layers})")
        if self.draft_layer is not None and self.draft_layer >= num_layers:
            raise ValueError(f"draft_layer {self.draft_layer} must be < num_layers ({num_layers})")
        if self.skip_layers and self.skip_layers[-1] >= num_layers:
            raise ValueError(f"skip_layers {list(self.skip_layers)} must be < num_layers ({num_layers}): the last "
                             "layer is never skipped")

    @classmethod
    def default_for(cls, num_layers: int, **overrides) -> "ExitConfig":
        """Exit points every quarter of the depth (e.g. 30 layers -> 8, 15, 23)."""
        layers = tuple(sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)} - {num_layers}))
        return cls(exit_layers=layers, **overrides)
