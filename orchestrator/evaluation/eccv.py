"""ECCV Caption, CxC and COCO 1K/5K recalls on the COCO 5K test images, computed by the ``eccv-caption`` package.

The package (naver-ai/eccv-caption, the field's reference) ships the COCO Karpathy 5K test ids and the ground
truth of COCO, CxC and ECCV Caption (extended positives: 1,261 image and 1,332 caption queries). Nothing here
re-derives its metrics: :func:`eccv_metrics` hands the rankings to ``Metrics.compute_all_metrics`` and only
renames and scales its output. Its ``pmrp`` metric needs a download and is not computed.

Rankings are by COCO ids: ``i2t[coco image id]`` = COCO caption ids best first, ``t2i[coco caption id]`` = COCO
image ids best first. :func:`eccv_rankings` builds them from embeddings with chunked top-k. The package's COCO
1K recalls filter each list to the query's fold, so a list must hold at least one item of that fold: K = 100
(the Listwise / ITM_CLS choice) is the default; CUSA uses 50.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from orchestrator.errors import UserError
from orchestrator.evaluation.topk import chunked_topk

log = logging.getLogger(__name__)

__all__ = [
    "ECCV_TARGET_METRICS",
    "MIN_LIST_LENGTH",
    "eccv_metrics",
    "eccv_rankings",
    "eccv_reference",
    "eccv_from_embeddings",
]

#: What ``compute_all_metrics`` is asked for (``*_recalls`` expand to R@1/5/10).
ECCV_TARGET_METRICS = (
    "eccv_r1",
    "eccv_map_at_r",
    "eccv_rprecision",
    "coco_1k_recalls",
    "coco_5k_recalls",
    "cxc_recalls",
)
#: Shortest ranked list accepted (ECCV's largest positive sets: 48 captions of an image, 19 images of a caption).
MIN_LIST_LENGTH = 50
#: Default list length built from embeddings.
DEFAULT_K = 100
INSTALL_HINT = "install it with: pip install 'itr-orchestrator[eval]'  (or pip install eccv-caption==0.1.0)"


@functools.lru_cache(maxsize=1)
def eccv_reference() -> Any:
    """The package's ``Metrics`` object (its annotations loaded once); ``UserError`` when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "failed to import `ujson`"
            from eccv_caption import Metrics
    except ImportError:
        raise UserError(
            f"ECCV Caption evaluation needs the eccv-caption package; {INSTALL_HINT}", field="--eccv"
        ) from None
    return Metrics()


