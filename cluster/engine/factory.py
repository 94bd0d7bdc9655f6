"""Building an engine from user-level arguments: model directory, tokenizer, exit config lookup.

Shared by the offline :class:`cluster.llm.LLM`, the CLI and the Serve replica. The model's own exit
config is ``exit_config.json`` in its directory, else shipped heads in ``cluster/assets`` matched by
a weight fingerprint (:func:`model_fingerprint`), else exits at 1/4, 1/2 and 3/4 of the depth.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Union

from cluster.config import (DTYPE_CHOICES, QUANT_CHOICES, CacheConfig, ExitConfig, ModelConfig, ParallelConfig, SchedulerConfig,
                            resolve_dtype)
from cluster.engine.engine import LLMEngine

MODEL_DEFAULT = "model-default"  # sentinel: the model's own exit config
EXIT_CONFIG_FILE = "exit_config.json"


ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
FINGERPRINT_TENSORS = ("model.embed_tokens.weight", "model.norm.weight")


def model_fingerprint(model_dir: str) -> str:
    """Identity of a model's weights: ``sha256`` over its architecture and a few weight slices.

    Reads only small memory-mapped slices (no full load), converted to float32 so a checkpoint's
    storage dtype does not matter. Used to match shipped exit heads to a model.
    """
    from cluster.model.loader import load_hf_config, read_tensor_rows

    mc = ModelConfig.from_hf_config(load_hf_config(model_dir))
    h = hashlib.sha256(json.dumps([mc.model_type, mc.vocab_size, mc.hidden_size, mc.intermediate_size,
                                   mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim]).encode())
    names = (*FINGERPRINT_TENSORS, f"model.layers.{mc.num_layers - 1}.mlp.down_proj.weight")
    found = read_tensor_rows(model_dir, names, 8)  # safetensors or GGUF-backed: the same float32 values
    for name in names:
        if name in found:
            h.update(name.encode() + found[name].contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:24]


def read_exit_config(path: str) -> ExitConfig:
    """An ``exit_config.json``: ExitConfig fields (others, e.g. calibration notes, are ignored);
    a relative ``heads_path`` is relative to the file's directory."""
    with open(path) as f:
        data = json.load(f)
    fields = {f.name for f in dataclasses.fields(ExitConfig)}
    data = {k: v for k, v in data.items() if k in fields}
    data["exit_layers"] = tuple(data.get("exit_layers", ()))
    if data.get("layer_thresholds") is not None:
        data["layer_thresholds"] = tuple(float(t) for t in data["layer_thresholds"])
    if data.get("heads_path") and not os.path.isabs(data["heads_path"]):
        data["heads_path"] = os.path.join(os.path.dirname(os.path.abspath(path)), data["heads_path"])
    return ExitConfig(**data)


def shipped_exit_config_path(model_dir: str) -> Optional[str]:
    """The ``cluster/assets/*exit_config.json`` whose ``model_fingerprint`` matches the model, if any."""
    if not os.path.isdir(ASSETS_DIR):
        return None
    cands = []
    for name in sorted(os.listdir(ASSETS_DIR)):
        if name.endswith(EXIT_CONFIG_FILE):
            try:
                with open(os.path.join(ASSETS_DIR, name)) as f:
                    fp = json.load(f).get("model_fingerprint")
            except (OSError, ValueError):
                continue
            if fp:
                cands.append((fp, os.path.join(ASSETS_DIR, name)))
    if not cands:
        return None
    mine = model_fingerprint(model_dir)
    return next((p for fp, p in cands if fp == mine), None)


def model_exit_config_path(model_dir: str) -> Optional[str]:
    """Where the model's own exit config lives: ``exit_config.json`` in its directory, else shipped
    heads in ``cluster/assets`` matched by fingerprint; None if neither."""
    path = os.path.join(model_dir, EXIT_CONFIG_FILE)
    return path if os.path.exists(path) else shipped_exit_config_path(model_dir)


def model_exit_config(model_dir: str, num_layers: int) -> ExitConfig:
    """The model's own exit config (see :func:`model_exit_config_path`), else exits at 1/4, 1/2, 3/4."""
    path = model_exit_config_path(model_dir)
    if path is not None:
        return read_exit_config(path)
    return ExitConfig.default_for(num_layers)


