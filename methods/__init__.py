"""Loss families for image–text retrieval (BCLS, Listwise ITR, CUSA). Imports torch only.

``methods.functional`` holds the pure loss functions on a similarity matrix; ``methods.build(name, **params)``
builds a registered family module. The other modules, by job:

* ``families`` / ``registry``: the family modules and their registry; ``batch``: their input and output types;
  ``temperature``: a family's (learnable) temperature and the spec mapping that builds it.
* ``row_losses``: the losses for a subset of query rows (``scaling.local_loss``).
* ``checks``: argument checks shared by ``functional`` and ``row_losses``; ``relevance``: the RSC relevance matrix.
* ``ndcg_direction`` / ``kendall_direction``: one direction of the O(B^3) losses (blocked autograd Functions,
  one function per Kendall pair-selection algorithm); ``blocks``: their chunk sizing and block grid.
* ``dispatch``: Triton or torch for those losses, and the one piece of state (the build-failure fallback);
  ``kernels``: the fused Triton kernels.
"""

from methods import families as _families  # noqa: F401  (registers the families)
from methods.batch import EmbeddingBatch, LossOutput
from methods.registry import build, families

__all__ = ["EmbeddingBatch", "LossOutput", "build", "families"]
