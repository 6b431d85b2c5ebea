"""``itr sweep``: search-space validation (file + line), Ray Tune sweeps tracked as MLflow parent/child runs,
ASHA early stopping, failed and interrupted trials, driver SIGKILL + resume, and an external cluster via RAY_ADDRESS.

The Ray tests use a tiny model on a small synthetic set; processes they start are found again through an
environment tag (``ITR_TEST_TAG``) and killed by pid, never by name, so other Ray clusters on the machine survive.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from orchestrator import leaderboard
from orchestrator.cli import main
from orchestrator.errors import UserError
from orchestrator.search_space import Distribution, load_space
from tests.conftest import tiny_tree

REPO = Path(__file__).resolve().parent.parent
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


# ------------------------------------------------------------------------------------------- helpers
def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def sweep_base(tmp_path: Path, **train) -> dict:
    """The tiny model on 320 synthetic images; tracking and outputs under tmp_path."""
    tree = tiny_tree(
        tmp_path,
        train={
            "epochs": 3,
            "batch_size": 32,
            "max_steps_per_epoch": 6,
            "min_lr": 1e-9,
            "eval_at_start": False,
            "log_every_steps": 1000,
            **train,
        },
    )
    tree["data"]["synthetic"].update(num_train_images=320, num_val_images=60, num_test_images=20)
    tree["tracking"]["experiment"] = "sweeps"
    return tree


def space_doc(tmp_path: Path, name: str, space: dict, base: dict | None = None, **settings) -> Path:
    doc = {"name": name, "base": base or sweep_base(tmp_path), "space": space, **settings}
    return write_space(tmp_path, yaml.safe_dump(doc, sort_keys=False), f"{name}.yaml")


def mlflow_client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def runs_of(tmp_path: Path):
    """(parents, children) of the 'sweeps' experiment, every lifecycle state included."""
    from mlflow.entities import ViewType

    c = mlflow_client(tmp_path)
    exp = c.get_experiment_by_name("sweeps")
    if exp is None:
        return [], []
    runs = c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    parents = [r for r in runs if r.data.tags.get("itr.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def epoch_steps(tmp_path: Path, run_id: str) -> list[int]:
    return [m.step for m in mlflow_client(tmp_path).get_metric_history(run_id, "epoch")]


def _stat_pgid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def tagged_pids(tag: str, pgids: tuple[int, ...] = ()) -> list[int]:
    """Processes of a test: in one of ``pgids`` (the sessions the test started) or carrying ITR_TEST_TAG=tag in
    their environment. Ray's agents rewrite their environ (setproctitle), so the process group is what finds them."""
    needle = f"ITR_TEST_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        if _stat_pgid(entry) in pgids:
            found.append(int(entry))
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_tagged(tag: str, pgids: tuple[int, ...] = (), timeout: float = 15.0) -> None:
    """SIGKILL every process of the test (orphaned raylet, gcs_server, DashboardAgent, RuntimeEnvAgent, workers),
    by pid: never by name, so other Ray clusters on the machine survive."""
    deadline = time.time() + timeout
    while True:
        pids = [p for p in tagged_pids(tag, pgids) if not _is_zombie(p)]
        if not pids or time.time() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    left = [p for p in tagged_pids(tag, pgids) if not _is_zombie(p)]
    assert not left, f"processes of the test survived SIGKILL: {left}"


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def tagged_env(tag: str, **extra) -> dict:
    return {**os.environ, **ENV, "ITR_TEST_TAG": tag, **extra}


def wait_for(
    predicate,
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    poll: float = 0.5,
):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-4000:] if log is not None and log.is_file() else ""
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def result_iterations(trial_dir: Path) -> list[int]:
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line)["training_iteration"] for line in lines if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def _ray_shutdown_after_module():
    yield
    try:
        import ray

        ray.shutdown()
    except Exception:  # pragma: no cover
        pass


def _shutdown_inprocess_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------------------------- trial stand-ins
def fake_trial(cfg, session) -> dict:
    """Reports ``train.epochs`` epochs without training (the Session protocol, checkpoints included); lr 2e-3
    fails after one epoch, lr 3e-3 stalls after one."""
    ckpt = session.latest_checkpoint()
    start = int((ckpt / "epoch.txt").read_text()) + 1 if ckpt else 0
    for epoch in range(start, cfg.train.epochs):
        if epoch == 1 and cfg.train.lr == 2e-3:
            raise RuntimeError(f"boom at lr {cfg.train.lr}")
        if epoch == 1 and cfg.train.lr == 3e-3:
            time.sleep(20)
        metrics = {"train/loss": 1.0 / (epoch + 1), "val/rsum": 100 * cfg.train.lr * (epoch + 1), "epoch": epoch}
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "epoch.txt").write_text(str(epoch))
            session.report(metrics, Path(tmp), epoch)
    return metrics