def model_exit_config_with(model: Optional[str], **overrides) -> ExitConfig:
    """The model's own exit config (:func:`model_exit_config`) with ``overrides`` (ExitConfig fields
    whose value is not None, e.g. ``mode``, ``draft_layer``, ``num_draft_tokens``) replaced.

    Raises:
        ValueError: the replaced config is invalid (e.g. ``mode='verified'`` without exit layers, a
            ``draft_layer`` or a ``skip_layers`` layer not below the model's depth).
    """
    from cluster.model.loader import load_hf_config, resolve_model_dir

    model_dir = resolve_model_dir(model)
    num_layers = ModelConfig.from_hf_config(load_hf_config(model_dir)).num_layers
    ec = model_exit_config(model_dir, num_layers)
    changes = {k: v for k, v in overrides.items() if v is not None}
    ec = dataclasses.replace(ec, **changes) if changes else ec
    if ec.draft_layer is not None and ec.draft_layer >= num_layers:
        raise ValueError(f"draft_layer: must be in [1, {num_layers - 1}] for this {num_layers}-layer model, "
                         f"got {ec.draft_layer}")
    if ec.skip_layers and ec.skip_layers[-1] >= num_layers:
        raise ValueError(f"skip_layers: each must be in [1, {num_layers - 1}] for this {num_layers}-layer model "
                         f"(the last layer is never skipped), got {list(ec.skip_layers)}")
    return ec


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def resolve_quantization(quantization: str, model_dir: str, device: str) -> str:
    """``auto`` -> ``int4`` / ``int8`` / ``none`` (other values pass through).

    Measured on this project's CPUs (bench/speed.py, bench/quant.py; AVX-512 and AVX2 machines): the
    int4 and int8 weight-only kernels make batch-1 decode 3-4x faster than float32 and batch 16 about
    2x, and on a Q4 GGUF int4 reproduces the file's own weights exactly (the float32 model is only their
    dequantized copy). So on the CPU ``auto`` keeps the checkpoint's precision
    (:func:`cluster.model.gguf.checkpoint_quantization`): int4 for Q4 GGUFs (the default model), int8
    for Q5-Q8 GGUFs, none for float checkpoints. On CUDA it is ``none`` (bfloat16 dense GEMMs; the
    int4 CUDA path has not run on hardware here).
    """
    if quantization != "auto":
        return quantization
    if str(device).startswith("cuda"):
        return "none"
    from cluster.model.gguf import checkpoint_quantization

    return checkpoint_quantization(model_dir)


def resolve_torch_compile(torch_compile: Union[bool, str], device: str, tensor_parallel_size: int) -> bool:
    """``auto`` -> whether to compile (True / False pass through).

    ``auto`` is on for the CPU at tensor-parallel size 1, off on CUDA and under tensor parallelism:
    on the CPU the compiled decode step measured 1.3-1.4x the eager one at batch 1 and 1.2-1.3x at
    batch 16 (``bench/compile_step.py``, README "Performance"); with Inductor's CPU GEMM templates
    (:func:`cluster.model.compile.inductor_options`) the int4 step at batch 16 / 32 is a further 1.18 /
    1.19x, for about 160 s of compilation and autotuning at the first start on a machine (about 90 s
    without the templates) and less at later starts (Inductor's cache under
    ``$EESERVE_CACHE_DIR/inductor``); CUDA graphs and the tensor-parallel all-reduce inside graphs are
    not measured yet. The environment variable ``EESERVE_TORCH_COMPILE`` (``0`` / ``1``) overrides
    ``auto`` (the test suite sets ``0``).

    Raises:
        ValueError: not a bool or ``auto``.
    """
    if isinstance(torch_compile, bool):
        return torch_compile
    if torch_compile != "auto":
        raise ValueError(f"torch_compile: must be true, false or 'auto', got {torch_compile!r}")
    env = os.environ.get("EESERVE_TORCH_COMPILE", "").strip().lower()
    if env:
        return env not in ("0", "false", "off", "no")
    return not str(device).startswith("cuda") and tensor_parallel_size == 1


