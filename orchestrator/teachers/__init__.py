"""Offline teacher encoders and their content-addressed feature cache (CUSA's CSA/USA soft labels,
Listwise RSC and BCLS caption relevance).

Public API::

    from orchestrator.teachers import extract_split, load_teachers, check_features, open_features
    feats = extract_split(cfg.teachers, index)          # SplitTeacherFeatures: .image (N_img, D_i), .text (N_cap, D_t)

See :mod:`orchestrator.teachers.encoders` for the spec strings, :mod:`orchestrator.teachers.cache` for
the on-disk layout, :mod:`orchestrator.teachers.ray_backend` for ``teachers.backend: ray``. Nothing
here imports Ray unless the Ray backend runs.
"""

from orchestrator.teachers.cache import ShardStore, ViewMismatch, open_view
from orchestrator.teachers.encoders import (
    TeacherEncoder,
    build_image_teacher,
    build_teacher,
    build_text_teacher,
    find_mpnet_parts,
)
from orchestrator.teachers.extract import (
    ExtractStats,
    SplitTeacherFeatures,
    TeacherSet,
    check_features,
    extract_modality,
    extract_split,
    load_teachers,
    open_features,
)

__all__ = [
    "ExtractStats",
    "ShardStore",
    "SplitTeacherFeatures",
    "TeacherEncoder",
    "TeacherSet",
    "ViewMismatch",
    "build_image_teacher",
    "build_teacher",
    "build_text_teacher",
    "check_features",
    "extract_modality",
    "extract_split",
    "find_mpnet_parts",
    "load_teachers",
    "open_features",
    "open_view",
]
