"""Weight-only int8 / int4 quantization of linear layers through PyTorch's native kernels.

* ``int8``: symmetric per-output-channel scales, ``w ~= q * scale`` with ``q`` in [-127, 127];
  ``torch.ops.aten._weight_int8pack_mm``.
* ``int4``: asymmetric group-wise scales and zeros along the input dimension, groups of 32 by default
  (tinygemm's convention: ``w ~= (q - 8) * scale + zero`` with ``q`` in [0, 15]; the LM head stays
  int8, see :data:`LM_HEAD_METHOD`); on CPU ``_convert_weight_to_int4pack_for_cpu``
  + ``_weight_int4pack_mm_for_cpu``, on CUDA ``_convert_weight_to_int4pack`` + ``_weight_int4pack_mm``.

The kernels are fast with bfloat16 activations only (float32 activations are 4-10x slower on the
CPU), so :meth:`QuantizedWeight.forward` casts the activations to bfloat16 and the result back to the
caller's dtype. Every tensor-parallel rank quantizes its own shard after loading
(:func:`quantize_model`), so the parallel layers work unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from cluster.config import QUANT_CHOICES

INT4_GROUP_SIZES = (128, 64, 32)  # the kernels' supported group sizes, largest first
ACT_DTYPE = torch.bfloat16
# Prefill rows of the current layer call: rows ``[k, T)`` of a quantized layer's input are prompt
# tokens (``k`` = the decode rows before them), which multiply by the layer's dense copy if it has
# one; None (the default, decode-only calls, compiled graphs, the LM head): every row uses the
# quantized kernel. Set by the decoder layer (:func:`dense_rows_from`). Measured on the CPU (AVX-512 +
# AMX, 2 threads, a [3072, 576] weight): the int4 kernel takes 0.40 / 5.9 / 28.6 ms at 16 / 256 /
# 1166 rows, a bfloat16 GEMM 0.16 / 0.56 / 1.7 ms. Splitting by the rows' kind, not by their count,
# keeps a token's result independent of its batch-mates and of the prefix cache: a prompt token
# always goes through the dense copy, a decode token always through the quantized kernel.
_DENSE_FROM: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("eeserve_dense_from", default=None)


@contextlib.contextmanager
def dense_rows_from(k: int):
    """Within the block, quantized layers with a dense copy multiply input rows ``k ..`` (prompt
    tokens) by it and rows ``.. k`` by their quantized kernel."""
    token = _DENSE_FROM.set(k)
    try:
        yield
    finally:
        _DENSE_FROM.reset(token)


def int4_group_size(in_features: int, preferred: int) -> int:
    """The largest supported group size <= ``preferred`` that divides ``in_features``.

    Raises:
        ValueError: ``in_features`` is not a multiple of 32.
    """
    for g in INT4_GROUP_SIZES:
        if g <= preferred and in_features % g == 0:
            return g
    raise ValueError(f"int4 quantization needs in_features divisible by 32 (got {in_features})")


def quantize_int8(w: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` float -> (``[N, K]`` int8, ``[N]`` float32 scales), symmetric per output channel.

    Computed ``chunk_rows`` rows at a time, so the float temporaries stay small (an LM head is as
    large as the embedding); the result does not depend on the chunking.
    """
    w = w.float()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], chunk_rows):
        wc = w[i:i + chunk_rows]
        s = scales[i:i + chunk_rows]
        torch.div(wc.abs().amax(dim=1).clamp(min=1e-12), 127.0, out=s)
        q[i:i + chunk_rows] = (wc / s[:, None]).round_().clamp_(-127, 127)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, K]`` float -> (``[N, K]`` int32 in [0, 15], ``[N, K/g]`` scales, ``[N, K/g]`` zeros), float32.

    Asymmetric per group of ``group_size`` input features: ``w ~= (q - 8) * scale + zero``.
    """
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    zeros = lo + scales * 8.0
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.int32)
    return q.reshape(n, k), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    qg = q.float().reshape(n, k // group_size, group_size)
    return ((qg - 8.0) * scales.float()[..., None] + zeros.float()[..., None]).reshape(n, k)


@dataclass(frozen=True)
class Int4Weight:
    """Group-wise int4 codes of an ``[N, K]`` matrix, ``w = (q - 8) * scale + zero`` (tinygemm's convention).

    ``q``: ``[N, K]`` integers in [0, 15] (any integer dtype); ``scales``, ``zeros``: ``[N, K / g]``
    float32, ``g`` = :attr:`group_size`. Made by :func:`quantize_int4` or read as is from a GGUF's
    Q4_0 / Q4_1 blocks (:func:`cluster.model.gguf.int4_from_blocks`).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def __getitem__(self, rows: slice) -> "Int4Weight":
        """Rows ``rows`` (a slice of output features) of the matrix."""
        return Int4Weight(self.q[rows], self.scales[rows], self.zeros[rows])

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[N, K]`` matrix."""
        return dequantize_int4(self.q, self.scales, self.zeros, self.group_size)


def _inner_k_tiles(k: int) -> int:
    for t in (8, 4, 2):
        if k % (16 * t) == 0:
            return t
    raise ValueError(f"int4 quantization needs in_features divisible by 32 (got {k})")


class QuantizedWeight(nn.Module):
    """A packed weight-only quantized ``[N, K]`` matrix; ``forward(x) = x @ W.T`` in ``x``'s dtype.

    Built by :meth:`from_float`; :meth:`dequantize` gives the float matrix the kernel multiplies by.
    """

    def __init__(self, method: str, out_features: int, in_features: int, group_size: Optional[int] = None):
        super().__init__()
        self.method, self.out_features, self.in_features, self.group_size = method, out_features, in_features, group_size

    @classmethod
    def from_float(cls, w: Union[torch.Tensor, Int4Weight], method: str, group_size: int = 32) -> "QuantizedWeight":
        """Quantize ``w: [N, K]`` (any float dtype, on its device).

        ``w`` may also be an :class:`Int4Weight` (e.g. a GGUF's Q4 blocks): under ``int4`` with the
        same group size its codes, scales and zeros are packed as they are (:meth:`from_int4`);
        otherwise it is dequantized and quantized again.

        Raises:
            ValueError: unknown method, or ``K`` not divisible by 32 for int4.
        """
        n, k = w.shape
        if method == "int8":
            w = w.dequantize() if isinstance(w, Int4Weight) else w
            self = cls(method, n, k)
            q, scales = quantize_int8(w)
            self.register_buffer("qweight", q.contiguous())
            self.register_buffer("scales", scales.to(ACT_DTYPE))
            return self
        if method != "int4":
            raise ValueError(f"quantization: must be one of {QUANT_CHOICES[1:]}, got {method!r}")
        g = int4_group_size(k, group_size)
        if isinstance(w, Int4Weight) and w.group_size == g:
            return cls.from_int4(w)
        w = w.dequantize() if isinstance(w, Int4Weight) else w
        pad = -n % 16  # the packing wants N divisible by 16: zero rows, sliced off the output
        q, scales, zeros = quantize_int4(F.pad(w, (0, 0, 0, pad)) if pad else w, g)
        return cls._packed_int4(n, Int4Weight(q, scales, zeros))

    @classmethod
    def from_int4(cls, w: Int4Weight) -> "QuantizedWeight":
        """Pack int4 codes as they are (no requantization); the kernel takes scales and zeros in
        bfloat16, so the matrix it multiplies by is ``(q - 8) * bf16(scale) + bf16(zero)``.

        Raises:
            ValueError: ``K`` not divisible by 32 or a group size the kernels lack.
        """
        n, k = w.shape
        if w.group_size not in INT4_GROUP_SIZES or k % w.group_size:
            raise ValueError(f"int4: group size {w.group_size} of a [{n}, {k}] weight is not one of {INT4_GROUP_SIZES}")
        pad = -n % 16  # zero rows (scale 0, zero 0), sliced off the output
        if pad:
            w = Int4Weight(*(F.pad(t, (0, 0, 0, pad)) for t in (w.q, w.scales, w.zeros)))
        return cls._packed_int4(n, w)

    @classmethod
    def _packed_int4(cls, n: int, w: Int4Weight) -> "QuantizedWeight":
        """``w``: rows padded to a multiple of 16; ``n``: the real output features."""
        k, g = w.shape[1], w.group_size
        self = cls("int4", n, k, g)
        q = w.q.to(torch.int32).contiguous()
        # [K/g, N, 2] (scale, zero) pairs, as the kernels take them
        sz = torch.stack([w.scales.t(), w.zeros.t()], dim=-1).contiguous().to(ACT_DTYPE)
        if q.device.type == "cuda":
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), _inner_k_tiles(k))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _inner_k_tiles(k))
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_and_zeros", sz)
        return self

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[N, K]`` matrix this layer multiplies by (dequantized from the kernel's operands)."""
        if self.method == "int8":
            return dequantize_int8(self.qweight, self.scales)
        # recover W from the kernel itself: W.T = mm(I, W.T) (exact up to bfloat16 output rounding)
        eye = torch.eye(self.in_features, dtype=ACT_DTYPE, device=self.qweight.device)
        return self._mm(eye).float().t().contiguous()

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        if self.method == "int8":
            return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        if self.qweight.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        return y if y.shape[-1] == self.out_features else y[:, : self.out_features]

    def add_dense(self) -> None:
        """Keep a dense bfloat16 copy ``[N, K]`` of the matrix (:meth:`dequantize`, the kernel's own
        values) for prompt tokens (``dense_prefill``, :func:`dense_rows_from`): 2 bytes per weight
        more memory, prefill GEMMs at the dense kernels' speed."""
        self.register_buffer("dense", self.dequantize().to(ACT_DTYPE).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the engine's case ([T, in]): no reshapes (each op costs dispatcher time at batch 1)
            dense = self._buffers.get("dense")
            # (compiled decode graphs hold decode rows only: no context lookup, which Dynamo cannot trace)
            k = None if dense is None or torch.compiler.is_compiling() else _DENSE_FROM.get()
            if k is not None and k < x.shape[0]:  # prompt rows [k, T) through the dense copy
                xb = x.to(ACT_DTYPE)
                y = F.linear(xb[k:], dense)
                return (torch.cat([self._mm(xb[:k].contiguous()), y]) if k else y).to(x.dtype)
            return self._mm(x.to(ACT_DTYPE).contiguous()).to(x.dtype)
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, self.in_features).to(ACT_DTYPE).contiguous())
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.method}, out={self.out_features}, in={self.in_features}{g}"


