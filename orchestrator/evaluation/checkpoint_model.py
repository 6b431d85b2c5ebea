"""Load a trained student from a checkpoint (its embedded config, or a given one) for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import ExperimentConfig
from orchestrator.errors import UserError

if TYPE_CHECKING:  # imported where a model is built: the module pulls in the model registry
    from orchestrator.models.student import Student

__all__ = ["LoadedModel", "load_checkpoint_model"]


@dataclass
class LoadedModel:
    """``student``: the model (on the CPU, eval-ready), its preprocess and tokenizer; ``cfg`` the config used;
    ``path`` the model file."""

    cfg: ExperimentConfig
    student: Student
    path: Path
    epoch: int | None = None  # the (0-based) epoch the checkpoint was saved after, when it says


def load_checkpoint_model(
    checkpoint: Path | str,
    *,
    config: str | None = None,
    overrides: Sequence[str] = (),
    experiment: ExperimentConfig | None = None,
) -> LoadedModel:
    """The student stored in ``checkpoint`` (a checkpoint folder or its ``model.pt``).

    The architecture comes from ``experiment`` when given, else from the YAML ``config``, else from the
    checkpoint's embedded config (``overrides``, ``a.b=value``, apply to the last two); a state dict that does
    not fit is a ``UserError`` naming the file.
    """
    from orchestrator.checkpoint import load_file, model_file
    from orchestrator.config import apply_overrides, load_config, validate_config
    from orchestrator.models.student import build_student

    path = model_file(Path(checkpoint))
    ckpt = load_file(path)
    if "model" not in ckpt or "config_yaml" not in ckpt:
        raise UserError("not a model checkpoint of this project (no model/config_yaml)", path=str(path))
    if experiment is not None:
        cfg = experiment
    elif config:
        cfg = load_config(config, list(overrides))
    else:
        from orchestrator.yaml_io import parse_yaml

        source = f"{path} (embedded config)"
        if not isinstance(ckpt["config_yaml"], str):
            raise UserError("the embedded config_yaml is not text", path=str(path), field="config_yaml")
        tree = parse_yaml(ckpt["config_yaml"], source).tree
        if not isinstance(tree, dict):
            raise UserError(f"the top level must be a mapping, not {type(tree).__name__}", path=source)
        cfg = validate_config(apply_overrides(tree, list(overrides)), source=source)
    student = build_student(cfg.model, heads=cfg.resolved_heads)
    try:
        student.model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(f"checkpoint does not fit model {cfg.model.name!r}: {first}", path=str(path)) from None
    student.model.eval()
    epoch = ckpt.get("epoch")
    return LoadedModel(cfg=cfg, student=student, path=path, epoch=int(epoch) if isinstance(epoch, int) else None)
