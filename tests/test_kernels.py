"""The fused Triton kernels of the O(B^3) losses (methods/kernels.py).

On the CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, which executes the same kernel
code with numpy), in float64, against the naive float64 loops of test_functional and against the
blocked torch form; tiles are shrunk so that every kernel loops over several candidate tiles and
ends on a partial one. The CUDA test compiles them for real (skipped without a GPU).
"""

from __future__ import annotations

import logging

import pytest
import torch

import methods
import methods.functional as fn
from methods import dispatch, kernels, ndcg_direction
from tests.test_functional import (
    GRAD_TOL,
    leaf,
    naive_kendall,
    naive_sndcg,
    rand_R,
    rand_S,
    released_rcloss_kendall,
    value_and_grad,
)

triton = pytest.importorskip("triton", reason="triton is not installed (it ships with CUDA builds of torch)")


@pytest.fixture
def kernel_device(monkeypatch) -> str:
    """Where the kernels run: compiled on a GPU machine, else Triton's interpreter on the CPU.

    (tests/conftest.py sets ``TRITON_INTERPRET=1`` before triton is imported when there is no GPU.)
    Small tiles, so each kernel loops over several candidate tiles and ends on a partial one.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not kernels.supported(torch.zeros(1, device=device)):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setattr(kernels, "BLOCK_J", 8)
    monkeypatch.setattr(kernels, "BLOCK_K", 16)
    return device


def both_ways(f, S, device):
    """(value, gradient) of f with the Triton kernels on ``device`` and with the blocked torch form.

    S stays a CPU float64 leaf; f sees it moved to ``device`` (the gradient flows back).
    """
    return (
        value_and_grad(lambda x: f(x.to(device), "triton"), S),
        value_and_grad(lambda x: f(x.to(device), "torch"), S),
    )


@pytest.mark.parametrize("t2i", ["transpose", "as_released"])
@pytest.mark.parametrize("B,tau,scale", [(2, 0.1, 0.4), (6, 0.01, 0.4), (11, 0.005, 1.0), (17, 0.5, 0.8)])
def test_sndcg_kernels_match_naive_loops(kernel_device, t2i, B, tau, scale):
    """B = 11, tau = 0.005 engages the exponent clamp; B = 17 spans 3 j-tiles and 2 k-tiles, the last partial."""
    S, R = rand_S(B, 40 + B, scale), rand_R(B, 40 + B)
    (v, g), _ = both_ways(lambda x, k: fn.smooth_ndcg_loss(x, R, tau, t2i, kernel=k), S, kernel_device)
    v_ref, g_ref = value_and_grad(lambda x: naive_sndcg(x, R, tau, t2i), S)
    assert v == pytest.approx(v_ref, rel=1e-10, abs=1e-10)
    torch.testing.assert_close(g, g_ref, **GRAD_TOL)


def test_sndcg_kernels_match_torch_form_with_ties(kernel_device):
    """Tied scores and tied / zero relevance rows (IDCG 0 -> loss 0 for that row)."""
    B = 13
    S = (rand_S(B, 3) * 4).round() / 4  # many exact ties
    R = rand_R(B, 3)
    R[5] = 0.0  # a query with nothing relevant
    R[:, 7] = R[:, 8]  # tied relevance
    (v, g), (v_t, g_t) = both_ways(lambda x, k: fn.smooth_ndcg_loss(x, R, 0.05, kernel=k), S, kernel_device)
    assert v == pytest.approx(v_t, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(g, g_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("surrogate", ["hinge", "tanh", "sigmoid"])
@pytest.mark.parametrize("t2i", ["transpose", "as_released"])
@pytest.mark.parametrize("gap", [0.0, 0.3])
def test_kendall_kernel_matches_naive_loops(kernel_device, surrogate, t2i, gap):
    B = 13
    S, R = rand_S(B, 50), rand_R(B, 50)
    R[:, 2] = R[:, 3]  # tied relevance: with gap 0 no pair
    S[:, 4] = S[:, 5]  # tied scores: the hinge's derivative at 0 is 0, as autograd's relu
    (v, g), _ = both_ways(
        lambda x, k: fn.kendall_rank_loss(x, R, gap, surrogate, t2i, temperature=0.2, kernel=k), S, kernel_device
    )
    v_ref, g_ref = value_and_grad(lambda x: naive_kendall(x, R, gap, surrogate, t2i, temperature=0.2), S)
    assert v == pytest.approx(v_ref, rel=1e-10, abs=1e-10)
    torch.testing.assert_close(g, g_ref, **GRAD_TOL)


def test_kendall_kernel_reproduces_released_rcloss_and_counts(kernel_device):
    """as_released + hinge = ITM_CLS RCLoss; the pair count equals the (B, B, B) mask's sum exactly."""
    B = 17
    S, R = rand_S(B, 60), rand_R(B, 60)
    (v, g), _ = both_ways(
        lambda x, k: fn.kendall_rank_loss(x, R, 0.3, "hinge", "as_released", kernel=k), S, kernel_device
    )
    v_ref, g_ref = value_and_grad(lambda x: released_rcloss_kendall(x, R, 0.3), S)
    assert v == pytest.approx(v_ref, rel=1e-10, abs=1e-10)
    torch.testing.assert_close(g, g_ref, **GRAD_TOL)
    num, cnt, grad = kernels.kendall_all_pairs(
        S.to(kernel_device), R.to(kernel_device), 0.3, "hinge", 0.1, need_grad=False
    )
    assert grad is None
    assert int(cnt.sum()) == int(((R[:, :, None] - R[:, None, :]) > 0.3).sum())


