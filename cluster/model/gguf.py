"""GGUF checkpoints read in place: tensors memory-mapped from the file, no float copy on disk.

:func:`write_tensor_table` runs once per GGUF (under the loader's cache lock): it maps every GGUF
tensor to its Hugging Face name and records its type, shape, byte offset in the file and the row
order llama.cpp stored it in, all through transformers' own GGUF code (``get_gguf_hf_weights_map``
and the architecture's ``TensorProcessor``, so names and the attn_q / attn_k row permutation are
exactly what ``load_gguf_checkpoint`` would produce). The table is a small JSON file; parsing a
GGUF's metadata with ``gguf.GGUFReader`` takes seconds (the tokenizer arrays), so the ranks read the
table and ``np.memmap`` the file instead.

:class:`GGUFCheckpoint` then hands out lazy per-tensor slices, as safetensors' ``get_slice`` does
(each rank reads only its tensor-parallel shard):

* :meth:`GGUFCheckpoint.tensor`: dequantized float32 (``gguf.quants.dequantize``, any type gguf-py
  knows), only the requested rows / block-aligned columns;
* :meth:`GGUFCheckpoint.blocks`: the raw blocks ``[N, K / 32, bytes]`` uint8 of a Q4_0 / Q4_1 tensor,
  which :func:`int4_from_blocks` turns into :class:`~cluster.model.layers.quant.Int4Weight` codes
  for the int4 kernel with no requantization.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cluster.model.layers.quant import Int4Weight

TABLE_FILE = "gguf_tensors.json"
TABLE_VERSION = 1
Q4_0, Q4_1, Q8_0 = 2, 3, 8  # GGMLQuantizationType values
BLOCK = 32
DEQUANT_CHUNK_BYTES = 4 << 20  # GGUF bytes dequantized at once (float tensors are read in row chunks of this)
INT4_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20}  # blocks of 32 codes in [0, 15]: the int4 kernel's groups of 32
INT4_BLOCK_TYPES = tuple(INT4_BLOCK_BYTES)


def is_gguf_dir(model_dir: str) -> bool:
    return os.path.exists(os.path.join(model_dir, TABLE_FILE))


def reverse_permute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's attn_q / attn_k permutation (transformers'
    ``LlamaTensorProcessor._reverse_permute_weights``): ``[rows]`` source row ids."""
    ids = np.arange(rows)
    return ids.reshape(n_head, rows // n_head // 2, 2).swapaxes(2, 1).reshape(rows)


def write_tensor_table(gguf_path: Path, hf_config, out_dir: Path) -> None:
    """Write ``out_dir/gguf_tensors.json``: HF name -> GGUF name, type, shape, offset, row permutation.

    Raises:
        ValueError: the architecture's tensor processor does more than permute rows (not a llama-family
            GGUF), or two GGUF tensors map to one HF name.
    """
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          read_field)

    reader = GGUFReader(str(gguf_path))
    arch = read_field(reader, "general.architecture")[0]
    parsed_config = hf_config.to_dict()  # the keys load_gguf_checkpoint parses (num_attention_heads, ...)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed_config)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    name_map = get_gguf_hf_weights_map(hf_model, processor)
    heads = {hf_config.num_attention_heads,
             getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads}
    table = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]  # numpy order: [N, K] (or [K])
        rows = shape[0] if len(shape) == 2 else 1
        # probe the processor with row ids: what it does to a [rows, 1] array is the row order it applies
        probe = processor.process(weights=np.arange(rows).reshape(rows, 1), name=t.name, tensor_key_mapping=name_map,
                                  parsed_parameters={"tensors": {}, "config": parsed_config})
        if probe.name not in name_map:
            continue
        order = np.asarray(probe.weights).reshape(-1)
        permute = None
        if not np.array_equal(order, np.arange(rows)):
            permute = next((h for h in sorted(heads) if rows % (2 * h) == 0
                            and np.array_equal(order, reverse_permute_rows(rows, h))), None)
            if permute is None:
                raise ValueError(f"model: GGUF tensor {t.name!r} of architecture {arch!r} is transformed in a way "
                                 "eeserve cannot read in place (only llama-family GGUFs are supported)")
        hf = name_map[probe.name]
        if hf in table:
            raise ValueError(f"model: GGUF tensors {table[hf]['gguf_name']!r} and {t.name!r} both map to {hf!r}")
        table[hf] = {"gguf_name": t.name, "type": int(t.tensor_type), "shape": shape, "offset": int(t.data_offset),
                     "nbytes": int(t.n_bytes), "permute_heads": permute}
    meta = {"version": TABLE_VERSION, "gguf": str(gguf_path.resolve()), "size": gguf_path.stat().st_size,
            "tensors": table}
    (out_dir / TABLE_FILE).write_text(json.dumps(meta, indent=0))


