"""What every loss family consumes (``EmbeddingBatch``) and returns (``LossOutput``)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


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
        return {f.name for f in fields(self) if f.name != "query_rows" and getattr(self, f.name) is not None}


@dataclass
class LossOutput:
    """``total``: the scalar to back-propagate; ``terms``: each weighted term (scalars), for logging."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
