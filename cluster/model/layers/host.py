"""Host -> device copies of small metadata without a stream sync."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def host_to_device(data, dtype, device) -> "torch.Tensor":
    """A host list (or numpy array) as a tensor on ``device``: pinned + non-blocking copy on CUDA, so
    no stream sync (a plain blocking ``.to("cuda")`` waits for the queued kernels)."""
    import torch

    t = torch.tensor(data, dtype=dtype, device="cpu")
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
