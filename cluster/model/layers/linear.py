"""Tensor-parallel linear layers (Megatron-LM column/row split, as in nano-vllm and vLLM).

Every parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that copies only this
rank's shard. ``loaded`` may be a torch tensor or a lazy safetensors slice (so each rank reads only
its shard from a memory-mapped file); :func:`narrow` handles both. Every layer multiplies through
:meth:`~cluster.model.layers.quant.QuantizableLinear.matmul`: the float weight, or after
``quantize_`` (int8 / int4 weight-only, each rank its own shard) PyTorch's packed kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cluster.distributed import all_reduce, tp_rank, tp_size
from cluster.model.layers.quant import QuantizableLinear, QuantizedWeight


def shape_of(loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def narrow(loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """``loaded[..., start:start+length, ...]`` along ``dim`` for a tensor or safetensors slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = tuple([slice(None)] * dim + [slice(start, start + length)])
    return loaded[index]


def materialize(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    w = materialize(loaded)
    if tuple(w.shape) != tuple(param.shape):
        raise ValueError(f"weight shape {tuple(w.shape)} does not match parameter {tuple(param.shape)}")
    param.data.copy_(w)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) must be divisible by tensor_parallel_size ({d})")
    return n // d


class ReplicatedLinear(QuantizableLinear):
    """A linear layer held whole on every rank. weight ``[out, in]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(QuantizableLinear):
    """Output dimension split over ranks: ``[T, in] -> [T, out / tp]`` (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.out_local = _divide(out_features, self.tp_size, "output features")
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = param.shape[0]
        param.data.copy_(narrow(loaded, 0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused in one matmul (e.g. gate_proj + up_proj).

    ``shard_id`` is the index of the sub-projection being loaded.
    """

    def __init__(self, in_features: int, out_features_list: list[int], bias: bool = False):
        self.out_features_list = list(out_features_list)
        super().__init__(in_features, sum(out_features_list), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int = 0) -> None:
        local = [o // self.tp_size for o in self.out_features_list]
        offset = sum(local[:shard_id])
        n = local[shard_id]
        param.data.narrow(0, offset, n).copy_(narrow(loaded, 0, self.tp_rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads: ``[T, hidden] -> [T, (H + 2 * KVH) * d / tp]``.

    Raises:
        ValueError: the head counts are not divisible by the tensor-parallel size.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        self.num_kv_heads = _divide(num_kv_heads, tp, "num_key_value_heads")
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str = "q") -> None:
        offset, n = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                     "v": (self.q_size + self.kv_size, self.kv_size)}[shard_id]
        param.data.narrow(0, offset, n).copy_(narrow(loaded, 0, self.tp_rank * n, n))

    def kv_proj(self, x: torch.Tensor) -> torch.Tensor:
        """K and V projections alone (the KV-fill path): ``[T, hidden] -> [T, 2 * KVH_local * d]``
        (K columns, then V)."""
        b = None if self.bias is None else self.bias[self.q_size:]
        kv_q = self._modules.get("kv_qweight")
        if kv_q is not None:
            return kv_q(x) if b is None else kv_q(x) + b
        return F.linear(x, self.weight[self.q_size:], b)

    def kv_only(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`kv_proj` split: ``[T, hidden] -> 2 x [T, KVH_local * d]``."""
        return self.kv_proj(x).split([self.kv_size, self.kv_size], dim=-1)

    def quantize_(self, method: str, group_size: int, keep_float: bool = False, weight=None) -> None:
        """Also quantizes the K/V rows alone for :meth:`kv_only` (packed layouts cannot be row-sliced)."""
        w = self.weight.data if weight is None else weight
        self.kv_qweight = QuantizedWeight.from_float(w[self.q_size:], method, group_size)
        super().quantize_(method, group_size, keep_float, weight)


class RowParallelLinear(QuantizableLinear):
    """Input dimension split over ranks: ``[T, in / tp] -> [T, out]`` with one all-reduce.

    The bias is added once, after the all-reduce.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.in_local = _divide(in_features, self.tp_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias: Optional[nn.Parameter] = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = param.shape[1]
        param.data.copy_(narrow(loaded, 1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.matmul(x))
        return y if self.bias is None else y + self.bias
