"""Model names: open_clip's built-in architectures plus the JSON configs shipped in this project."""
from __future__ import annotations

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


_registered = False


def register_project_models() -> None:
    """Make the project's JSON architectures known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(PROJECT_CONFIG_DIR)
    _registered = True
