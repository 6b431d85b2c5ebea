"""Gradient accumulation with feature caching (issue 14, item 3): ``train.accum_steps`` K on micro-batches of B is
one step on B·K -- the same loss and the same gradients, loss parameters included, for every family, with
dropout active (its RNG replayed in the re-forwards).

The unit cases use float64 linear towers with dropout and the real ``methods`` families; the reference is
computed here independently: one forward over the B·K batch (or, with dropout, the K micro-batches forwarded
with gradients into one graph, so that both draw the same dropout masks), one loss, one backward.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import methods
from methods import EmbeddingBatch
from orchestrator.accumulation import FeatureCache, InexactAccumulationError, check_exact, feature_cache
from orchestrator.checkpoint import load_file, model_file
from orchestrator.cli import main
from orchestrator.config import validate_config
from orchestrator.errors import UserError
from orchestrator.session import LocalSession
from orchestrator.train_loop import train_loop
from tests.conftest import tiny_tree

F64 = torch.float64
B, K = 3, 4  # micro-batch rows, micro-batches per step
N = B * K
CPU = torch.device("cpu")
FAMILIES = {  # the real families, float64, every learnable temperature in use
    "infonce": dict(temperature=dict(init=0.05, min=0.01, max=0.10)),
    "cusa": dict(alpha=0.3, beta=0.5),
    "listwise": dict(relevance="exact", kernel="torch", tau=0.1),
    "bcls": dict(relevance="exact", kernel="torch", surrogate="sigmoid", window=None),
    "triplet": dict(mining="soft_negative"),
}


class DropoutTowers(nn.Module):
    """Linear image/text towers with dropout on their inputs (+ uni-modal heads), L2-normalised outputs."""

    def __init__(self, p: float, uni: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.drop = nn.Dropout(p)
        self.image, self.text = nn.Linear(6, 5).to(F64), nn.Linear(7, 5).to(F64)
        self.uni = uni
        if uni:
            self.image_uni, self.text_uni = nn.Linear(6, 4).to(F64), nn.Linear(7, 4).to(F64)

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor) -> dict[str, torch.Tensor]:
        norm = nn.functional.normalize
        x_img, x_txt = self.drop(x_img), self.drop(x_txt)
        out = {"image_emb": norm(self.image(x_img), dim=-1), "text_emb": norm(self.text(x_txt), dim=-1)}
        if self.uni:
            out.update(image_uni=norm(self.image_uni(x_img), dim=-1), text_uni=norm(self.text_uni(x_txt), dim=-1))
        return out


def forward(model: nn.Module, x_img: torch.Tensor, x_txt: torch.Tensor) -> dict[str, torch.Tensor]:
    return model(x_img, x_txt)


def data() -> dict[str, torch.Tensor]:
    """One B·K batch; image 1 has captions in micro-batches 0 and 2 (a positive across micro-batches)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.arange(N)
    ids[7] = 1
    return {
        "x_img": torch.randn(N, 6, generator=g, dtype=F64),
        "x_txt": torch.randn(N, 7, generator=g, dtype=F64),
        "ids": ids,
        "teacher_image": torch.randn(N, 8, generator=g, dtype=F64),
        "teacher_text": torch.randn(N, 8, generator=g, dtype=F64),
        "relevance": torch.rand(N, N, generator=g, dtype=F64),
    }