class QuantizableLinear(nn.Module):
    """Mixin of the linear layers: :meth:`matmul` runs ``x @ weight.T (+ bias)`` through the float
    weight or, after :meth:`quantize_`, through its :class:`QuantizedWeight`."""

    is_lm_head = False  # the LM head's method is LM_HEAD_METHOD[method]

    @property
    def quantized(self) -> Optional[QuantizedWeight]:
        return self._modules.get("qweight")

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qw = self._modules.get("qweight")
        if qw is None:
            return F.linear(x, self.weight, bias)
        y = qw(x)
        return y if bias is None else y + bias

    def quantize_(self, method: str, group_size: int, keep_float: bool = False,
                  weight: Optional[Int4Weight] = None) -> None:
        """Replace this rank's float weight shard by its quantized form (the float weight is dropped
        unless ``keep_float``, e.g. an LM head tied to the embedding). ``weight``: this shard's
        int4 codes to pack instead of quantizing the float weight (see :meth:`QuantizedWeight.from_float`)."""
        self.qweight = QuantizedWeight.from_float(self.weight.data if weight is None else weight, method, group_size)
        if not keep_float:
            self.weight = None


# The LM head under each method. int4 keeps an int8 head: measured on SmolLM2-135M (Q4_1 GGUF whose
# embedding/LM head is Q8_0), teacher-forced greedy agreement with float32 over 8 held-out prompts x 32
# tokens: int4 layers + float head 0.992, + int8 head 0.965, + int4 head 0.883 (bench/quant.py).
LM_HEAD_METHOD = {"int8": "int8", "int4": "int8"}