@pytest.fixture
def fakes_by_value():
    """Ship this module's trial stand-ins to Ray workers by value (they cannot import tests.*)."""
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


# -------------------------------------------------------------------------------- space validation
GOOD_BASE = "base: ../configs/tiny.yaml\n"


def space_error(tmp_path: Path, text: str) -> str:
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "tiny.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    path = write_space(tmp_path / "configs", text, "space.yaml")
    with pytest.raises(UserError) as info:
        load_space(path)
    return str(info.value)


def test_unknown_dotted_path_names_space_file_and_line(tmp_path):
    msg = space_error(
        tmp_path,
        GOOD_BASE + "space:\n  loss.family: {grid: [infonce, triplet]}\n  train.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n",
    )
    assert msg.startswith(f"{tmp_path / 'configs' / 'space.yaml'}:4: space.train.lrr")
    assert "unknown config path" in msg


def test_uniform_on_int_field_names_line(tmp_path):
    msg = space_error(tmp_path, GOOD_BASE + "metric: val/rsum\nspace:\n  train.epochs: {uniform: [1, 4]}\n")
    assert ":4: space.train.epochs: uniform sample" in msg and "integer" in msg  # ints are strict: 1.0 is not 1


def test_choice_value_the_field_rejects_names_line(tmp_path):
    msg = space_error(
        tmp_path,
        GOOD_BASE + "space:\n  train.lr: {grid: [1.0e-3]}\n  train.batch_sampler: {choice: [random, shuffled]}\n",
    )
    assert ":4: space.train.batch_sampler: choice value 'shuffled' does not fit" in msg


def test_loss_field_of_another_family_is_an_invalid_combination(tmp_path):
    msg = space_error(
        tmp_path, GOOD_BASE + "space:\n  loss.family: {grid: [bcls, infonce]}\n  loss.window: {grid: [4, 8]}\n"
    )
    assert ":4: space: the combination loss.family='infonce', loss.window=4 is invalid" in msg


def test_unknown_metric_names_line(tmp_path):
    msg = space_error(tmp_path, GOOD_BASE + "space:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\nmetric: val/r1\n")
    assert ":4: metric: 'val/r1' is not reported by any trial" in msg and "val/i2t_r1" in msg


def test_bad_distribution_and_scheduler_keys_name_line(tmp_path):
    msg = space_error(tmp_path, GOOD_BASE + "space:\n  train.lr: {gird: [1, 2]}\n")
    assert ":3: space.train.lr.gird: unknown key" in msg
    msg = space_error(tmp_path, GOOD_BASE + "space:\n  train.lr: {grid: [1.0e-3]}\nscheduler: {type: asha, grace: 2}\n")
    assert ":4: scheduler.asha.grace: unknown key" in msg or ":4: scheduler.grace: unknown key" in msg


def test_override_error_names_its_line(tmp_path):
    msg = space_error(
        tmp_path, GOOD_BASE + "overrides: [train.epochs=2, train.min_lr=1.0]\nspace:\n  train.seed: {grid: [0, 1]}\n"
    )
    assert ":2: overrides: train.min_lr" in msg


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    path = write_space(
        tmp_path, f"base: {REPO / 'configs' / 'tiny.yaml'}\nspace:\n  train.epochs: {{uniform: [1, 4]}}\n"
    )
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}:3: space.train.epochs")


def test_valid_space_expands_seeds_and_inclusive_randint(tmp_path, capsys):
    path = write_space(
        tmp_path,
        f"base: {REPO / 'configs' / 'tiny.yaml'}\n"
        "space:\n  loss.family: {grid: [infonce, triplet]}\n"
        "  train.warmup_steps: {randint: [0, 3]}\n"
        "seeds: [0, 1, 2]\nmetric: train/loss\n",
    )
    space = load_space(path, ["train.epochs=2"])
    assert space.num_trials == 6 and space.mode == "min" and space.name == "space"
    assert space.varied == ["loss.family", "train.warmup_steps", "train.seed"]
    assert space.base_config.train.epochs == 2
    assert space.distributions["train.warmup_steps"].to_tune().upper == 4  # Tune's bound is exclusive
    assert Path(space.base_tree["train"]["output_dir"]).is_absolute()
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "6 trial(s)" in capsys.readouterr().out
    with pytest.raises(UserError, match="swept by the space"):
        load_space(path, ["loss.family=bcls"])


