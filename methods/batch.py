"""What every loss family consumes (``EmbeddingBatch``) and returns (``LossOutput``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist


@dataclass
class EmbeddingBatch:
    """One batch of embeddings as the losses see it.

    image_emb: (B, D) L2-normalised image embeddings (row i = image of pair i).
    text_emb: (B, D) L2-normalised text embeddings (row i = caption of pair i).
    image_ids: (B,) int64, the dataset index of each pair's image (equal ids = same image: positives).
    Optional inputs, used by the families that need them:
    image_uni / text_uni: (B, D') uni-modal head outputs (CUSA's USA).
    teacher_image / teacher_text: (B, D_t) teacher features of each pair's image / caption.
    caption_group_emb: (B, K, D_c) embeddings of all captions of each pair's image; caption_group_mask (B, K) bool.
    text_caption_emb: (B, D_c) the same embedding space for each pair's own caption.
    relevance: (B, B) graded relevance, rows = images, columns = texts, when the data knows it exactly.
    query_rows: None = the loss is computed for every query row (both directions); a slice = only for these
    rows (``scaling.local_loss``: this rank's images against all texts, its texts against all images), for the
    families with ``supports_local_loss``; they average so that the mean over ranks is the global loss.
    rank_sum: with ``query_rows``, how a tensor is summed over the ranks that share the gathered batch (Kendall's
    pair counts); None = an all-reduce over torch.distributed's default group (the group
    ``orchestrator.distributed.global_batch`` gathers over). See :meth:`sum_over_ranks`.
    """

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    image_ids: torch.Tensor
    image_uni: torch.Tensor | None = None
    text_uni: torch.Tensor | None = None
    teacher_image: torch.Tensor | None = None
    teacher_text: torch.Tensor | None = None
    caption_group_emb: torch.Tensor | None = None
    caption_group_mask: torch.Tensor | None = None
    text_caption_emb: torch.Tensor | None = None
    relevance: torch.Tensor | None = None
    query_rows: slice | None = None
    rank_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    def similarity(self) -> torch.Tensor:
        """S: (B, B) cosine similarities, rows = images, columns = texts."""
        return self.image_emb @ self.text_emb.T

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The query rows of ``x`` (all of them when ``query_rows`` is None)."""
        return x if self.query_rows is None else x[self.query_rows]

    def query_similarities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(i2t, t2i), both (Q, B): the query images against every text, the query texts against every image.

        With every row a query this is ``(S, S.T)``.
        """
        if self.query_rows is None:
            S = self.similarity()
            return S, S.T
        return self.rows(self.image_emb) @ self.text_emb.T, self.rows(self.text_emb) @ self.image_emb.T

    def query_columns(self) -> torch.Tensor:
        """(Q,) int64: each query row's own column (its pair) among the B candidates; ``arange(B)`` without
        ``query_rows``."""
        cols = torch.arange(self.image_ids.shape[0], device=self.image_emb.device)
        return self.rows(cols)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks whose query rows partition the batch (a new tensor; ``t`` is kept).

        ``rank_sum`` when given; else an all-reduce over the default process group when one of more than one
        rank is initialised; else ``t`` itself, which is the sum only when this process computes every row.
        Raises ValueError for a strict subset of the rows without a process group or ``rank_sum``.
        """
        if self.rank_sum is not None:
            return self.rank_sum(t)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            out = t.clone()
            dist.all_reduce(out)
            return out
        B = self.image_ids.shape[0]
        if self.query_rows is not None and len(range(B)[self.query_rows]) != B:
            raise ValueError(
                "query_rows covers part of the batch but there is no process group to sum over "
                "the other ranks: initialise torch.distributed or set EmbeddingBatch.rank_sum"
            )
        return t

    def query_positives(self, multi_positive: bool = True) -> torch.Tensor:
        """(Q, B) bool: query row q's positives among the B columns (the same for both directions).

        ``multi_positive``: every pair of the same image; otherwise only the pair itself.
        """
        if multi_positive:
            return self.rows(self.image_ids)[:, None] == self.image_ids[None, :]
        B = self.image_ids.shape[0]
        cols = torch.arange(B, device=self.image_ids.device)
        return self.rows(cols)[:, None] == cols[None, :]

    def positives(self) -> torch.Tensor:
        """(B, B) bool: pair (i, j) is positive when image i is the image of text j."""
        return self.image_ids[:, None] == self.image_ids[None, :]

    def available(self) -> set[str]:
        """Names of the optional inputs that are present."""
        return {
            f.name
            for f in fields(self)
            if f.name not in ("query_rows", "rank_sum") and getattr(self, f.name) is not None
        }


@dataclass
class LossOutput:
    """``total``: the scalar to back-propagate; ``terms``: each weighted term (scalars), for logging."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
