"""What the training loop does across DDP ranks: the global batch, loss-parameter gradients, logged metrics.

Gradient-scale convention (open_clip's ``gather_with_grad``): with ``scaling.gather_global_batch`` the
embeddings are all-gathered *with* gradients (the backward sums every rank's gradient of each slice), so after
DDP's averaging every gradient -- model and loss parameters -- equals that of one process computing the loss on
the concatenated batch (scale 1). With ``scaling.local_loss`` each rank computes the loss only for its own query
rows (see ``methods.EmbeddingBatch.query_rows``); the families average so that the mean over ranks of the local
losses is the global loss, which keeps the scale at 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """(W * B, ...) concatenation of every rank's (B, ...) tensor; backward: this rank's slice of the sum over
    ranks of the incoming gradients (every rank's loss depends on every slice)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows, ctx.rank, ctx.world = t.shape[0], rank, world
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":  # half the traffic of all_reduce; gloo has no reduce_scatter
            out = grad.new_empty((ctx.rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (B, ...) concatenated in rank order, (W * B, ...), differentiable (scale 1 after DDP)."""
    if not is_distributed():
        return t
    return _AllGatherWithGrad.apply(t)


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (B, ...) concatenated in rank order, without gradients (ids, labels)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, dim=0)


def local_rows(batch_size: int) -> slice:
    """This rank's rows of a gathered batch (every rank holds ``batch_size`` rows)."""
    rank = dist.get_rank() if is_distributed() else 0
    return slice(rank * batch_size, (rank + 1) * batch_size)


def global_batch(
    emb: dict[str, torch.Tensor], image_ids: torch.Tensor, caption_ids: torch.Tensor, *, gather: bool, local_loss: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, slice | None]:
    """What the loss sees: this rank's batch, or (``gather``) the gathered one with the rows it computes.

    Returns ``(emb, image_ids, caption_ids, query_rows)``; ``query_rows`` is None unless ``local_loss`` and
    ``gather`` (then it is this rank's rows of the gathered batch).
    """
    if not gather or not is_distributed():
        return emb, image_ids, caption_ids, None
    rows = local_rows(image_ids.shape[0]) if local_loss else None
    gathered = {k: gather_with_grad(v) for k, v in emb.items()}
    return gathered, gather_no_grad(image_ids), gather_no_grad(caption_ids), rows


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` (those that have one) over ranks, in one all-reduce.

    For the parameters DDP does not own (the loss family's temperatures): every rank then steps them alike.
    A parameter without a gradient (a temperature of a term weighted 0) has none on any rank and is left so.
    """
    if not is_distributed():
        return
    grads = [g for g in (p.grad for p in params) if g is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


class MetricSums:
    """Per-step scalars summed on the device; ``means()`` averages them over steps and ranks (one all-reduce).

    No host sync per step: ``add`` only adds detached tensors to a device vector.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.total: torch.Tensor | None = None
        self.steps = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one step's scalars (the same names every step)."""
        if self.total is None:
            self.names = list(values)
            self.total = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        elif list(values) != self.names:
            raise ValueError(f"metric names changed within an epoch: {self.names} -> {list(values)}")
        self.total += torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in self.names])
        self.steps += 1

    def means(self, snapshot: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Mean per step, averaged over ranks (every rank takes the same number of steps), in one all-reduce.

        ``snapshot``: point values (e.g. the temperatures now) averaged over ranks in the same all-reduce, so a
        logged value that differs from rank 0's checkpoint shows that the ranks drifted apart.
        """
        snapshot = snapshot or {}
        names = self.names + list(snapshot)
        values = [] if self.total is None else [self.total / max(self.steps, 1)]
        if snapshot:
            values.append(
                torch.stack([v.detach().reshape(()).to(self.device, torch.float64) for v in snapshot.values()])
            )
        if not values:
            return {}
        total = torch.cat(values)
        if is_distributed():
            dist.all_reduce(total)
            total /= dist.get_world_size()
        return dict(zip(names, total.tolist()))