def extras(family: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch-side inputs, built for the whole B·K batch (as the loop builds them from its ids)."""
    if family == "cusa":
        return {"teacher_image": d["teacher_image"], "teacher_text": d["teacher_text"]}
    if family in ("listwise", "bcls"):
        return {"relevance": d["relevance"]}
    return {}


def build(family: str, p: float) -> tuple[nn.Module, nn.Module]:
    model = DropoutTowers(p, uni=family == "cusa")
    model.train()
    return model, methods.build(family, **FAMILIES[family]).to(F64)


def grads(model: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    named = [(f"model.{k}", p) for k, p in model.named_parameters()] + [
        (f"loss.{k}", p) for k, p in loss.named_parameters() if p.requires_grad
    ]
    return {k: p.grad.detach().clone() for k, p in named}


def reference_step(family: str, p: float, *, chunked: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """One step on the B·K batch: one forward (``chunked``: the K micro-batches into one graph), loss, backward."""
    d = data()
    model, loss = build(family, p)
    torch.manual_seed(1234)
    if chunked:
        parts = [model(a, b) for a, b in zip(d["x_img"].split(B), d["x_txt"].split(B))]
        emb = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
    else:
        emb = model(d["x_img"], d["x_txt"])
    out = loss(EmbeddingBatch(image_ids=d["ids"], **emb, **extras(family, d)))
    out.total.backward()
    return float(out.total.detach()), grads(model, loss)


def accumulated_step(family: str, p: float, *, replay_rng: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    """The same step with ``FeatureCache``: K no-grad micro-batch forwards, one loss, K re-forwards."""
    d = data()
    model, loss = build(family, p)
    torch.manual_seed(1234)
    cache = FeatureCache(forward, K, device=CPU, replay_rng=replay_rng)
    emb = cache.embed(model, d["x_img"], d["x_txt"])
    out = loss(EmbeddingBatch(image_ids=d["ids"], **emb, **extras(family, d)))
    out.total.backward()
    assert all(q.grad is None for q in model.parameters()), "the loss's backward must not reach the model"
    cache.backward()
    return float(out.total.detach()), grads(model, loss)


def assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert a[0] == pytest.approx(b[0], abs=1e-6)
    assert a[1].keys() == b[1].keys() and any(k.startswith("loss.") for k in a[1]) == any(
        k.startswith("loss.") for k in b[1]
    )
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_accumulation_with_dropout_equals_one_step_on_the_whole_batch(family):
    ref, acc = reference_step(family, 0.3, chunked=True), accumulated_step(family, 0.3)
    assert_same(acc, ref)
    if family in ("infonce", "cusa"):  # their learnable temperatures get a gradient from the one loss backward
        assert any(k.startswith("loss.") and v.abs().sum() > 0 for k, v in acc[1].items())


@pytest.mark.parametrize("family", ["infonce", "cusa", "listwise", "bcls"])
def test_accumulation_without_dropout_equals_one_forward_on_the_whole_batch(family):
    assert_same(accumulated_step(family, 0.0), reference_step(family, 0.0, chunked=False))


@pytest.mark.parametrize("family", ["infonce", "cusa"])
def test_without_the_rng_replay_dropout_breaks_exactness(family):
    """The re-forwards then draw other dropout masks: the gradients differ (the replay is what makes it exact)."""
    ref, acc = reference_step(family, 0.3, chunked=True), accumulated_step(family, 0.3, replay_rng=False)
    assert acc[0] == pytest.approx(ref[0], abs=1e-9)  # the loss itself comes from the no-grad pass
    model_keys = [k for k in ref[1] if k.startswith("model.")]
    assert max(float((acc[1][k] - ref[1][k]).abs().max()) for k in model_keys) > 1e-3


def test_rng_after_the_step_is_where_the_no_grad_pass_left_it():
    d = data()
    model, loss = build("infonce", 0.3)
    torch.manual_seed(5)
    cache = FeatureCache(forward, K, device=CPU)
    emb = cache.embed(model, d["x_img"], d["x_txt"])
    after_embed = torch.get_rng_state()
    loss(EmbeddingBatch(image_ids=d["ids"], **emb)).total.backward()
    cache.backward()
    assert torch.equal(torch.get_rng_state(), after_embed)


def test_train_mode_batchnorm_is_refused_and_locked_batchnorm_passes():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(InexactAccumulationError, match=r"1 BatchNorm layer\(s\) that train \(1\)"):
        check_exact(model.train())
    check_exact(model.eval())  # eval-mode BatchNorm (a locked tower) is a fixed affine map: exact
    with pytest.raises(UserError, match="train.accum_steps"):
        feature_cache(model, forward, 2, device=CPU)
    assert not model.training, "the check leaves the model's mode as it was"
    assert feature_cache(model, forward, 1, device=CPU) is None


def test_a_batch_that_does_not_split_into_k_micro_batches_is_refused():
    cache = FeatureCache(forward, K, device=CPU)
    with pytest.raises(ValueError, match="does not split into 4 equal micro-batches"):
        cache.split(torch.zeros(N + 1, 2))


# ------------------------------------------------------------------------------ two DDP ranks, gathered
W = 2  # ranks; each holds B·K rows, the gathered batch W·B·K
DDP_CASES = [
    ("infonce", False),
    ("infonce", True),
    ("cusa", False),
    ("cusa", True),
    ("listwise", False),
    ("bcls", False),
]  # family, local_loss


def _ddp_data() -> dict[str, torch.Tensor]:
    """The gathered batch (rank r's rows: r·B·K ...); image 1 has captions on both ranks."""
    g = torch.Generator().manual_seed(3)
    n = W * N
    ids = torch.arange(n)
    ids[N + 1] = 1
    return {
        "x_img": torch.randn(n, 6, generator=g, dtype=F64),
        "x_txt": torch.randn(n, 7, generator=g, dtype=F64),
        "ids": ids,
        "teacher_image": torch.randn(n, 8, generator=g, dtype=F64),
        "teacher_text": torch.randn(n, 8, generator=g, dtype=F64),
        "relevance": torch.rand(n, n, generator=g, dtype=F64),
    }


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """As ``train_loop`` composes it: DDP model, FeatureCache, ``global_batch`` gather, loss, re-forwards."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from orchestrator.distributed import average_gradients, global_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    results = {}
    try:
        for family, local_loss in DDP_CASES:
            model, loss = build(family, 0.0)
            ddp, d, mine = DDP(model), _ddp_data(), slice(rank * N, (rank + 1) * N)
            cache = FeatureCache(forward, K, device=CPU)
            emb = cache.embed(ddp, d["x_img"][mine], d["x_txt"][mine])
            emb, ids, _, rows = global_batch(emb, d["ids"][mine], d["ids"][mine], gather=True, local_loss=local_loss)
            out = loss(EmbeddingBatch(image_ids=ids, **emb, **extras(family, d), query_rows=rows))
            out.total.backward()
            cache.backward()
            average_gradients([q for q in loss.parameters() if q.requires_grad])
            results[f"{family}/{local_loss}"] = (float(out.total.detach()), grads(model, loss))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_gathered_with_accumulation_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Every rank's gradients after DDP (re-forwards under no_sync but the last) equal those of one process on
    the W·B·K batch, scale 1, loss parameters included; with local_loss the ranks' losses average to its loss."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(
        _ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=W, join=False, start_method="fork"
    )  # the children share the imported torch
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail("the gloo ranks did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(W)]  # our own dicts
    for family, local_loss in DDP_CASES:
        d = _ddp_data()
        model, loss = build(family, 0.0)
        out = loss(EmbeddingBatch(image_ids=d["ids"], **model(d["x_img"], d["x_txt"]), **extras(family, d)))
        out.total.backward()
        ref = grads(model, loss)
        losses = [r[f"{family}/{local_loss}"][0] for r in ranks]
        assert sum(losses) / W == pytest.approx(float(out.total.detach()), abs=1e-9)
        for r in ranks:
            got = r[f"{family}/{local_loss}"][1]
            assert got.keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=f"{family} {local_loss} {k}")


# ----------------------------------------------------------------------------------- the training loop
def _weights(session: LocalSession) -> dict[str, torch.Tensor]:
    return load_file(model_file(session.latest_checkpoint()))["model"]


def test_train_loop_accum_steps_equals_one_batch_of_b_times_k(tmp_path):
    """Two steps of batch 4 x accum_steps 4 and of batch 16: the same loss and the same trained parameters."""
    runs = {}
    for name, batch, accum in (("whole", 16, 1), ("accum", 4, 4)):
        tree = tiny_tree(
            tmp_path / name,
            train={
                "epochs": 1,
                "batch_size": batch,
                "accum_steps": accum,
                "max_steps_per_epoch": 2,
                "eval_at_start": False,
            },
        )
        cfg = validate_config(tree)
        session = LocalSession(
            tmp_path / name / "run", best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode
        )
        train_loop(cfg, session)
        runs[name] = (session.history[-1], _weights(session))
    (h_whole, s_whole), (h_acc, s_acc) = runs["whole"], runs["accum"]
    assert h_acc["train/steps"] == h_whole["train/steps"] == 2.0
    assert h_acc["train/loss"] == pytest.approx(h_whole["train/loss"], rel=1e-5)
    assert h_acc["train/temperature/tau"] == pytest.approx(h_whole["train/temperature/tau"], rel=1e-6)
    assert h_acc["train/temperature/tau"] != pytest.approx(0.05, rel=1e-4)  # the loss parameter did train
    assert s_acc.keys() == s_whole.keys()
    for k in s_whole:
        acc, whole = s_acc[k], s_whole[k]
        if k.endswith("attn.in_proj_bias"):  # the key bias: its exact gradient is 0 (softmax is shift-invariant),
            third = whole.shape[0] // 3  # so AdamW turns float32 rounding noise into steps of ~lr; q and v only
            acc, whole = torch.cat([acc[:third], acc[2 * third :]]), torch.cat([whole[:third], whole[2 * third :]])
        torch.testing.assert_close(acc, whole, rtol=1e-4, atol=1e-5, msg=k)


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    err = io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    finally:
        os.chdir(old)
    return rc, err.getvalue()


@pytest.mark.parametrize("value", [0, -2, 2.0, "2", True])
def test_accum_steps_must_be_a_positive_int(tmp_path, value):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tmp_path, train={"accum_steps": value})))
    rc, err = run_cli(["train", str(cfg)], tmp_path)
    assert rc == 2 and "train.accum_steps" in err and "Traceback" not in err, err


def test_batch_times_accum_steps_larger_than_the_data_names_both(tmp_path):
    cfg = validate_config(tiny_tree(tmp_path, train={"batch_size": 100, "accum_steps": 2}))
    session = LocalSession(tmp_path / "run", best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode)
    with pytest.raises(UserError, match=r"batch size 200 .* \(train.batch_size x train.accum_steps 2\)"):
        train_loop(cfg, session)
