"""``itr train`` through each training input path (issue 15), on a small coco-mini subset, through Ray Train, all
sharing one Ray cluster: the decoded-image cache (no JPEG opened by the training epoch), augmented loader workers
(the pipeline's throughput and starvation metrics in the MLflow record), and webdataset shards read by 2 Ray Train
workers (each rank opens disjoint shards that together cover the list; the run recorded in one MLflow run, read
back via MlflowClient: the checks of the former test_ray_mlflow.py, which started a cluster of its own).

JPEG opens are counted inside the Ray worker processes by a ``worker_process_setup_hook`` that wraps
``PIL.Image.open`` and ``open`` and records, per process, each ``.jpg`` opened and whether the training epoch or the
validation (``EpochRunner.train_one_epoch``, ``train_loop``'s ``validate``) was on the stack when it was opened.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from orchestrator.config import validate_config
from orchestrator.data.shard_loader import TRACE_ENV
from orchestrator.data.shards import shard_paths
from tests.conftest import COCO_MINI, tiny_tree
from tests.test_bad_input import run_cli
from tests.test_input_pipeline import mini_coco

pytestmark = pytest.mark.ray

TRAIN_IMAGES, VAL_IMAGES, SHARD_SIZE, BATCH = 32, 8, 4, 8


def jpeg_open_recorder(folder: str) -> Callable[[], None]:
    """A Ray worker setup hook: in every worker process (and the loader processes it forks), each open of a
    ``.jpg`` appends ``<phase> <how> <path>`` to ``folder/<pid>.txt``. ``how``: ``pil`` (``PIL.Image.open``, one
    per decode) or ``open`` (the file itself, which ``PIL.Image.open`` of a path also does); ``phase``: the
    innermost of ``train_one_epoch`` (the training epoch), ``validate`` (train_loop's validation) or ``train_loop``
    (its setup) on the stack, else ``other`` (e.g. a Ray task building the decoded-image cache)."""

    def install() -> None:
        import builtins
        import io
        import sys

        from PIL import Image

        real_open, real_pil = builtins.open, Image.open
        phases = {("epoch.py", "train_one_epoch"), ("train_loop.py", "validate"), ("train_loop.py", "train_loop")}

        def record(path, how: str) -> None:
            if not (isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".jpg")):
                return
            phase, frame = "other", sys._getframe()
            while frame is not None and phase == "other":
                head, name = os.path.split(frame.f_code.co_filename)
                if os.path.basename(head) == "orchestrator" and (name, frame.f_code.co_name) in phases:
                    phase = frame.f_code.co_name
                frame = frame.f_back
            with real_open(os.path.join(folder, f"{os.getpid()}.txt"), "a", encoding="utf-8") as fh:
                fh.write(f"{phase} {how} {os.fspath(path)}\n")

        def pil_open(fp, *args, **kwargs):
            record(fp, "pil")
            return real_pil(fp, *args, **kwargs)

        def plain_open(file, *args, **kwargs):
            record(file, "open")
            return real_open(file, *args, **kwargs)

        Image.open = pil_open
        builtins.open = io.open = plain_open

    return install


class Opened(NamedTuple):
    pid: int
    phase: str
    how: str
    path: str


class Traces:
    """The module's trace folders: ``shards`` (``ITR_SHARD_TRACE``: each rank's opened shards) and ``opens``."""

    def __init__(self, root: Path) -> None:
        self.shards, self.opens = root / "shards", root / "opens"
        self.shards.mkdir()
        self.opens.mkdir()

    def jpeg_opens(self) -> list[Opened]:
        """Every JPEG opened in the Ray worker processes since the last ``clear``."""
        return [
            Opened(int(path.stem), *line.split(" ", 2))
            for path in self.opens.glob("*.txt")
            for line in path.read_text().splitlines()
        ]

    def shards_opened(self, rank: int) -> dict[int, list[str]]:
        """epoch -> the shards rank ``rank`` opened in it, in order."""
        out: dict[int, list[str]] = defaultdict(list)
        for line in (self.shards / f"rank{rank}.txt").read_text().splitlines():
            epoch, _worker, path = line.split(" ", 2)
            out[int(epoch)].append(path)
        return out

    def clear(self) -> None:
        for folder in (self.shards, self.opens):
            for path in folder.iterdir():
                path.unlink()


@pytest.fixture(scope="module")
def ray_traced(tmp_path_factory):
    """One 2-CPU Ray cluster for the module; its workers inherit ``ITR_SHARD_TRACE`` and record JPEG opens."""
    import ray

    traces = Traces(tmp_path_factory.mktemp("trace"))
    os.environ[TRACE_ENV] = str(traces.shards)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": jpeg_open_recorder(str(traces.opens))},
    )
    yield traces
    ray.shutdown()
    os.environ.pop(TRACE_ENV, None)


@pytest.fixture
def traces(ray_traced):
    ray_traced.clear()
    return ray_traced


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """A captions_json dataset of the first 32 coco-mini train images and 8 val images (symlinks)."""
    if not (COCO_MINI / "train.json").is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    return mini_coco(tmp_path_factory.mktemp("data"), COCO_MINI, images=TRAIN_IMAGES)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """One MLflow store for the module (its schema is created once); each test its own experiment."""
    return tmp_path_factory.mktemp("mlflow")


def split_images(root: Path, split: str) -> set[str]:
    """The image paths of ``split``, read from its JSON here."""
    return {str(root / record["image"]) for record in json.loads((root / f"{split}.json").read_text())}


def train_cli(
    tmp_path: Path, data: dict, *, store: Path | None = None, scaling: dict | None = None, epochs: int = 1
) -> tuple[dict, str, str | None]:
    """(config tree, stdout, MLflow run id) of ``itr train`` (in-process) with the tiny model: ``epochs`` epochs
    of batch 8 on ``data``, 1 Ray Train worker of 1 CPU unless ``scaling`` says otherwise, tracked in ``store``
    (experiment ``tmp_path``'s name) or not at all."""
    tracking = {"enabled": False}
    if store is not None:
        tracking = {
            "uri": f"sqlite:///{store / 'mlflow.db'}",
            "artifact_dir": str(store / "mlartifacts"),
            "experiment": tmp_path.name,
        }
    tree = tiny_tree(
        tmp_path,
        data={"format": "captions_json", "image_cache": "none", **data},
        train={"epochs": epochs, "batch_size": BATCH, "eval_at_start": False, "max_steps_per_epoch": None},
        scaling={"backend": "ray", "num_workers": 1, "cpus_per_worker": 1, **(scaling or {})},
        eval={"reports": False},
    )
    tree["data"].pop("synthetic")
    tree["tracking"] = tracking
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    rc, lines, out = run_cli(["train", str(tmp_path / "config.yaml")], tmp_path)
    assert rc == 0, lines[-5:]
    assert "val/rsum" in out and "val/i2t_r1" in out, out
    run_id = next((line.split()[2] for line in out.splitlines() if line.startswith("MLflow run ")), None)
    return tree, out, run_id


# ------------------------------------------------------------------------------------------ cache
def test_decoded_cache_path_trains_without_the_epoch_opening_a_jpeg(tmp_path, mini, traces):
    """``data.image_cache: decoded``: ``itr train``'s driver decodes every image once into the cache (as Ray tasks,
    a cluster being up) before the Ray Train worker starts; its epoch and validation read rows, no JPEG."""
    from orchestrator.config import ModelConfig
    from orchestrator.data.image_cache import PixelStore
    from orchestrator.data.pixels import split_preprocess
    from orchestrator.models.student import build_student

    cache = tmp_path / "cache"
    train_cli(tmp_path, {"root": str(mini), "image_cache": "decoded", "image_cache_dir": str(cache)})
    opens = traces.jpeg_opens()
    assert not [o for o in opens if o.phase in ("train_one_epoch", "validate")], opens
    # where there are opens the hook sees them: the Ray tasks of the driver's build decoded each image once
    decoded = Counter(o.path for o in opens if o.how == "pil")
    images = split_images(mini, "train") | split_images(mini, "val")
    assert set(decoded) == images and set(decoded.values()) == {1}, decoded
    # the worker found each image's content hash and header check recorded by the driver: it opened none at all
    assert {o.phase for o in opens} == {"other"}
    transform = split_preprocess(build_student(ModelConfig(name="itr-tiny-vit")).preprocess, "itr-tiny-vit")
    assert len(PixelStore.for_transform(cache, transform).keys()) == TRAIN_IMAGES + VAL_IMAGES


# ------------------------------------------------------------------------------------------ augmented
def test_augmented_path_decodes_in_a_loader_worker_and_reports_pipeline_metrics(tmp_path, mini, mlflow_store, traces):
    """``data.augment: open_clip`` with ``data.loader_workers: 1`` inside the Ray Train worker: each pair's image
    decoded (and augmented) in the worker's loader process, and the run's MLflow record holds the pipeline's
    throughput and starvation metrics."""
    from mlflow.tracking import MlflowClient

    _, _, run_id = train_cli(
        tmp_path, {"root": str(mini), "augment": "open_clip", "loader_workers": 1}, store=mlflow_store
    )
    metrics = MlflowClient(f"sqlite:///{mlflow_store / 'mlflow.db'}").get_run(run_id).data.metrics
    assert metrics["train/pairs_per_s"] > 0 and 0.0 <= metrics["train/data_wait_fraction"] <= 1.0
    assert {"val/rsum", "val/i2t_r1", "val/t2i_r1"} <= set(metrics)
    decodes = [o for o in traces.jpeg_opens() if o.how == "pil"]
    epoch = [o for o in decodes if o.phase == "train_one_epoch"]
    assert len({o.pid for o in epoch}) == 1  # one loader process ...
    assert {o.pid for o in epoch}.isdisjoint({o.pid for o in decodes if o.phase != "train_one_epoch"})  # ... alone
    assert len(epoch) == metrics["train/steps"] * BATCH and {o.path for o in epoch} <= split_images(mini, "train")
    validation = sorted(o.path for o in decodes if o.phase == "validate")  # data.image_cache: none
    assert validation == sorted(split_images(mini, "val"))


# ------------------------------------------------------------------------------------------ shards
def test_shards_path_with_two_ray_train_workers_reads_disjoint_shards(
    tmp_path, mini, mlflow_store, traces, monkeypatch
):
    """``itr write-shards``, then ``itr train`` on the shards with 2 Ray Train workers (DDP, the batch gathered over
    both) for 2 epochs: each epoch the two ranks open disjoint shards that cover the list, in a new order; the run
    is one MLflow run, read back via MlflowClient."""
    rc, lines, out = run_cli(
        ["write-shards", "--root", str(mini), "--out", str(tmp_path / "shards"), "--shard-size", str(SHARD_SIZE)],
        tmp_path,
    )
    assert rc == 0, lines
    pattern = next(line.split("data.shards: ")[1] for line in out.splitlines() if "data.shards: " in line)
    every = sorted(str(p) for p in shard_paths(pattern))
    assert len(every) == TRAIN_IMAGES // SHARD_SIZE
    tree, out, run_id = train_cli(
        tmp_path,
        {"format": "webdataset", "shards": pattern, "root": str(mini), "loader_workers": 0},
        store=mlflow_store,
        scaling={"num_workers": 2, "gather_global_batch": True},
        epochs=2,
    )
    opened = [traces.shards_opened(rank) for rank in (0, 1)]
    for epoch in (0, 1):
        a, b = opened[0][epoch], opened[1][epoch]
        assert a and b and not set(a) & set(b)  # disjoint
        assert sorted(set(a) | set(b)) == every  # covering: 2 steps x 8 = 16 of each rank's 16 samples
    assert opened[0][0] != opened[0][1]  # a new shard order in the second epoch
    monkeypatch.chdir(tmp_path)  # as itr train ran: relative defaults (teachers.cache_dir) resolve against the cwd
    assert_tracked_in_mlflow(validate_config(tree), run_id, out, tmp_path)


def assert_tracked_in_mlflow(cfg, run_id: str, out: str, tmp_path: Path) -> None:
    """The 2-worker run is the experiment's one MLflow run, FINISHED, with its params, tags, per-epoch metric
    history and artifacts, its final metrics those ``itr train`` printed (``out``); the two workers split each
    global step (2 steps of 8 per rank and epoch)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.artifact_location == Path(cfg.tracking.artifact_dir).resolve().as_uri()
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    params = run.data.params
    assert params["scaling.num_workers"] == "2" and params["loss.family"] == "infonce"
    assert params["train.lr"] == "0.001" and params["model.name"] == "itr-tiny-vit"
    tags = run.data.tags
    assert tags["itr.config_hash"] == cfg.config_hash() and tags["itr.device"].startswith("cpu")
    assert "itr.version.torch" in tags and tags["itr.best_checkpoint"]
    for key in ("train/loss", "train/infonce", "train/temperature/tau", "val/i2t_r1", "val/t2i_r10", "val/rsum"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json"} <= artifacts
    final = json.loads(Path(client.download_artifacts(run_id, "final_metrics.json", str(tmp_path))).read_text())
    printed = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith("val/")}
    assert final["val/rsum"] == pytest.approx(run.data.metrics["val/rsum"])
    assert printed["val/rsum"] == pytest.approx(final["val/rsum"], abs=5e-3)  # printed with 2 decimals
    assert final["train/steps"] == 2 * TRAIN_IMAGES // (BATCH * 2)