def test_shipped_spaces_validate():
    shared = (REPO.parent / "shared").is_dir()
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        if not shared and ("../shared/" in path.read_text() or "coco_mini" in path.read_text()):
            continue  # needs ../shared/data beside the checkout (as on the team's machines and in CI)
        space = load_space(path)
        assert space.num_trials >= 4, path
        assert "#" in path.read_text().splitlines()[0], f"{path} should open with a comment naming its setting"
    smoke = load_space(REPO / "search_spaces" / "smoke.yaml")
    assert smoke.base_config.model.name == "itr-tiny-vit" and smoke.spec.max_concurrent_trials == 2
    assert len(smoke.distributions["loss.family"].args) >= 3


def test_distribution_needs_exactly_one_kind():
    with pytest.raises(ValueError):
        Distribution(grid=[1], choice=[2])
    with pytest.raises(ValueError):
        Distribution(uniform=(2.0, 1.0))
    assert Distribution(loguniform=(1e-4, 1e-2)).sample_values()[0] == pytest.approx(1e-4)


def test_leaderboard_table_csv_and_plots(tmp_path):
    recs = [
        leaderboard.TrialRecord(
            "t0",
            {"loss.family": "infonce", "train.lr": 1e-3},
            [(0, 10.0), (1, 30.0)],
            2,
            leaderboard.STATUS_FINISHED,
            "r0",
        ),
        leaderboard.TrialRecord(
            "t1", {"loss.family": "triplet", "train.lr": 1e-5}, [(0, 12.0)], 1, leaderboard.STATUS_STOPPED, "r1"
        ),
        leaderboard.TrialRecord(
            "t2", {"loss.family": "bcls", "train.lr": 1e-4}, [], 0, leaderboard.STATUS_FAILED, "r2"
        ),
    ]
    table = leaderboard.rows(recs, ["loss.family", "train.lr"], "val/rsum", "max")
    assert [r["trial"] for r in table] == ["t0", "t1", "t2"]
    assert table[0]["best val/rsum"] == 30.0 and table[0]["best epoch"] == 1 and math.isnan(table[2]["best val/rsum"])
    text = leaderboard.format_table(table)
    assert "stopped early" in text and "run_id" not in text
    csv_text = leaderboard.write_csv(tmp_path / "lb.csv", table).read_text()
    assert csv_text.splitlines()[0].startswith("rank,trial,loss.family,train.lr,best val/rsum")
    pngs = leaderboard.make_plots(recs, ["loss.family", "train.lr"], "val/rsum", "max", tmp_path / "plots")
    assert {p.name for p in pngs} == {"val_rsum_vs_loss.family.png", "val_rsum_vs_train.lr.png", "learning_curves.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_learning_curves_colour_a_setting_across_its_seeds_and_label_it_once():
    TR, FIN, STOP = leaderboard.TrialRecord, leaderboard.STATUS_FINISHED, leaderboard.STATUS_STOPPED
    recs = [
        TR(f"t{f}{s}", {"loss.family": fam, "train.seed": s}, [(0, base + s), (1, base + 2 * s)], 2, FIN)
        for f, (fam, base) in enumerate([("infonce", 100.0), ("cusa", 200.0)])
        for s in range(3)
    ]
    recs.append(TR("tx", {"loss.family": "cusa", "train.seed": 3}, [(0, 1.0)], 1, STOP))
    recs.append(TR("ty", {"loss.family": "bcls", "train.seed": 0}, [], 0, leaderboard.STATUS_FAILED))  # no curve
    styles = leaderboard.curve_styles(recs, ["loss.family", "train.seed"], "max")
    colour = {r.trial_id: c for r, c, _ in styles}
    assert [r.trial_id for r, _, _ in styles][-1] == "tx" and "ty" not in colour  # stopped last; no curve, no line
    assert {colour[f"t1{s}"] for s in range(3)} == {colour["tx"]} == {0}  # cusa leads the leaderboard
    assert {colour[f"t0{s}"] for s in range(3)} == {1}
    labels = [label for _, _, label in styles if label]
    assert labels == ["family=cusa (4 seeds)", "family=infonce (3 seeds)", "family=cusa, seed=3 (stopped early)"]
    # no seed varied: every trial is its own setting
    one = leaderboard.curve_styles(recs[:2], ["train.seed"], "max")
    assert [label for _, _, label in one] == ["seed=1", "seed=0"] and [c for _, c, _ in one] == [0, 1]


# ----------------------------------------------------------------------------------------- Ray sweeps
@pytest.mark.ray
def test_asha_sweep_end_to_end_is_tracked_as_parent_and_children(tmp_path):
    from orchestrator.sweep import run_sweep

    path = space_doc(
        tmp_path,
        "asha",
        {"train.lr": {"grid": [1e-3, 1e-7]}},
        seeds=[0, 1, 2],
        base=sweep_base(tmp_path, epochs=2, max_steps_per_epoch=8),
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        max_concurrent_trials=2,
        resources={"cpu": 1},
        baseline={"train.lr": 1e-7},
    )
    result = run_sweep(load_space(path), progress=False)

    parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["itr.trial_id"] for c in children}) == 6
    assert parent.data.params["sweep.metric"] == "val/rsum" and parent.data.params["sweep.scheduler"] == "asha"
    assert parent.data.params["space.train.lr"].startswith("grid")
    client = mlflow_client(tmp_path)
    stopped = []
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("itr.failure")
        steps = epoch_steps(tmp_path, child.info.run_id)
        assert steps == list(range(len(steps))) and 1 <= len(steps) <= 2
        rsum = client.get_metric_history(child.info.run_id, "val/rsum")
        assert sorted(m.step for m in rsum) == steps
        assert child.data.params["train.lr"] in ("0.001", "1e-07") and child.data.params["loss.family"] == "infonce"
        if child.data.tags.get("itr.stopped_early") == "true":
            stopped.append(child)
            assert len(steps) == 1
        else:
            assert len(steps) == 2
    assert stopped, "ASHA stopped no trial early"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "leaderboard_settings.csv", "paired_tests.csv", "plots", "asha.yaml"} <= artifacts
    assert "base_config.yaml" in artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/val_rsum_vs_train.lr.png", "plots/val_rsum_vs_train.seed.png"} <= plots
    csv_file = client.download_artifacts(parent.info.run_id, "leaderboard.csv", str(tmp_path))
    lines = Path(csv_file).read_text().splitlines()
    assert len(lines) == 7 and "stopped early" in Path(csv_file).read_text()
    assert len(result.table) == 6 and result.table[0]["train.lr"] == 1e-3
    assert parent.data.tags["itr.best_trial"] == result.table[0]["trial"]
    check_seed_bands_and_paired_tests(client, parent.info.run_id, children, tmp_path)


