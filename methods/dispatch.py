"""Which implementation the O(B^3) losses run: the fused Triton kernels or the blocked torch form. Imports torch only.

A loss's ``kernel`` argument (:data:`KERNELS`) names the choice:

* ``"torch"``: the blocked torch autograd Functions (:mod:`methods.ndcg_direction`, :mod:`methods.kendall_direction`).
* ``"triton"``: the fused kernels of :mod:`methods.kernels`; ValueError where they cannot run (no triton, or a
  CPU tensor without ``TRITON_INTERPRET=1``); a kernel that fails to build raises.
* ``"auto"`` (the default): Triton for float32 / float16 / bfloat16 CUDA tensors when triton imports, else torch.
  A kernel that fails to build (an old GPU, a broken toolchain) is not an error: the call runs the torch form and
  from then on every ``"auto"`` call goes straight to torch, after one warning.

**The state.** That "from then on" is the only state of :mod:`methods`, and it lives here, in one place: the
:class:`KernelDispatch` object :data:`DISPATCH` that every O(B^3) loss consults. Its ``triton_failed`` flag is set
by the first build failure in ``"auto"`` mode and holds for the life of the process (every later step would fail the
same way: the failure is a property of the machine, not of the input). :meth:`KernelDispatch.reset` clears it, e.g.
after fixing the toolchain in a long-lived process; tests replace :data:`DISPATCH` or its attributes with
``monkeypatch``. Everything else in :mod:`methods` is a pure function of its arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from methods import kernels

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Implementations of the O(B^3) losses: ``auto`` = the fused Triton kernels for float32/16 CUDA
#: tensors when triton imports (``methods.kernels``), else the blocked torch form.
KERNELS = ("auto", "torch", "triton")


def check_kernel(kernel: str) -> None:
    """ValueError unless ``kernel`` is one of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


class KernelDispatch:
    """The kernel choice of the O(B^3) losses and its one piece of state (see the module docstring).

    Attributes:
        triton_failed: True once a Triton kernel failed to build in ``"auto"`` mode; ``"auto"`` then runs torch.
    """

    def __init__(self) -> None:
        self.triton_failed = False

    def reset(self) -> None:
        """Forget an earlier build failure: ``"auto"`` tries the Triton kernels again."""
        self.triton_failed = False

    def use_triton(self, S: torch.Tensor, kernel: str) -> bool:
        """Whether the O(B^3) losses run the fused Triton kernels on S (any shape; see :data:`KERNELS`)."""
        if kernel == "torch":
            return False
        if kernel == "triton":
            if not kernels.supported(S):
                raise ValueError(
                    "kernel='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); "
                    f"got a {S.device.type} tensor, triton {'available' if kernels.AVAILABLE else 'not installed'}"
                )
            return True
        return S.is_cuda and S.dtype != torch.float64 and kernels.AVAILABLE and not self.triton_failed

    def fall_back(self, kernel: str, err: Exception) -> None:
        """After ``err`` from a Triton kernel: in ``"auto"`` mode record the failure and warn (the caller then runs
        the torch form); otherwise, or for a CUDA out-of-memory error (not a build failure), re-raise ``err``."""
        if kernel != "auto" or isinstance(err, torch.cuda.OutOfMemoryError):
            raise err
        self.triton_failed = True
        log.warning(
            "Triton kernel failed (%s: %s); using the blocked torch form of the O(B^3) losses from now on",
            type(err).__name__,
            err,
        )

    def run(self, S: torch.Tensor, kernel: str, triton: Callable[[], T], blocked: Callable[[], T]) -> T:
        """``triton()`` where :meth:`use_triton` says so and it builds (see :meth:`fall_back`), else ``blocked()``."""
        if self.use_triton(S, kernel):
            try:
                return triton()
            except Exception as err:  # a kernel that fails to build: see fall_back
                self.fall_back(kernel, err)
        return blocked()


#: The dispatcher every O(B^3) loss consults (looked up at call time: ``dispatch.DISPATCH``).
DISPATCH = KernelDispatch()

__all__ = ["KERNELS", "check_kernel", "KernelDispatch", "DISPATCH"]
