"""All-gather across DDP ranks with gradients flowing to the local slice (open_clip's ``gather_features``)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_local_grad(t: torch.Tensor) -> torch.Tensor:
    """(world * B, ...) concatenation of every rank's ``t`` (B, ...); only this rank's slice carries gradients."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts, dim=0)