class GGUFTensorSlice:
    """One GGUF tensor in HF layout (rows un-permuted), read lazily: ``get_shape()`` and ``[index]``
    with basic slices, like safetensors' ``get_slice``.

    ``blocks=False``: float32 values, shape ``[N, K]`` or ``[K]``. ``blocks=True`` (2-D tensors only):
    the raw uint8 blocks ``[N, K / block_size, type_size]``.
    """

    def __init__(self, raw: np.ndarray, qtype: int, shape: list[int], row_order: Optional[np.ndarray], blocks: bool):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.qtype = GGMLQuantizationType(qtype)
        self.block_size, self.type_size = GGML_QUANT_SIZES[self.qtype]
        self.shape = list(shape)
        self.raw = raw.reshape(shape[0] if len(shape) == 2 else 1, -1)  # [N, row bytes]
        self.row_order, self.as_blocks = row_order, blocks

    def get_shape(self) -> list[int]:
        if self.as_blocks:
            n, k = self.shape
            return [n, k // self.block_size, self.type_size]
        return list(self.shape)

    def _rows(self, index: slice) -> np.ndarray:
        if self.row_order is None:
            return self.raw[index]
        return self.raw[self.row_order[index]]  # fancy indexing: copies just these rows

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (len(self.get_shape()) - len(index))
        if len(self.shape) == 1:
            return torch.from_numpy(self._dequantize(self.raw).reshape(-1)[index[0]].copy())
        raw = self._rows(index[0])
        if self.as_blocks:
            blocks = raw.reshape(raw.shape[0], -1, self.type_size)[:, index[1], index[2]]
            return torch.from_numpy(np.array(blocks))
        cols = index[1]
        start, stop, step = cols.indices(self.shape[1])
        if step == 1 and start % self.block_size == 0 and stop % self.block_size == 0:  # only these blocks
            raw = raw[:, start // self.block_size * self.type_size: stop // self.block_size * self.type_size]
            cols = slice(None)
        return torch.from_numpy(np.ascontiguousarray(self._dequantize(raw)[:, cols]))

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        """``[n, row bytes]`` -> ``[n, cols]`` float32, in chunks of rows (gguf-py's temporaries are
        several times a chunk's size, so a whole embedding at once would double the peak memory)."""
        from gguf.quants import dequantize

        cols = raw.shape[1] // self.type_size * self.block_size
        out = np.empty((raw.shape[0], cols), dtype=np.float32)
        step = max(1, DEQUANT_CHUNK_BYTES // max(1, raw.shape[1]))
        for i in range(0, raw.shape[0], step):
            out[i:i + step] = dequantize(np.ascontiguousarray(raw[i:i + step]), self.qtype)
        return out


class GGUFCheckpoint:
    """The tensors of a GGUF-backed model directory (see :func:`write_tensor_table`), memory-mapped.

    Raises:
        FileNotFoundError: the GGUF the table was written from is gone or changed size.
    """

    def __init__(self, model_dir: str):
        meta = json.loads(Path(model_dir, TABLE_FILE).read_text())
        path = meta["gguf"]
        if not os.path.exists(path) or os.path.getsize(path) != meta["size"]:
            raise FileNotFoundError(f"model: GGUF {path!r} behind {model_dir!r} is missing or changed; "
                                    "delete the directory to convert again")
        self.path, self.table = path, meta["tensors"]
        self._file = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.table)

    def tensor_type(self, name: str) -> int:
        """The GGMLQuantizationType value of tensor ``name`` (e.g. 3 = Q4_1)."""
        return self.table[name]["type"]

    def _slice(self, name: str, blocks: bool) -> GGUFTensorSlice:
        e = self.table[name]
        raw = self._file[e["offset"]: e["offset"] + e["nbytes"]]
        order = reverse_permute_rows(e["shape"][0], e["permute_heads"]) if e["permute_heads"] else None
        return GGUFTensorSlice(raw, e["type"], e["shape"], order, blocks)

    def tensor(self, name: str) -> GGUFTensorSlice:
        """Lazy float32 view of HF tensor ``name`` (``[N, K]`` or ``[K]``)."""
        return self._slice(name, blocks=False)

    def blocks(self, name: str) -> GGUFTensorSlice:
        """Lazy raw-block view ``[N, K / 32, type_size]`` uint8 of a 2-D block-quantized tensor."""
        return self._slice(name, blocks=True)


def int4_from_blocks(blocks: torch.Tensor, qtype: int) -> Int4Weight:
    """Decode Q4_0 / Q4_1 blocks ``[N, G, 18 | 20]`` uint8 into int4 codes with groups of 32, on ``blocks``' device.

    A block stores float16 ``d`` (Q4_1: then float16 ``m``) and 16 bytes of nibbles, the low nibbles
    being the first 16 values. Q4_1 ``w = d * q + m`` is ``(q - 8) * d + (m + 8 d)``; Q4_0 ``w = d * (q - 8)``
    is ``(q - 8) * d + 0``: the codes are kept as they are, scale = ``d``, zero = ``m + 8 d`` (Q4_1) or 0.

    Raises:
        ValueError: ``qtype`` is not Q4_0 or Q4_1.
    """
    if qtype not in INT4_BLOCK_TYPES:
        raise ValueError(f"int4 blocks: GGML type {qtype} is not Q4_0 or Q4_1")
    n, g, _ = blocks.shape
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()[..., 0]  # [N, G]
    if qtype == Q4_1:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
        zeros, qs = m + 8.0 * d, blocks[..., 4:]
    else:
        zeros, qs = torch.zeros_like(d), blocks[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [N, G, 32]
    return Int4Weight(q.reshape(n, g * BLOCK), d, zeros)


def checkpoint_quantization(model_dir: str) -> str:
    """The weight-only quantization that keeps a GGUF-backed model's own precision: ``int4`` when every
    decoder projection is stored in 4 bits or fewer (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K, IQ*), ``int8`` when
    every one fits 8 bits (Q5*, Q6_K, Q8*), ``none`` for float checkpoints (safetensors, F32/F16/BF16)
    and anything else. What ``quantization="auto"`` picks on the CPU."""
    if not is_gguf_dir(model_dir):
        return "none"
    from gguf import GGMLQuantizationType

    table = json.loads(Path(model_dir, TABLE_FILE).read_text())["tensors"]
    names = {GGMLQuantizationType(e["type"]).name for n, e in table.items()
             if n.startswith("model.layers.") and n.endswith("proj.weight")}
    if not names:
        return "none"
    if all(t.startswith(("Q2", "Q3", "Q4", "IQ")) for t in names):
        return "int4"
    if all(t.startswith(("Q2", "Q3", "Q4", "IQ", "Q5", "Q6", "Q8")) for t in names):
        return "int8"
    return "none"