def test_kendall_kernel_no_valid_pair_is_zero_with_a_graph(kernel_device):
    B = 9
    S = leaf(rand_S(B, 61))
    out = fn.kendall_rank_loss(S.to(kernel_device), torch.full((B, B), 0.5, dtype=torch.float64), 0.3, kernel="triton")
    out.backward()
    assert float(out.detach()) == 0.0 and torch.count_nonzero(S.grad) == 0


def test_triton_paths_pass_gradcheck(kernel_device):
    B = 4
    S, R = rand_S(B, 70), rand_R(B, 70)
    S, R = S.to(kernel_device), R.to(kernel_device)
    assert torch.autograd.gradcheck(
        lambda x: fn.smooth_ndcg_loss(x, R, 0.2, kernel="triton"), (leaf(S),), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda x: fn.kendall_rank_loss(x, R, 0.2, "sigmoid", temperature=0.3, kernel="triton"),
        (leaf(S),),
        fast_mode=True,
    )


def test_float32_inputs_match_the_torch_form(kernel_device):
    """What the GPU runs: float32 end to end."""
    B = 13
    S, R = rand_S(B, 80).float(), rand_R(B, 80).float()
    for f in (
        lambda x, k: fn.smooth_ndcg_loss(x, R, 0.01, kernel=k),
        lambda x, k: fn.kendall_rank_loss(x, R, 0.3, "tanh", kernel=k),
    ):
        (v, g), (v_t, g_t) = both_ways(f, S, kernel_device)
        assert v == pytest.approx(v_t, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(g, g_t, rtol=1e-4, atol=1e-6)


def test_auto_runs_torch_on_cpu_and_triton_needs_a_gpu(monkeypatch):
    """Without the interpreter a CPU tensor never reaches a kernel; forcing one says why it cannot run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*a, **k):
        raise AssertionError("kernel called on the CPU")

    monkeypatch.setattr(kernels, "sndcg_ranks", boom)
    monkeypatch.setattr(kernels, "kendall_all_pairs", boom)
    S, R = rand_S(8, 90), rand_R(8, 90)
    assert float(fn.smooth_ndcg_loss(S, R)) == float(fn.smooth_ndcg_loss(S, R, kernel="torch"))
    assert float(fn.kendall_rank_loss(S, R, window=None)) == float(
        fn.kendall_rank_loss(S, R, window=None, kernel="torch")
    )
    with pytest.raises(ValueError, match="kernel='triton' needs triton and a CUDA tensor"):
        fn.smooth_ndcg_loss(S, R, kernel="triton")
    with pytest.raises(ValueError, match="kernel must be one of"):
        fn.kendall_rank_loss(S, R, kernel="cuda")


def test_auto_falls_back_to_torch_once_when_a_kernel_fails_to_build(monkeypatch, caplog):
    """A GPU whose Triton cannot build the kernel still trains ('auto'), with a warning; 'triton' raises."""
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(dispatch.DISPATCH, "triton_failed", False)
    monkeypatch.setattr(
        dispatch.DISPATCH, "use_triton", lambda S, kernel: kernel == "triton" or not dispatch.DISPATCH.triton_failed
    )
    monkeypatch.setattr(kernels, "sndcg_ranks", broken)
    S, R = rand_S(8, 91), rand_R(8, 91)
    with caplog.at_level(logging.WARNING, logger="methods.dispatch"):
        v = fn.smooth_ndcg_loss(S, R, kernel="auto")
        fn.smooth_ndcg_loss(S, R, kernel="auto")
    assert float(v) == float(fn.smooth_ndcg_loss(S, R, kernel="torch"))
    assert len(calls) == 1 and dispatch.DISPATCH.triton_failed
    assert "PTX assembly failed" in caplog.text
    with pytest.raises(RuntimeError, match="PTX assembly failed"):
        fn.smooth_ndcg_loss(S, R, kernel="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B", [1000, 2048])
def test_cuda_kernels_match_the_torch_form_in_less_memory(B):
    """Compiled kernels (default tiles) on the GPU: same values and gradients as the blocked torch form."""
    g = torch.Generator(device="cuda").manual_seed(B)
    S = (torch.rand(B, B, device="cuda", generator=g) * 2 - 1) * 0.4
    R = torch.rand(B, B, device="cuda", generator=g)
    # the default picks the kernels for float32 / bfloat16 CUDA scores, the torch form for float64
    use_triton = dispatch.DISPATCH.use_triton
    assert use_triton(S, "auto") and use_triton(S.bfloat16(), "auto") and not use_triton(S.double(), "auto")
    for name, f in (
        ("sndcg", lambda x, k: fn.smooth_ndcg_loss(x, R, 0.01, kernel=k)),
        ("kendall", lambda x, k: fn.kendall_rank_loss(x, R, 0.3, "hinge", kernel=k)),
        ("kendall_sigmoid", lambda x, k: fn.kendall_rank_loss(x, R, 0.3, "sigmoid", kernel=k)),
    ):
        results = {}
        for k in ("torch", "triton"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            results[k] = value_and_grad(lambda x: f(x, k), S)
            results[k] += (torch.cuda.max_memory_allocated() - base,)
        (v, g_tri, peak_tri), (v_t, g_t, peak_t) = results["triton"], results["torch"]
        assert v == pytest.approx(v_t, rel=1e-4, abs=1e-6), name
        torch.testing.assert_close(g_tri, g_t, rtol=1e-3, atol=1e-4 * float(g_t.abs().max()), msg=name)
        assert peak_tri <= 8 * B * B * 4, (name, peak_tri)  # a few (B, B) float32 buffers
        assert peak_tri < peak_t, (name, peak_tri, peak_t)


@pytest.mark.parametrize("family,window", [("listwise", None), ("bcls", None)])
def test_config_kernel_reaches_the_loss(family, window, monkeypatch):
    """``loss.kernel`` is validated by name and handed to the O(B^3) function the family calls."""
    from pydantic import ValidationError

    from orchestrator.config import ExperimentConfig
    from orchestrator.losses import build_loss
    from tests.test_families import make_batch

    extra = {"window": window} if family == "bcls" else {}
    with pytest.raises(ValidationError, match="loss.listwise.kernel|loss.bcls.kernel"):
        ExperimentConfig.model_validate({"loss": {"family": family, "kernel": "cuda", **extra}})
    seen = []
    target = "smooth_ndcg_loss" if family == "listwise" else "kendall_rank_loss"
    real = getattr(fn, target)
    monkeypatch.setattr(fn, target, lambda *a, **k: seen.append(k["kernel"]) or real(*a, **k))
    for kernel in ("auto", "torch"):
        cfg = ExperimentConfig.model_validate({"loss": {"family": family, "kernel": kernel, **extra}})
        assert torch.isfinite(build_loss(cfg).double()(make_batch()).total)
    assert seen == ["auto", "torch"]
    with pytest.raises(ValueError, match="kernel must be one of"):  # the family itself, before any step
        methods.build(family, kernel="cuda")


def test_half_precision_scores_keep_float32_ranks(kernel_device):
    """bfloat16 S: each direction is the float32 computation on the same scores, rounded once at its end."""
    B = 12
    S, R = rand_S(B, 95).to(torch.bfloat16), rand_R(B, 95).float()
    gains, idcg = torch.pow(2.0, R) - 1.0, ndcg_direction.ideal_dcg(R)
    one = ndcg_direction.SmoothNDCGDirectionTriton.apply(
        S.to(kernel_device), gains.to(kernel_device), idcg.to(kernel_device), 0.05, 50.0, "triton"
    )
    ref = ndcg_direction.SmoothNDCGDirection.apply(S.float(), gains, idcg, 0.05, B, 50.0)
    assert one.dtype == torch.bfloat16 and float(one) == float(ref.to(torch.bfloat16))
    v16 = fn.smooth_ndcg_loss(S.to(kernel_device), R, 0.05, kernel="triton")
    v32 = fn.smooth_ndcg_loss(S.float(), R, 0.05, kernel="torch")
    assert v16.dtype == torch.bfloat16 and abs(float(v16) - float(v32)) <= 2 * 2**-9  # 2 bf16 ulps at 0.23


def test_no_grad_and_non_contiguous_scores(kernel_device):
    """Validation calls the losses under no_grad; S may be a transposed view."""
    B = 10
    S, R = rand_S(B, 97).t(), rand_R(B, 97)
    assert not S.is_contiguous()
    with torch.no_grad():
        for f in (
            lambda k: fn.smooth_ndcg_loss(S.to(kernel_device), R, 0.05, kernel=k),
            lambda k: fn.kendall_rank_loss(S.to(kernel_device), R, 0.3, "sigmoid", kernel=k),
        ):
            assert float(f("triton")) == pytest.approx(float(f("torch")), rel=1e-12, abs=1e-12)


def test_gradient_kernel_failure_falls_back_to_the_same_formula_in_torch(kernel_device, monkeypatch, caplog):
    """'auto': a gradient kernel that fails to build is replaced by its torch form, with the same gradient.

    This also checks the folded gradient formula of the kernel (one sum over k) written out in plain torch
    against the naive loops' autograd gradient."""
    B = 9
    S, R = rand_S(B, 98), rand_R(B, 98)

    def broken(*a, **k):
        raise RuntimeError("gradient kernel: out of shared memory")

    monkeypatch.setattr(dispatch.DISPATCH, "triton_failed", False)
    monkeypatch.setattr(dispatch.DISPATCH, "use_triton", lambda S, kernel: True)  # as on a GPU
    monkeypatch.setattr(kernels, "sndcg_rank_grad", broken)
    with caplog.at_level(logging.WARNING, logger="methods.dispatch"):
        v, g = value_and_grad(lambda x: fn.smooth_ndcg_loss(x.to(kernel_device), R, 0.1, kernel="auto"), S)
    assert "out of shared memory" in caplog.text and dispatch.DISPATCH.triton_failed
    v_ref, g_ref = value_and_grad(lambda x: naive_sndcg(x, R, 0.1), S)
    assert v == pytest.approx(v_ref, rel=1e-10, abs=1e-10)
    torch.testing.assert_close(g, g_ref, **GRAD_TOL)
    with pytest.raises(RuntimeError, match="out of shared memory"):
        value_and_grad(lambda x: fn.smooth_ndcg_loss(x.to(kernel_device), R, 0.1, kernel="triton"), S)
