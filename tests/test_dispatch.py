"""methods/dispatch.py: the kernel choice of the O(B^3) losses and its one piece of state (CPU only, no Triton)."""

from __future__ import annotations

import logging

import pytest
import torch

from methods import dispatch
from methods.dispatch import KernelDispatch


def as_on_a_gpu(monkeypatch) -> KernelDispatch:
    """A fresh dispatcher whose "auto" picks Triton unless a build failed (what a CUDA float32 tensor gets)."""
    d = KernelDispatch()

    def use_triton(S: torch.Tensor, kernel: str) -> bool:
        return kernel == "triton" or (kernel == "auto" and not d.triton_failed)

    monkeypatch.setattr(d, "use_triton", use_triton)
    return d


def test_auto_falls_back_after_one_build_failure_until_reset(monkeypatch, caplog):
    d = as_on_a_gpu(monkeypatch)
    S = torch.zeros(2, 2)
    tried = []

    def triton():
        tried.append(1)
        raise RuntimeError("PTX assembly failed")

    with caplog.at_level(logging.WARNING, logger="methods.dispatch"):
        assert d.run(S, "auto", triton, lambda: "torch") == "torch"
        assert d.run(S, "auto", triton, lambda: "torch") == "torch"
    assert len(tried) == 1 and d.triton_failed
    assert caplog.text.count("PTX assembly failed") == 1  # one warning, not one per call
    assert not dispatch.DISPATCH.triton_failed  # a dispatcher's state is its own
    d.reset()
    assert not d.triton_failed
    assert d.run(S, "auto", lambda: "triton", lambda: "torch") == "triton"


@pytest.mark.parametrize(
    "kernel,err",
    [("triton", RuntimeError("PTX assembly failed")), ("auto", torch.cuda.OutOfMemoryError("CUDA out of memory"))],
)
def test_forced_triton_and_out_of_memory_raise_and_leave_the_state_alone(monkeypatch, kernel, err):
    """'triton' means the kernels or an error; running out of memory is not a build failure (torch would need more)."""
    d = as_on_a_gpu(monkeypatch)

    def triton():
        raise err

    with pytest.raises(type(err), match=str(err)):
        d.run(torch.zeros(2, 2), kernel, triton, lambda: "torch")
    assert not d.triton_failed


def test_torch_never_reaches_a_kernel_and_cpu_auto_runs_torch():
    d = KernelDispatch()

    def triton():
        raise AssertionError("kernel called")

    for kernel in ("torch", "auto"):
        assert d.run(torch.zeros(3, 3, dtype=torch.float32), kernel, triton, lambda: "torch") == "torch"
    assert not d.use_triton(torch.zeros(3, 3, dtype=torch.float64), "auto")


def test_check_kernel_names_the_choices():
    for kernel in dispatch.KERNELS:
        dispatch.check_kernel(kernel)
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        dispatch.check_kernel("cuda")
