"""Uni-modal evaluations (CUSA's claim that uni-modal soft labels improve them).

* Image retrieval: every image of a labelled set queries all the others (the query itself excluded, as CUSA's
  ``evaluation_img.py`` does for CUB / SOP / iNat); R@K = % of queries with an image of their own class among
  their K nearest neighbours (cosine of L2-normalised embeddings = Euclidean order).
* STS: Spearman correlation (x 100) between the cosine of each sentence pair's embeddings and its gold score.

With CUSA's uni-modal heads (``HeadedDualEncoder`` with ``uni=True``) the embeddings come from those heads, as in
the paper; otherwise from the model's ordinary image / text embeddings.

Inputs: a labelled image folder (class = immediate subfolder, e.g. CUB's ``images/``), or a list file (SOP's
``Ebay_test.txt`` with its ``image_id class_id super_class_id path`` header, or ``path<TAB>label`` lines) with
paths relative to the file; sentence pairs as TSV: a header naming ``sentence1``, ``sentence2`` and ``score``
(GLUE STS-B), the STS-benchmark layout (``genre file year id score sentence1 sentence2``, no header), or
``sentence1<TAB>sentence2<TAB>score`` lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from orchestrator.data.images import to_rgb
from orchestrator.errors import UserError
from orchestrator.models.encoder import DualEncoder, not_a_dual_encoder

__all__ = [
    "LabelledImages",
    "SentencePairs",
    "average_ranks",
    "encode_image_files",
    "encode_texts",
    "image_retrieval_recall",
    "load_labelled_images",
    "load_sentence_pairs",
    "spearman",
    "sts_spearman",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class LabelledImages:
    """``paths`` (N,) image files, ``labels`` (N,) int64 class index into ``classes``."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    source: str


def _from_folder(root: Path) -> LabelledImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return LabelledImages(paths, np.asarray(labels, dtype=np.int64), classes, str(root))