def create_engine(model: Optional[str] = None, tensor_parallel_size: int = 1,
                  early_exit: Union[ExitConfig, None, str] = MODEL_DEFAULT, dtype: str = "auto",
                  max_model_len: Optional[int] = None, block_size: int = 16, num_blocks: Optional[int] = None,
                  kv_cache_memory_bytes: int = 1 << 30, enable_prefix_caching: bool = True,
                  max_num_seqs: int = 32, max_num_batched_tokens: int = 2048, device: str = "cpu",
                  gpu_memory_utilization: float = 0.9, debug_default_device: Optional[str] = None,
                  quantization: str = "auto", quant_group_size: int = 32,
                  torch_compile: Union[bool, str] = "auto", dense_prefill: bool = False,
                  **worker_kwargs) -> LLMEngine:
    """Build an :class:`LLMEngine` from user-level arguments (shared by LLM and the Serve replica).

    ``dtype``: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
    ``device``: ``cpu``, ``cuda`` or ``cuda:N``. KV cache size: ``num_blocks`` if given; else on CUDA
    what ``gpu_memory_utilization`` (fraction of the GPU's total memory this engine may use) leaves
    after the weights and the activation peak; on CPU ``kv_cache_memory_bytes``.
    ``debug_default_device`` (tests): see :class:`~cluster.config.ParallelConfig`.
    ``quantization``: ``auto`` (the default: on the CPU the checkpoint's own precision, so a Q4 GGUF such
    as the default model runs ``int4`` on its own 4-bit weights and a float checkpoint ``none``; on CUDA
    ``none``; see :func:`resolve_quantization`), ``none``, ``int8`` (weight-only, per-output-channel scales) or ``int4``
    (weight-only, asymmetric groups of ``quant_group_size`` input features; the LM head int8) for every
    linear layer of the decoder and the LM head; each tensor-parallel rank quantizes its own shard
    after loading. Trained exit heads' small adapters and exit classifiers stay float.
    ``torch_compile``: ``auto`` (the default, :func:`resolve_torch_compile`), True or False: run
    decode iterations as compiled graphs, other iterations eagerly (:mod:`cluster.model.compile`;
    start-up pays the compilation once per machine, outputs may differ in the last bits).
    ``dense_prefill`` (opt-in): quantized layers also keep a dense bfloat16 copy (2 bytes per weight)
    that prompt tokens multiply by, decode tokens never (:func:`~cluster.model.layers.quant.dense_rows_from`:
    the int4 / int8 kernels are 10-17x slower than a bfloat16 GEMM at hundreds of rows on the CPU).
    Off by default: a dense GEMM's rows depend on how many rows it multiplies, so a prompt's K/V (and
    a greedy answer, at a near-tie) then depend on how the prompt was split: a prefix-cache hit
    prefills a shorter tail than the first request did (measured: the default model's Chinese answer
    in ``tests/test_serve_clients.py`` changed between two identical requests).

    Raises:
        FileNotFoundError: unknown model path. ValueError: unsupported architecture, bad dtype or quantization,
        head counts not divisible by ``tensor_parallel_size``, an invalid exit config, or no room for
        the KV cache on the device.
    """
    from cluster.model.loader import DTYPES, load_hf_config, resolve_model_dir

    if dtype not in DTYPE_CHOICES or (dtype != "auto" and dtype not in DTYPES):
        raise ValueError(f"dtype: must be one of {sorted(DTYPE_CHOICES)}, got {dtype!r}")
    if quantization != "auto" and quantization not in QUANT_CHOICES:
        raise ValueError(f"quantization: must be one of {['auto', *QUANT_CHOICES]}, got {quantization!r}")
    dtype = resolve_dtype(dtype, device)
    model_dir = resolve_model_dir(model)
    quantization = resolve_quantization(quantization, model_dir, device)
    torch_compile = resolve_torch_compile(torch_compile, device, tensor_parallel_size)
    if not isinstance(dense_prefill, bool):
        raise ValueError(f"dense_prefill: must be true or false, got {dense_prefill!r}")
    model_config = ModelConfig.from_hf_config(load_hf_config(model_dir), dtype=dtype, max_model_len=max_model_len,
                                              quantization=quantization, quant_group_size=quant_group_size,
                                              torch_compile=torch_compile, dense_prefill=dense_prefill)
    for what, n in (("num_attention_heads", model_config.num_heads), ("num_key_value_heads", model_config.num_kv_heads)):
        if n % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size: {what} ({n}) is not divisible by {tensor_parallel_size}")
    exit_config = model_exit_config(model_dir, model_config.num_layers) if early_exit == MODEL_DEFAULT else early_exit
    return LLMEngine(
        model_dir, load_tokenizer(model_dir), model_config,
        CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_memory_bytes=kv_cache_memory_bytes,
                    enable_prefix_caching=enable_prefix_caching, gpu_memory_utilization=gpu_memory_utilization),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=model_config.max_model_len),
        ParallelConfig(tensor_parallel_size=tensor_parallel_size, device=device,
                       debug_default_device=debug_default_device),
        exit_config, **worker_kwargs)
