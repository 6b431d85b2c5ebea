"""Loss families for image–text retrieval (BCLS, Listwise ITR, CUSA). Imports torch only.

``methods.functional`` holds the pure loss functions on a similarity matrix; ``methods.build(name, **params)``
builds a registered family module.
"""
from methods import families as _families  # noqa: F401  (registers the families)
from methods.batch import EmbeddingBatch, LossOutput
from methods.registry import build, families

__all__ = ["EmbeddingBatch", "LossOutput", "build", "families"]