def layer_method(module: QuantizableLinear, method: str) -> str:
    """The method ``module`` gets under the model's ``method``: :data:`LM_HEAD_METHOD` for the LM head."""
    return LM_HEAD_METHOD[method] if module.is_lm_head else method


def add_dense_copies(model: nn.Module) -> int:
    """:meth:`QuantizedWeight.add_dense` for every quantized weight of ``model``; returns the bytes added."""
    added = 0
    for module in model.modules():
        if isinstance(module, QuantizedWeight) and "dense" not in module._buffers:
            module.add_dense()
            added += module.dense.numel() * module.dense.element_size()
    return added


def quantize_model(model: nn.Module, method: str, group_size: int = 32) -> nn.Module:
    """Quantize every :class:`QuantizableLinear` of ``model`` in place (no-op for ``none``).

    The decoder's projections get ``method``, the LM head ``LM_HEAD_METHOD[method]``; the embedding
    lookup stays float (an LM head tied to it keeps the shared float weight for the lookup).
    """
    if method == "none":
        return model
    if method not in QUANT_CHOICES:
        raise ValueError(f"quantization: must be one of {QUANT_CHOICES}, got {method!r}")
    for module in list(model.modules()):
        if isinstance(module, QuantizableLinear) and module.quantized is None:
            module.quantize_(layer_method(module, method), group_size)
    return model