def _as_int_lists(rankings: Mapping[Any, Sequence[Any]], what: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for key, items in rankings.items():
        out[int(key)] = [int(x) for x in items]
    short = [k for k, v in out.items() if len(v) < MIN_LIST_LENGTH]
    if short:
        raise ValueError(
            f"{what}: {len(short)} ranked lists are shorter than {MIN_LIST_LENGTH} "
            f"(e.g. query {short[0]} has {len(out[short[0]])})"
        )
    return out


def eccv_metrics(i2t: Mapping[int, Sequence[int]], t2i: Mapping[int, Sequence[int]]) -> dict[str, float]:
    """ECCV Caption mAP@R, R-Precision, R@1 and the COCO 1K / 5K and CxC R@1/5/10, both directions.

    Args:
        i2t: COCO image id -> COCO caption ids, best first (at least 50), for every one of the 5,000 COCO 5K
            test images.
        t2i: COCO caption id -> COCO image ids, best first (at least 50), for every one of the 25,000 test
            captions.

    Returns:
        Percentages (100 x the package's ``compute_all_metrics``) under ``"<metric>/<i2t|t2i>"`` for
        ``eccv_r1``, ``eccv_map_at_r``, ``eccv_rprecision``, ``coco_1k_r{1,5,10}``, ``coco_5k_r{1,5,10}``,
        ``cxc_r{1,5,10}``.
    """
    ref = eccv_reference()
    i2t_lists = _as_int_lists(i2t, "i2t")
    t2i_lists = _as_int_lists(t2i, "t2i")
    for name, lists, wanted in (("i2t", i2t_lists, ref.coco_gts["i2t"]), ("t2i", t2i_lists, ref.coco_gts["t2i"])):
        missing = [q for q in wanted if q not in lists]
        if missing:
            raise ValueError(
                f"{name}: {len(missing)} of the {len(wanted)} COCO 5K test queries have no ranking "
                f"(e.g. id {missing[0]})"
            )
    try:
        scores = ref.compute_all_metrics(
            i2t_lists, t2i_lists, target_metrics=ECCV_TARGET_METRICS, Ks=(1, 5, 10), verbose=False
        )
    except IndexError:
        raise ValueError(
            "a ranked list holds no item of its query's COCO 1K fold; pass longer lists "
            f"(K = {DEFAULT_K} is the usual choice)"
        ) from None
    out: dict[str, float] = {}
    for metric in sorted(scores):
        for direction in ("i2t", "t2i"):
            out[f"{metric}/{direction}"] = 100.0 * float(scores[metric][direction])
    return out


@torch.no_grad()
def eccv_rankings(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_ids: Sequence[int] | np.ndarray,
    caption_ids: Sequence[int] | np.ndarray,
    k: int = DEFAULT_K,
    chunk_size: int = 1024,
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Top-``k`` rankings by id in both directions from (N, D) image and (M, D) caption embeddings.

    Returns ``(i2t, t2i)``: ``i2t[image_ids[i]]`` = the ``k`` best ``caption_ids``, ``t2i[caption_ids[j]]`` =
    the ``k`` best ``image_ids`` (similarity = dot product), best first.
    """
    if image_emb.shape[0] != len(image_ids) or text_emb.shape[0] != len(caption_ids):
        raise ValueError("one id per embedding row is needed")
    iids = np.asarray([int(x) for x in image_ids], dtype=np.int64)
    cids = np.asarray([int(x) for x in caption_ids], dtype=np.int64)
    i2t_idx, _ = chunked_topk(image_emb, text_emb, k, chunk_size)
    t2i_idx, _ = chunked_topk(text_emb, image_emb, k, chunk_size)
    i2t = dict(zip(iids.tolist(), cids[i2t_idx.cpu().numpy()].tolist()))
    t2i = dict(zip(cids.tolist(), iids[t2i_idx.cpu().numpy()].tolist()))
    return i2t, t2i


def _int_ids(ids: Sequence[Any], what: str, source: str) -> np.ndarray:
    try:
        return np.asarray([int(x) for x in ids], dtype=np.int64)
    except (TypeError, ValueError):
        bad = next(x for x in ids if not str(x).lstrip("-").isdigit())
        raise UserError(f"ECCV Caption needs COCO {what} ids (Karpathy format); got {bad!r}", path=source) from None


def eccv_from_embeddings(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_ids: Sequence[Any],
    caption_ids: Sequence[Any] | None,
    *,
    k: int = DEFAULT_K,
    chunk_size: int = 1024,
    source: str = "",
) -> dict[str, float]:
    """:func:`eccv_metrics` of embeddings of the COCO 5K test split, items keyed by COCO id.

    Args:
        image_emb: (N, D) image embeddings; ``image_ids`` their COCO image ids (int or digit strings).
        text_emb: (M, D) caption embeddings; ``caption_ids`` their COCO caption ids (Karpathy ``sentid``).
        k: ranked list length (>= 50).
        source: names the data in error messages.

    The items are restricted to the package's 5,000 images and 25,000 captions (extra items, e.g. a sixth
    caption, are dropped and logged); a missing one is a ``UserError``.
    """
    if caption_ids is None:
        raise UserError("ECCV Caption needs COCO caption ids; this data has none", path=source)
    if k < MIN_LIST_LENGTH:
        raise UserError(f"the ranked lists need at least {MIN_LIST_LENGTH} items, got {k}", field="--eccv-k")
    ref = eccv_reference()
    iids = _int_ids(image_ids, "image", source)
    cids = _int_ids(caption_ids, "caption", source)
    want_images = np.fromiter(ref.coco_gts["i2t"].keys(), dtype=np.int64)
    want_captions = np.asarray(ref.coco_ids, dtype=np.int64)
    for what, have, want in (("images", iids, want_images), ("captions", cids, want_captions)):
        missing = np.setdiff1d(want, have)
        if missing.size:
            raise UserError(
                f"{missing.size} of the {want.size} COCO 5K test {what} are missing from the data "
                f"(e.g. COCO id {int(missing[0])}); evaluate the Karpathy test split",
                path=source,
            )
    keep_i = np.isin(iids, want_images)
    keep_c = np.isin(cids, want_captions)
    if not keep_i.all() or not keep_c.all():
        log.info(
            "ECCV Caption: dropping %d images and %d captions outside the COCO 5K test set",
            int((~keep_i).sum()),
            int((~keep_c).sum()),
        )
    sel_i = torch.from_numpy(np.flatnonzero(keep_i)).to(image_emb.device)
    sel_c = torch.from_numpy(np.flatnonzero(keep_c)).to(text_emb.device)
    i2t, t2i = eccv_rankings(image_emb[sel_i], text_emb[sel_c], iids[keep_i], cids[keep_c], k=k, chunk_size=chunk_size)
    return eccv_metrics(i2t, t2i)