def check_seed_bands_and_paired_tests(client, parent_id: str, children: list, tmp_path: Path) -> None:
    """The settings leaderboard equals numpy/scipy on the trials' own MLflow metrics; the paired test's RSUM delta
    equals the one computed from the trials' stored per-query ranks."""
    import csv

    import numpy as np
    from scipy import stats

    from orchestrator.evaluation.recall import recall_from_ranks
    from orchestrator.results import QueryRanks

    best: dict[str, list[float]] = {}
    final: dict[str, list[float]] = {}
    rsum_by: dict[str, dict[int, float]] = {}
    for child in children:
        lr = child.data.params["train.lr"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val/rsum"))
        best.setdefault(lr, []).append(max(v for _, v in history))
        final.setdefault(lr, []).append(history[-1][1])
        ranks_file = client.download_artifacts(child.info.run_id, "eval/query_ranks.npz", str(tmp_path / "qr"))
        qr = QueryRanks.read(ranks_file)
        rsum = recall_from_ranks(qr.i2t, qr.t2i, qr.ks)["rsum"]
        assert rsum == pytest.approx(history[-1][1], abs=1e-9)  # the ranks are the final evaluation's
        rsum_by.setdefault(lr, {})[int(child.data.params["train.seed"])] = rsum
    path = client.download_artifacts(parent_id, "leaderboard_settings.csv", str(tmp_path / "settings"))
    rows = {row["train.lr"]: row for row in csv.DictReader(open(path))}
    assert set(rows) == {"0.001", "1e-07"} and all("train.seed" not in r for r in rows.values())
    for lr, row in rows.items():
        key = "0.001" if lr == "0.001" else "1e-07"
        for view, values in (("best-epoch val/rsum (optimistic)", best[key]), ("final val/rsum", final[key])):
            a = np.asarray(values, dtype=np.float64)
            lo, hi = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
            assert float(row[f"{view} mean"]) == pytest.approx(a.mean(), rel=1e-9)
            assert float(row[f"{view} std"]) == pytest.approx(a.std(ddof=1), rel=1e-9)
            assert row[f"{view} ci95"] == f"{lo:.2f}..{hi:.2f}" and row["seeds"] == "3"
    path = client.download_artifacts(parent_id, "paired_tests.csv", str(tmp_path / "paired"))
    (paired,) = list(csv.DictReader(open(path)))
    assert paired["setting"] == "train.lr=0.001" and paired["baseline"] == "train.lr=1e-07"
    delta = np.mean([rsum_by["0.001"][s] for s in (0, 1, 2)]) - np.mean([rsum_by["1e-07"][s] for s in (0, 1, 2)])
    assert float(paired["rsum delta"]) == pytest.approx(delta, abs=1e-9) and paired["seeds"] == "0 1 2"
    assert 0.0 < float(paired["rsum p"]) <= 1.0


@pytest.mark.ray
def test_failed_trial_is_failed_with_reason_and_sigterm_kills_the_rest(tmp_path, fakes_by_value):
    from orchestrator.sweep import run_sweep

    base = sweep_base(tmp_path, epochs=2)
    path = space_doc(
        tmp_path,
        "fails",
        {"train.lr": {"grid": [1e-3, 2e-3]}},
        base=base,
        max_concurrent_trials=2,
        resources={"cpu": 0.5},
    )
    result = run_sweep(load_space(path), trial_fn=fake_trial, progress=False)
    _, children = runs_of(tmp_path)
    by_lr = {c.data.params["train.lr"]: c for c in children}
    assert by_lr["0.001"].info.status == "FINISHED" and epoch_steps(tmp_path, by_lr["0.001"].info.run_id) == [0, 1]
    failed = by_lr["0.002"]
    assert failed.info.status == "FAILED" and "RuntimeError: boom at lr 0.002" in failed.data.tags["itr.failure"]
    assert {r["status"] for r in result.table} == {"finished", "failed"}

    # SIGTERM on the driver mid-sweep: Tune stops, every run it opened ends KILLED (none left RUNNING)
    path = space_doc(tmp_path, "sigterm", {"train.lr": {"grid": [3e-3]}}, base=base, resources={"cpu": 0.5})
    space = load_space(path)

    def send_sigterm_after_first_epoch():
        def first_epoch():
            _, kids = runs_of(tmp_path)
            kid = [k for k in kids if k.data.tags.get("itr.sweep") == "sigterm"]
            return kid and epoch_steps(tmp_path, kid[0].info.run_id)

        wait_for(first_epoch, 120, "the first epoch")
        os.kill(os.getpid(), signal.SIGTERM)

    def fallback(signum, frame):  # only if SIGTERM landed outside the sweep's own handler
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, fallback)
    killer = threading.Thread(target=send_sigterm_after_first_epoch, daemon=True)
    killer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(space, trial_fn=fake_trial, progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
        killer.join(5)
    parents, children = runs_of(tmp_path)
    parent = next(p for p in parents if p.data.tags["itr.sweep"] == "sigterm")
    kid = next(c for c in children if c.data.tags["itr.sweep"] == "sigterm")
    assert parent.info.status == "KILLED" and kid.info.status == "KILLED"
    assert "interrupted" in kid.data.tags["itr.failure"]
    assert all(r.info.status != "RUNNING" for r in parents + children)


@pytest.mark.ray
def test_sigkilled_driver_resumes_without_duplicates(tmp_path):
    _shutdown_inprocess_ray()
    base = sweep_base(tmp_path, epochs=2, max_steps_per_epoch=40)
    # epochs long enough (several seconds) that a 2 s snapshot (TUNE_GLOBAL_CHECKPOINT_S) catches a trial half-way
    base["data"]["synthetic"]["num_train_images"] = 1600
    path = space_doc(
        tmp_path,
        "killed",
        {"train.lr": {"grid": [1e-3, 5e-4, 2e-4, 1e-4]}},
        base=base,
        max_concurrent_trials=2,
        resources={"cpu": 1},
    )
    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--quiet"]
    sweep_folder = tmp_path / "runs" / "sweeps" / "killed"
    pgids: list[int] = []
    try:
        log_file = open(tmp_path / "first_driver.log", "w")
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=tagged_env(tag),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        pgids.append(proc.pid)

        def snapshot_trials() -> dict[str, tuple[str, int]] | None:
            """trial id -> (status, training_iteration of its registered checkpoint) in Tune's last synced experiment
            snapshot: what a resume reads. Tune registers a checkpoint after the result that carried it (a separate
            save step), so the checkpoint, not ``last_result``, says where a trial resumes. Tune writes the file in
            place, so a half-written one reads as None."""
            from ray import cloudpickle

            try:
                snapshot = json.loads(next(sweep_folder.glob("experiment_state-*.json")).read_text())
                trials = {}
                for trial_json, meta in snapshot["trial_data"]:
                    trial, meta = json.loads(trial_json), json.loads(meta)
                    manager = cloudpickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"]))
                    latest = manager.latest_checkpoint_result
                    trials[trial["trial_id"]] = (trial["status"], latest.metrics["training_iteration"] if latest else 0)
                return trials
            except (StopIteration, OSError, ValueError, KeyError, EOFError):
                return None

        def finished_and_half_run(trials: dict[str, tuple[str, int]]) -> tuple[set[str], set[str]]:
            """Trials that must not run again, and trials that must resume from their epoch-0 checkpoint."""
            return (
                {t for t, (status, _) in trials.items() if status == "TERMINATED"},
                {t for t, (status, it) in trials.items() if status != "TERMINATED" and it == 1},
            )

        def one_finished_one_half_run():
            # Poll the snapshot itself, not MLflow: the two concurrent trials run in lock-step, so "one finished
            # in MLflow, the other after epoch 0" is often gone by the next snapshot.
            trials = snapshot_trials()
            if not trials:
                return None
            done, half = finished_and_half_run(trials)
            return trials if done and half and len(done) < 4 else None

        wait_for(
            one_finished_one_half_run,
            300,
            "a snapshot with a finished and a half-run trial",
            proc,
            tmp_path / "first_driver.log",
            poll=0.1,
        )
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(10)
        log_file.close()
        kill_tagged(tag, tuple(pgids))  # the orphans: raylet, gcs_server, DashboardAgent, RuntimeEnvAgent, workers
        _, kids = runs_of(tmp_path)
        assert sum(k.info.status == "FINISHED" for k in kids) < 4, "the sweep finished before the kill"
        # the snapshot the resume reads (it may have been rewritten between the poll and the kill)
        trials = snapshot_trials()
        assert trials, "no readable experiment snapshot after the kill"
        # the others (none yet, or a result whose save Tune had not registered) start again, and MLflow must
        # still get each epoch once
        finished_ids, half_run = finished_and_half_run(trials)
        assert finished_ids and half_run, trials
        history_before = {
            k.data.tags["itr.trial_id"]: [
                (m.step, m.timestamp) for m in mlflow_client(tmp_path).get_metric_history(k.info.run_id, "epoch")
            ]
            for k in kids
            if k.data.tags["itr.trial_id"] in finished_ids
        }
        iterations_before = {tid: result_iterations(sweep_folder / f"trial_{tid}") for tid in finished_ids}

        resumed = subprocess.Popen(
            cmd + ["--resume"],
            cwd=tmp_path,
            env=tagged_env(tag),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        pgids.append(resumed.pid)
        out, _ = resumed.communicate(timeout=420)
        assert resumed.returncode == 0, out[-5000:]
        assert "rank" in out and "(resumed)" in out
    finally:
        for pgid in pgids:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_tagged(tag, tuple(pgids))

    parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    state = json.loads((sweep_folder / "itr_sweep.json").read_text())
    assert state["parent_run_id"] == parents[0].info.run_id
    trial_ids = [c.data.tags["itr.trial_id"] for c in children]
    assert len(children) == 4 and len(set(trial_ids)) == 4  # one child per trial, no duplicates
    for child in children:
        tid = child.data.tags["itr.trial_id"]
        assert child.info.status == "FINISHED", child.data.tags.get("itr.failure")
        assert epoch_steps(tmp_path, child.info.run_id) == [0, 1]  # every epoch once
        iterations = result_iterations(sweep_folder / f"trial_{tid}")
        assert iterations[-1] == 2 and sorted(set(iterations)) == [1, 2]
        if tid in half_run:  # resumed from its epoch-0 checkpoint: one more report, iteration 2
            lines = [
                json.loads(x)
                for x in (sweep_folder / f"trial_{tid}" / "result.json").read_text().splitlines()
                if x.strip()
            ]
            after = [x for x in lines if x["timestamp"] > killed_at + 1]
            assert [(x["training_iteration"], x["iterations_since_restore"]) for x in after] == [(2, 1)], [
                (x["training_iteration"], x["iterations_since_restore"], x["timestamp"]) for x in lines
            ]
        if tid in finished_ids:  # finished before the kill: not rerun
            after = [
                (m.step, m.timestamp) for m in mlflow_client(tmp_path).get_metric_history(child.info.run_id, "epoch")
            ]
            assert after == history_before[tid]
            assert iterations == iterations_before[tid] == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_sweep_runs_on_an_existing_cluster_through_ray_address(tmp_path, monkeypatch, fakes_by_value):
    _shutdown_inprocess_ray()
    from orchestrator.sweep import run_sweep

    port = _free_port()
    tag = uuid.uuid4().hex
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp_root = tempfile.mkdtemp(prefix="itr-rt-", dir="/tmp")
    env = tagged_env(tag, RAY_TMPDIR=temp_root)
    pgids: list[int] = []
    try:
        starter = subprocess.Popen(
            [
                ray_bin,
                "start",
                "--head",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        pgids.append(starter.pid)
        out, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0, out[-3000:]
        address = f"127.0.0.1:{port}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        path = space_doc(
            tmp_path,
            "external",
            {"train.seed": {"grid": [0, 1]}},
            base=sweep_base(tmp_path, epochs=2),
            max_concurrent_trials=2,
            resources={"cpu": 0.5},
        )
        result = run_sweep(load_space(path), trial_fn=fake_trial, progress=False)
        import ray

        gcs = ray.get_runtime_context().gcs_address  # the cluster's (Ray may name it by the host's IP)
        node_ids = {n["NodeID"] for n in ray.nodes()}
        ray.shutdown()
        assert gcs.endswith(f":{port}")
        _, children = runs_of(tmp_path)
        assert len(children) == 2 and len(result.table) == 2
        for child in children:
            assert child.info.status == "FINISHED"
            assert child.data.tags["itr.ray_gcs_address"] == gcs  # the trial ran in that cluster
            assert child.data.tags["itr.ray_node_id"] in node_ids
            assert epoch_steps(tmp_path, child.info.run_id) == [0, 1]
    finally:
        _shutdown_inprocess_ray()
        if os.environ.get("ITR_TEST_RAY_STOP_ALL") == "1":  # machine-wide: only where nothing else runs Ray
            subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=60)
        for pgid in pgids:  # `ray stop` would stop every Ray cluster on the machine; this one only
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_tagged(tag, tuple(pgids))
        shutil.rmtree(temp_root, ignore_errors=True)


@pytest.mark.ray
def test_a_sweep_continued_against_another_tracking_store_is_refused(tmp_path, fakes_by_value, monkeypatch):
    """Its finished trials live in the first store only (Tune will not run them again): continuing against a new
    MLFLOW_TRACKING_URI must not end with an empty parent run and no leaderboard; it is refused, naming both."""
    from orchestrator.sweep import run_sweep

    base = sweep_base(tmp_path, epochs=1)
    base["tracking"].pop("uri", None)
    path = space_doc(tmp_path, "moved", {"train.lr": {"grid": [1e-3]}}, base=base, resources={"cpu": 1})
    first, second = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'second.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first)
    result = run_sweep(load_space(path), trial_fn=fake_trial, progress=False)
    assert len(result.records) == 1 and result.table
    state_file = tmp_path / "runs" / "sweeps" / "moved" / "itr_sweep.json"
    state = state_file.read_text()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", second)
    with pytest.raises(UserError) as info:
        run_sweep(load_space(path), trial_fn=fake_trial, progress=False)
    message = str(info.value)
    assert result.parent_run_id in message and first in message and second in message and "--name" in message
    assert state_file.read_text() == state  # nothing rewritten
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=second).get_experiment_by_name("sweeps")
    assert exp is None or not MlflowClient(tracking_uri=second).search_runs([exp.experiment_id])
