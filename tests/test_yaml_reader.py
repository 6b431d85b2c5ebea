"""The shared YAML reader (``orchestrator/yaml_io.py``) at every entry point that reads YAML: configs, ``--set``
values, search spaces, recipes, tracked text artifacts and checkpoints' embedded configs.

Alias bombs and recursive aliases are rejected in well under a second, duplicate keys name both lines, python tags
are bad input (exit 2, one line), and config ints and bools are strict while floats take numeric strings.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.yaml_io import ALIAS_BUDGET, parse_yaml
from tests.test_bad_input import assert_one_line_error, base_tree, run_cli, snapshot

REPO = Path(__file__).resolve().parent.parent
#: a 7-level, 10-wide bomb expands to 10^7 leaves: the old reader took seconds on it, the new one milliseconds
LEVELS = 7


def flow_bomb(levels: int, width: int = 10) -> str:
    """One line of flow YAML: ``[&l0 [1, ...], &l1 [*l0, ...], ...]``; level k expands to width^(k+1) leaves."""
    items = ["&l0 [" + ", ".join(["1"] * width) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def timed_cli(argv: list[str], cwd: Path) -> tuple[int, list[str], float]:
    """(rc, stderr lines, seconds) of ``itr argv``; the module imports of the command were warmed up first."""
    t0 = time.perf_counter()
    rc, lines, _ = run_cli(argv, cwd)
    return rc, lines, time.perf_counter() - t0


def config_text(tmp: Path, extra: str) -> str:
    """The valid tiny config of test_bad_input followed by ``extra`` (so ``extra`` starts on a known line)."""
    return yaml.safe_dump(base_tree(tmp), sort_keys=False) + extra


def n_lines(text: str) -> int:
    return len(text.splitlines())


def warm(command: str, tmp: Path) -> None:
    """Import what ``itr <command>`` imports (a missing file fails after the imports), so timings see the reader."""
    run_cli([command, str(tmp / "missing.yaml")], tmp)


# ------------------------------------------------------------------------------------------ the reader
@pytest.mark.parametrize(
    "text",
    [
        "a: " + flow_bomb(10) + "\n",  # the 10 levels: 10^10 leaves
        "a: " + flow_bomb(40, width=2) + "\n",  # 2^40
        # no exponential growth: 100 aliases of a 101-node mapping add 10,100 nodes, just over the budget
        "a: &a {" + ", ".join(f"x{i}: 1" for i in range(50)) + "}\n" + "".join(f"k{i}: *a\n" for i in range(100)),
    ],
)
def test_alias_bombs_are_rejected_in_milliseconds(text):
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=rf"^src:\d+:a?[\w.]*: YAML aliases expand to more than {ALIAS_BUDGET}"):
        parse_yaml(text, "src")
    assert time.perf_counter() - t0 < 0.5


def test_aliases_within_the_budget_are_plain_copies():
    text = "a: &a {x: [1, 2]}\nb: *a\nc: [*a, *a]\nd:\n  <<: *a\n  y: 3\n"
    tree = parse_yaml(text, "src").tree
    assert tree == {
        "a": {"x": [1, 2]},
        "b": {"x": [1, 2]},
        "c": [{"x": [1, 2]}, {"x": [1, 2]}],
        "d": {"x": [1, 2], "y": 3},
    }
    tree["b"]["x"].append(9)  # an alias is a copy: changing it (as --set does) leaves its anchor alone
    assert tree["a"] == {"x": [1, 2]} and tree["c"][0] == {"x": [1, 2]}


@pytest.mark.parametrize(
    "text, where, field",
    [
        ("train: &a {self: *a}\n", "src:1", "train.self"),
        ("x: 1\ntrain: &a\n  lr: 1\n  deep:\n    - *a\n", "src:5", "train.deep.0"),
    ],
)
def test_recursive_alias_names_line_and_field(text, where, field):
    with pytest.raises(UserError) as info:
        parse_yaml(text, "src")
    assert str(info.value) == f"{where}:{field}: recursive YAML alias (it refers to a node that contains it)"


@pytest.mark.parametrize(
    "text, where, field, lines",
    [
        ("train:\n  epochs: 3\n  lr: 1\n  epochs: 500\n", "src:4", "train.epochs", (2, 4)),
        ("a: 1\n'a': 2\n", "src:2", "a", (1, 2)),  # quoted and plain: the same key
        ("l:\n  - {k: 1, j: 2, k: 3}\n", "src:2", "l.0.k", (2, 2)),
    ],
)
def test_duplicate_keys_name_both_lines(text, where, field, lines):
    with pytest.raises(UserError) as info:
        parse_yaml(text, "src")
    assert str(info.value) == f"{where}:{field}: key given twice (lines {lines[0]} and {lines[1]}); remove one"


def test_python_tags_and_deep_nesting_are_user_errors():
    with pytest.raises(UserError, match=r"^src:2:model.name: YAML tag !!python/name:os.getcwd is not allowed"):
        parse_yaml("model:\n  name: !!python/name:os.getcwd ''\n", "src")
    with pytest.raises(UserError, match=r"^src: YAML nested too deeply$"):
        parse_yaml("a: " + "[" * 1000 + "]" * 1000 + "\n", "src")


def test_every_shipped_yaml_file_reads():
    files = sorted(p for d in ("configs", "search_spaces", "recipes") for p in (REPO / d).glob("*.yaml"))
    assert len(files) >= 15
    for path in files:
        assert isinstance(parse_yaml(path.read_text(encoding="utf-8"), str(path)).tree, dict), path


# ------------------------------------------------------------------------------------ every entry point
def test_config_alias_bomb_and_recursion_exit_2_fast(tmp_path):
    warm("train", tmp_path)
    for extra, needle in (
        (f"bomb: {flow_bomb(LEVELS)}\n", f"YAML aliases expand to more than {ALIAS_BUDGET}"),
        ("loops: &a {self: *a}\n", "recursive YAML alias"),
    ):
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(config_text(tmp_path, extra))
        before = snapshot(tmp_path)
        rc, lines, seconds = timed_cli(["train", str(cfg)], tmp_path)
        line = n_lines(cfg.read_text())
        assert_one_line_error(rc, lines, f"{cfg}:{line}:", needle)
        assert seconds < 1.0, seconds
        assert snapshot(tmp_path) == before


def test_config_duplicate_key_names_both_lines_and_runs_nothing(tmp_path):
    tree = base_tree(tmp_path)
    tree["train"].update(max_steps_per_epoch=1, eval_at_start=False)
    text = yaml.safe_dump(tree, sort_keys=False)
    first = next(i for i, t in enumerate(text.splitlines(), 1) if t.strip().startswith("epochs:"))
    text = text.replace("  epochs: 1\n", "  epochs: 1\n  epochs: 2\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    before = snapshot(tmp_path)
    rc, lines, _ = run_cli(["train", str(cfg)], tmp_path)
    assert_one_line_error(rc, lines, f"{cfg}:{first + 1}:train.epochs: key given twice (lines {first} and {first + 1})")
    assert snapshot(tmp_path) == before


def test_set_value_bomb_and_duplicate_are_rejected(tmp_path):
    space = tmp_path / "space.yaml"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base_tree(tmp_path)))
    space.write_text("base: base.yaml\nspace:\n  train.lr: {grid: [1.0e-3, 2.0e-3]}\n")
    assert run_cli(["sweep", str(space), "--dry-run"], tmp_path)[0] == 0  # the space itself is fine
    rc, lines, seconds = timed_cli(
        ["sweep", str(space), "--dry-run", "--set", f"tracking.tags={flow_bomb(LEVELS)}"], tmp_path
    )
    assert_one_line_error(rc, lines, "--set:tracking.tags:", "YAML aliases expand to more than", "(from --set)")
    assert seconds < 1.0, seconds
    rc, lines, _ = run_cli(["sweep", str(space), "--dry-run", "--set", "train={epochs: 1, epochs: 2}"], tmp_path)
    assert_one_line_error(rc, lines, "--set:train:", "key given twice", "(from --set)")


@pytest.mark.parametrize("kind", ["space", "recipe"])
def test_space_and_recipe_bomb_recursion_duplicates(tmp_path, kind):
    command = "sweep" if kind == "space" else "reproduce"
    warm(command, tmp_path)
    path = tmp_path / f"{kind}.yaml"
    head = "base: base.yaml\n" if kind == "space" else "name: r\n"
    for extra, where, message in (
        (f"x: {flow_bomb(LEVELS)}\n", "3:x.", "YAML aliases expand to more than"),
        ("x: &a [1, *a]\n", "3:x.1:", "recursive YAML alias"),
        ("x: {a: 1}\nx: 2\n", "4:x:", "key given twice (lines 3 and 4)"),
    ):
        path.write_text(head + "description: d\n" + extra)
        rc, lines, seconds = timed_cli([command, str(path), "--dry-run"], tmp_path)
        assert_one_line_error(rc, lines, f"{path}:{where}", message)
        assert seconds < 1.0, (extra[:20], seconds)


def test_tracked_artifact_with_alias_bomb_is_redacted_fast():
    from orchestrator.tracking import redact_text

    text = f"tracking:\n  tags: {{api_token: s3cr3t}}\nbomb: {flow_bomb(LEVELS)}\n"
    t0 = time.perf_counter()
    out = redact_text("config.yaml", text)
    assert time.perf_counter() - t0 < 0.5
    assert "s3cr3t" not in out
    plain = f"bomb: {flow_bomb(LEVELS)}\n"
    assert redact_text("notes.yaml", plain) == plain  # no secret: logged as it is


def _checkpoint_with_config(tmp_path: Path, config_yaml: str) -> Path:
    from orchestrator.checkpoint import MODEL_FILE, atomic_save

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    atomic_save({"model": {}, "model_name": "itr-tiny-vit", "config_yaml": config_yaml, "epoch": 0}, ckpt / MODEL_FILE)
    return ckpt / MODEL_FILE


@pytest.mark.parametrize(
    "config_yaml, needle",
    [
        (
            "model:\n  name: !!python/object/apply:os.getcwd []\n",
            ":2:model.name: YAML tag !!python/object/apply:os.getcwd is not allowed",
        ),
        (f"model: {{name: itr-tiny-vit}}\nbomb: {flow_bomb(LEVELS)}\n", ":2:bomb."),
        ("model: &a {name: *a}\n", ":1:model.name: recursive YAML alias"),
        ("model: {name: itr-tiny-vit}\nmodel: {name: itr-small-vit}\n", ":2:model: key given twice (lines 1 and 2)"),
    ],
)
def test_checkpoint_embedded_config_is_read_strictly(tmp_path, config_yaml, needle):
    model = _checkpoint_with_config(tmp_path, config_yaml)
    before = snapshot(tmp_path)
    rc, lines, _ = run_cli(["eval", "--checkpoint", str(model.parent)], tmp_path)
    assert_one_line_error(rc, lines, f"{model} (embedded config){needle}")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- coercions
@pytest.mark.parametrize(
    "override, field, kind",
    [
        ("train.epochs=yes", "train.epochs", "integer"),  # YAML's yes is True, which pydantic made 1
        ("train.epochs=true", "train.epochs", "integer"),
        ("train.epochs='3'", "train.epochs", "integer"),
        ("train.epochs=3.0", "train.epochs", "integer"),
        ("data.synthetic.image_size=yes", "data.synthetic.image_size", "integer"),
        ("train.batch_size='8'", "train.batch_size", "integer"),
        ("model.lock_image=1", "model.lock_image", "boolean"),
        ("train.resume='yes'", "train.resume", "boolean"),
        ("scaling.use_gpu=1", "scaling.use_gpu", "true, false or auto"),
        ("scaling.use_gpu=yes!", "scaling.use_gpu", "true, false or auto"),
        ("eval.reports=0", "eval.reports", "boolean"),
    ],
)
def test_ints_and_bools_are_strict(override, field, kind):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert info.value.field == field and kind in info.value.detail and "(from --set)" in info.value.detail


def test_floats_ints_and_auto_still_accepted(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  lr: 1e-4\n  min_lr: 0\n  epochs: 3\nscaling:\n  use_gpu: auto\n")  # 1e-4: a string
    assert yaml.safe_load(cfg.read_text())["train"]["lr"] == "1e-4"
    c = load_config(cfg, ["train.lr=2e-4", "train.epochs=4", "train.grad_clip=1"])
    assert (c.train.lr, c.train.min_lr, c.train.epochs, c.train.grad_clip) == (2e-4, 0.0, 4, 1.0)
    assert c.scaling.use_gpu == "auto"
    assert load_config(cfg, ["scaling.use_gpu=true", "model.lock_image=false"]).scaling.use_gpu is True
    assert load_config(cfg).train.lr == 1e-4


def test_bad_int_on_the_cli_is_one_line(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(config_text(tmp_path, ""))
    before = snapshot(tmp_path)
    rc, lines, _ = run_cli(["train", str(cfg), "--set", "train.epochs=yes"], tmp_path)
    assert_one_line_error(rc, lines, f"{cfg}:train.epochs: Input should be a valid integer (got True) (from --set)")
    assert snapshot(tmp_path) == before
