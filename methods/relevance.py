"""Relevance Score Calculation (RSC, docs/methods.md §B.2, A.1): graded relevance of batch texts to batch images
from the images' captions, the label matrix R of the listwise and BCLS losses. Imports torch only.

:func:`caption_relevance` gives the square (B, B) R (also importable as ``methods.functional.caption_relevance``);
:func:`caption_relevance_block` any (I, J) block of it, which the query-row forms
(:func:`methods.row_losses.caption_relevance_rows`) use. Both are constants: computed under ``no_grad``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def caption_relevance(
    caption_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_mask: torch.Tensor | None = None,
    rescale: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Relevance Score Calculation: max cosine between an image's captions and each batch text.

    ``R_ij = max_{c in C(i)} cos(e_c, e_{t_j})``, then ``(1 + R) / 2`` if ``rescale``, then
    ``R_ii = 1``. Embeddings are L2-normalised inside. Computed under ``no_grad``: the result
    is a constant label matrix (no gradient flows into the embeddings).

    Args:
        caption_emb: (B, K, D) embeddings of the (up to K) captions of each batch image.
        text_emb: (B, D) embedding of each batch text (the sample's own caption).
        caption_mask: optional (B, K) bool, True = a real caption (for images with fewer than
            K captions). Every image needs at least one real caption.
        rescale: map [-1, 1] to [0, 1] (Listwise RSC); ITM_CLS / LG_ITM use ``rescale=False``.
        validate: check the mask (a host sync; the training loop's masks hold each pair's own caption).

    Returns:
        (B, B) tensor R (row = image i, column = text j), dtype of ``caption_emb``, no grad.
    """
    if caption_emb.dim() != 3 or text_emb.dim() != 2:
        raise ValueError(
            f"caption_emb must be (B, K, D) and text_emb (B, D), got {tuple(caption_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    B, K, D = caption_emb.shape
    if text_emb.shape[0] != B or text_emb.shape[1] != D:
        raise ValueError(f"text_emb must be ({B}, {D}), got {tuple(text_emb.shape)}")
    mask = None
    if caption_mask is not None:
        if tuple(caption_mask.shape) != (B, K):
            raise ValueError(f"caption_mask must be ({B}, {K}), got {tuple(caption_mask.shape)}")
        mask = caption_mask.to(device=caption_emb.device, dtype=torch.bool)
        if validate and not bool(mask.any(dim=1).all()):
            raise ValueError("caption_mask: every image needs at least one real caption")
    R = caption_relevance_block(caption_emb, text_emb, mask, rescale)
    R.fill_diagonal_(1.0)
    return R


def caption_relevance_block(
    caption_emb: torch.Tensor, text_emb: torch.Tensor, mask: torch.Tensor | None, rescale: bool
) -> torch.Tensor:
    """(I, J) ``max_k cos(caption_emb[i, k], text_emb[j])`` (then ``(1 + R) / 2`` if ``rescale``), no grad.

    caption_emb (I, K, D), text_emb (J, D), mask (I, K) bool or None (True = a real caption).
    """
    with torch.no_grad():
        c = F.normalize(caption_emb.detach(), dim=-1)
        t = F.normalize(text_emb.detach().to(c.dtype), dim=-1)
        sims = torch.einsum("bkd,jd->bkj", c, t)  # (I, K, J)
        if mask is not None:
            sims = sims.masked_fill(~mask.unsqueeze(2), -math.inf)
        R = sims.amax(dim=1)
        if rescale:
            R = (1.0 + R) / 2.0
    return R


__all__ = ["caption_relevance", "caption_relevance_block"]
