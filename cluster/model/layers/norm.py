"""RMSNorm (Zhang & Sennrich 2019) as in Hugging Face Llama: computed in float32, cast back."""
import torch
from torch import nn

from cluster.model.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """``[..., hidden] -> [..., hidden]``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same = x.dtype == torch.float32  # float32 input: no casts (each is one dispatched op per call)
        h = x if same else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if same else h.to(x.dtype))