def _from_list(path: Path) -> LabelledImages:
    lines = [(n, line.rstrip("\n")) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise UserError("no images listed", path=str(path))
    split = (lambda s: s.split("\t")) if "\t" in lines[0][1] else (lambda s: s.split())
    head = [h.strip().lower() for h in split(lines[0][1])]
    if "path" in head:  # SOP: image_id class_id super_class_id path
        label_col = next((head.index(c) for c in ("class_id", "label", "class") if c in head), None)
        if label_col is None:
            raise UserError(
                "the header names a path column but no class_id / label column", path=str(path), field="line 1"
            )
        path_col, body = head.index("path"), lines[1:]
    else:
        label_col, path_col, body = -1, 0, lines
    paths, names = [], []
    for n, line in body:
        fields = split(line)
        try:
            rel, label = fields[path_col].strip(), fields[label_col].strip()
        except IndexError:
            raise UserError("expected an image path and a label", path=str(path), field=f"line {n}") from None
        file = (path.parent / rel).resolve()
        if not file.is_file():
            raise UserError(f"image file not found: {file}", path=str(path), field=f"line {n}")
        paths.append(file)
        names.append(label)
    classes = sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    return LabelledImages(paths, np.asarray([lookup[c] for c in names], dtype=np.int64), classes, str(path))


def load_labelled_images(path: Path | str) -> LabelledImages:
    """A labelled image set from a folder of class subfolders or from a list file (module docstring).

    ``UserError`` when the path does not exist, holds fewer than 2 images, or no class has 2 images."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = _from_folder(path)
    elif path.is_file():
        found = _from_list(path)
    else:
        raise UserError("no such image folder or list file", path=str(path), field="--image-folder")
    if len(found.paths) < 2:
        raise UserError(
            f"found {len(found.paths)} images; image retrieval needs class subfolders holding images",
            path=str(path),
            field="--image-folder",
        )
    if np.bincount(found.labels).max() < 2:
        raise UserError(
            "every class has a single image: no query has a positive", path=str(path), field="--image-folder"
        )
    return found


@dataclass
class SentencePairs:
    """``first`` and ``second`` (P,) sentences, ``scores`` (P,) float64 gold similarity."""

    first: list[str]
    second: list[str]
    scores: np.ndarray
    source: str


def load_sentence_pairs(path: Path | str) -> SentencePairs:
    """Sentence pairs with gold scores from a TSV (module docstring); ``UserError`` naming the line otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError("sentence-pair file not found", path=str(path), field="--sts")
    rows = [
        (n, line.rstrip("\r\n").split("\t"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip()
    ]
    if not rows:
        raise UserError("no sentence pairs", path=str(path), field="--sts")
    head = [h.strip().lower() for h in rows[0][1]]
    if "sentence1" in head and "sentence2" in head:
        score_name = next((c for c in ("score", "similarity", "gold", "label") if c in head), None)
        if score_name is None:
            raise UserError(
                "the header names no score column (score / similarity / gold / label)", path=str(path), field="line 1"
            )
        cols, body = (head.index("sentence1"), head.index("sentence2"), head.index(score_name)), rows[1:]
    else:
        width = len(rows[0][1])
        if width == 3:
            cols = (0, 1, 2)
        elif width >= 7:
            cols = (5, 6, 4)  # STS benchmark: genre file year id score sentence1 sentence2 [sources]
        else:
            raise UserError(
                f"expected sentence1<TAB>sentence2<TAB>score, the STS-benchmark layout or a header "
                f"with sentence1 / sentence2 / score; got {width} columns",
                path=str(path),
                field="line 1",
            )
        body = rows
    first, second, scores = [], [], []
    for n, fields in body:
        try:
            a, b, s = (fields[c] for c in cols)
            score = float(s)
        except (IndexError, ValueError):
            raise UserError("expected two sentences and a numeric score", path=str(path), field=f"line {n}") from None
        if not np.isfinite(score):
            raise UserError(f"score {s!r} is not finite", path=str(path), field=f"line {n}")
        first.append(a.strip())
        second.append(b.strip())
        scores.append(score)
    if len(scores) < 2:
        raise UserError("need at least 2 sentence pairs", path=str(path), field="--sts")
    return SentencePairs(first, second, np.asarray(scores, dtype=np.float64), str(path))


# ---------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def image_retrieval_recall(
    emb: torch.Tensor, labels: np.ndarray | Sequence[int], ks: Sequence[int] = (1,), chunk_size: int = 1024
) -> dict[str, float]:
    """R@K of leave-one-out image retrieval: every image queries all the others.

    A query's rank is 1 + the number of other-class images scoring >= its best same-class image (ties count
    against the model, as in :mod:`.recall`: constant embeddings score 0, not 100); a query whose class has no
    other image never hits.

    Args:
        emb: (N, D) L2-normalised image embeddings (finite: ``ValueError`` otherwise).
        labels: (N,) int class of each image.
        ks: the K of each R@K.
        chunk_size: queries scored at once (extra memory about ``chunk_size * N`` similarities).

    Returns:
        ``{"image_r{k}": % of queries with a same-class image among their k nearest neighbours}``.
    """
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=emb.device)
    n = emb.shape[0]
    if emb.dim() != 2 or labels_t.shape != (n,):
        raise ValueError(
            f"need (N, D) embeddings and one label each, got {tuple(emb.shape)} and {tuple(labels_t.shape)}"
        )
    bad = int((~torch.isfinite(emb)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{bad} of {n} image embeddings are not finite")
    rank = torch.empty(n, dtype=torch.float64, device=emb.device)
    for start in range(0, n, chunk_size):
        q = torch.arange(start, min(start + chunk_size, n), device=emb.device)
        sims = emb[q] @ emb.T  # (c, N)
        same = labels_t[q][:, None] == labels_t[None, :]  # the query itself included
        positive = same.clone()
        positive[torch.arange(q.numel(), device=emb.device), q] = False
        best = torch.where(positive, sims, torch.full_like(sims, float("-inf"))).amax(dim=1)  # (c,)
        beaten = ((sims >= best[:, None]) & ~same).sum(dim=1)
        rank[q] = torch.where(positive.any(dim=1), 1.0 + beaten.double(), float("inf"))
    return {f"image_r{k}": 100.0 * float((rank <= k).double().mean()) for k in ks}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (1-D), ties sharing the average of their positions; float64."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.r_[True, ordered[1:] != ordered[:-1]]
    run = np.cumsum(new) - 1  # run id of each sorted position
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(values)]
    mean_pos = (starts + ends - 1) / 2.0 + 1.0  # average 1-based position of each run
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_pos[run]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks of ``a`` and ``b`` (1-D, same length)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def sts_spearman(first: torch.Tensor, second: torch.Tensor, gold: np.ndarray) -> float:
    """100 x Spearman between the cosine of each pair ((P, D) and (P, D) embeddings) and the gold scores (P,)."""
    cos = torch.nn.functional.cosine_similarity(first.double(), second.double(), dim=1).cpu().numpy()
    return 100.0 * spearman(cos, np.asarray(gold, dtype=np.float64))


# --------------------------------------------------------------------------------------------- encoding
def _uni_kwargs(model: nn.Module) -> dict[str, bool]:
    """``uni_modal=True`` for a model with CUSA's uni-modal heads."""
    return {"uni_modal": True} if getattr(model, "uni", False) else {}


@torch.no_grad()
def encode_image_files(
    model: nn.Module, paths: Sequence[Path], preprocess: Callable, *, device: torch.device, batch_size: int = 64
) -> torch.Tensor:
    """(N, D) float32 L2-normalised CPU embeddings of image files (uni-modal head where the model has one)."""
    from tqdm import tqdm

    if not isinstance(model, DualEncoder):
        raise not_a_dual_encoder(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(paths), batch_size), desc="images", unit="batch", leave=False):
            batch = []
            for p in paths[start : start + batch_size]:
                try:
                    with Image.open(p) as img:
                        batch.append(preprocess(to_rgb(img)))  # 16-bit images scaled by range
                except (OSError, ValueError) as err:
                    raise UserError(f"cannot read image ({err})", path=str(p)) from None
            emb = model.encode_image(torch.stack(batch).to(device), normalize=True, **_uni_kwargs(model))
            out.append(emb.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def encode_texts(
    model: nn.Module, texts: Sequence[str], tokenizer: Callable, *, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """(P, D) float32 L2-normalised CPU embeddings of sentences (uni-modal head where the model has one)."""
    if not isinstance(model, DualEncoder):
        raise not_a_dual_encoder(model)
    was_training = model.training
    model.eval()
    try:
        out = [
            model.encode_text(
                tokenizer(list(texts[s : s + batch_size])).to(device), normalize=True, **_uni_kwargs(model)
            )
            .float()
            .cpu()
            for s in range(0, len(texts), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out)
