"""Provenance tags of a run: the config's hash, loss family and model, and the host's git commit, package
versions, Python and device (looked up once per process)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from orchestrator.config import ExperimentConfig
from orchestrator.tracking.redaction import redact

#: packages whose installed versions are tagged ``itr.version.<name>``
VERSIONED_PACKAGES = ("torch", "open_clip_torch", "ray", "mlflow", "pydantic")


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Provenance tags: config hash, loss family, model, git commit, package versions, host device, and the
    config's own ``tracking.tags`` (redacted)."""
    tags = {"itr.config_hash": cfg.config_hash(), "itr.loss_family": cfg.loss.family, "itr.model": cfg.model.name}
    tags.update(host_tags())
    tags.update(redact(cfg.tracking.tags))
    return tags


def host_tags() -> dict[str, str]:
    """``itr.python``, ``itr.version.*``, ``mlflow.source.git.commit`` and ``itr.device`` of this process (a copy:
    looked up once, so a sweep's hundred trials do not each run git and query the device)."""
    return dict(_host_tags())


@functools.lru_cache(maxsize=1)
def _host_tags() -> dict[str, str]:
    tags = {"itr.python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            tags[f"itr.version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        import torch

        tags["itr.device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    except Exception:  # pragma: no cover - device query is best effort
        pass
    return tags


def git_commit() -> str | None:
    """The checkout's ``HEAD`` commit, or None (no git, not a checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
