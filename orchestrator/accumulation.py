"""Gradient accumulation with feature caching (``train.accum_steps``): a loss over B·K pairs, activations of B.

open_clip's ``accum_freq`` embeds the K micro-batches without gradients, then for each micro-batch re-forwards it
with gradients and recomputes the whole loss with that slice fresh (K loss evaluations). Here the loss runs once,
as in GradCache: the cached features are leaves that require grad, the loss's backward fills their gradients (and
the loss parameters'), and each micro-batch is then re-forwarded with gradients and back-propagated with its slice
of those feature gradients. By the chain rule the model gradients are exactly those of one step on B·K; activation
memory is that of one micro-batch (the graph of one re-forward at a time, plus B·K embeddings).

Exactness needs every re-forward to compute what its no-grad forward computed:

* dropout and any other train-mode randomness: the RNG state (torch CPU generator and the device's CUDA generator)
  is recorded before each micro-batch's no-grad forward and restored for its re-forward; after the step the RNG
  is where the no-grad pass left it (what one forward over the B·K batch would leave it at, as a trajectory);
* BatchNorm in train mode cannot be exact (statistics over B, not B·K, and the running statistics would be
  updated twice per micro-batch): ``check_exact`` refuses a model with one (locked towers run in eval mode and
  pass).

Not pinned by a test: ``train.compile`` with inductor on a model whose dropout is active. Inductor draws its
random numbers inside the compiled graph, and the no-grad and the training graph are compiled apart; a one-off
check on the CPU (float32, dropout 0.3) matched the uncached step to 5e-7, as did ``aot_eager``; on CUDA it is
not checked yet.

Under DDP the re-forwards of micro-batches 1..K-1 run in ``no_sync``; the last one all-reduces the summed
gradients, so DDP averages once per step. With ``scaling.gather_global_batch`` the loop gathers the cached
features once (``orchestrator.distributed.global_batch``); the gather's backward hands each rank the gradient of
its own rows, which is what the re-forwards consume.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: ``forward(model, images, tokens) -> {name: (B, D) embeddings}`` (``orchestrator.models.student.forward_embeddings``)
Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class InexactAccumulationError(ValueError):
    """The model has a part that gradient accumulation cannot reproduce exactly (train-mode BatchNorm)."""


def check_exact(model: nn.Module) -> None:
    """Raise ``InexactAccumulationError`` naming the BatchNorm layers of ``model`` that are in train mode.

    Their batch statistics would be those of each micro-batch, not of the whole batch, and their running
    statistics would be updated by both the no-grad forward and the re-forward. Call it after ``model.train()``.
    """
    bad = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.training
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise InexactAccumulationError(
            f"train.accum_steps > 1 is exact only without train-mode BatchNorm, and this model has {len(bad)} "
            f"BatchNorm layer(s) that train ({shown}): use accum_steps 1, or lock that tower"
        )


class RngState:
    """The torch CPU generator's state and, on a CUDA device, that device's generator state."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        """Put the generators back where they were when this snapshot was taken."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class FeatureCache:
    """One step of ``steps`` micro-batches: ``embed`` (no grad, features cached) then, after the loss's backward,
    ``backward`` (re-forward each micro-batch with grad and back-propagate its slice of the feature gradients).

    ``autocast``: a factory of the precision context the re-forwards run in (the one ``embed`` was called in).
    ``replay_rng=False`` skips restoring the RNG for the re-forwards; it is there only to show what the replay
    buys (with dropout the result is then no longer exact).
    """

    def __init__(
        self,
        forward: Forward,
        steps: int,
        *,
        device: torch.device,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        replay_rng: bool = True,
    ) -> None:
        if steps < 2:
            raise ValueError(f"feature caching needs at least 2 micro-batches, got {steps}")
        self.forward, self.steps, self.device = forward, steps, device
        self.model: nn.Module | None = None
        self.autocast, self.replay_rng = autocast, replay_rng
        self._inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rng: list[RngState] = []
        self._after: RngState | None = None
        self._leaves: dict[str, torch.Tensor] = {}

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` (B·K, ...) as K micro-batches of B rows (the sampler yields batches of exactly B·K)."""
        if x.shape[0] % self.steps:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split into {self.steps} equal micro-batches")
        return list(torch.chunk(x, self.steps, dim=0))

    def embed(self, model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The B·K batch's embeddings by ``model`` (the DDP-wrapped or compiled one that trains), computed
        micro-batch by micro-batch without gradients.

        Returns leaf tensors that require grad: compute the loss on them (gathered or not) and call its
        ``backward()``, then ``self.backward()``.
        """
        self.model = model
        self._inputs = list(zip(self.split(images), self.split(tokens)))
        self._rng, parts = [], []
        with torch.no_grad():
            for x_img, x_txt in self._inputs:
                self._rng.append(RngState(self.device))
                parts.append(self.forward(self.model, x_img, x_txt))
        self._after = RngState(self.device)
        self._leaves = {k: torch.cat([p[k] for p in parts]).detach().requires_grad_(True) for k in parts[0]}
        return dict(self._leaves)

    def backward(self) -> None:
        """Re-forward every micro-batch with gradients and back-propagate its slice of the cached features'
        gradients into the model (accumulating in ``.grad``; DDP syncs on the last micro-batch only)."""
        model = self.model
        if not self._inputs or model is None:  # embed() sets both
            raise RuntimeError("FeatureCache.backward() without embed()")
        grads = {k: self.split(v.grad) for k, v in self._leaves.items() if v.grad is not None}
        try:
            if not grads:  # nothing trainable reached the loss: no model gradient to compute
                return
            no_sync = getattr(model, "no_sync", None)
            last = len(self._inputs) - 1
            for i, (x_img, x_txt) in enumerate(self._inputs):
                if self.replay_rng:
                    self._rng[i].restore()
                sync = contextlib.nullcontext() if no_sync is None or i == last else no_sync()
                with sync:
                    with self.autocast():
                        out = self.forward(model, x_img, x_txt)
                    names = [k for k in grads if out[k].requires_grad]  # a fully locked tower has none
                    if names:
                        torch.autograd.backward([out[k] for k in names], [grads[k][i] for k in names])
        finally:
            if self.replay_rng and self._after is not None:
                self._after.restore()
            self._inputs, self._rng, self._leaves, self._after, self.model = [], [], {}, None, None


def feature_cache(
    model: nn.Module,
    forward: Forward,
    accum_steps: int,
    *,
    device: torch.device,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> FeatureCache | None:
    """The training loop's ``FeatureCache`` for ``train.accum_steps`` (``None`` for 1: the plain step).

    Checks exactness once, with the model in train mode as it trains: ``UserError`` (field
    ``train.accum_steps``) for a model with train-mode BatchNorm.
    """
    if accum_steps == 1:
        return None
    was_training = model.training
    model.train()
    try:
        check_exact(model)
    except InexactAccumulationError as err:
        raise UserError(str(err), field="train.accum_steps") from None
    finally:
        model.train(was_training)
    log.info("gradient accumulation: %d micro-batches per step, features cached", accum_steps)
    return FeatureCache(forward, accum_steps, device=device, autocast=autocast)
