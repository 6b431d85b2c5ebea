"""``itr eval``'s output files: checked before anything runs, written atomically.

* An output (``--json``, ``--export-embeddings``, the files ``--report-dir`` writes) that is one of the command's
  inputs is refused: the checkpoint's files, the dataset's annotation and image files (an existing file anywhere
  under ``data.root``), the teacher cache, ``--embeddings``, ``--image-folder`` and ``--sts``. Paths are compared
  resolved (symlinks followed) and, where the output exists, with ``os.path.samefile`` (hard links).
* Two outputs naming one file are refused.
* Every output's folder must exist or be creatable, and be writable: a temporary file is created there and removed
  (no folder is created by the check itself).
* The files themselves are written with :func:`orchestrator.checkpoint.atomic_write` (temp file beside the target,
  fsync, rename; the temp file removed on any failure).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserError

__all__ = ["REPORT_FILE_NAMES", "EvalInputs", "Output", "check_outputs", "planned_outputs"]

#: The files ``--report-dir`` may write (see :func:`orchestrator.evaluation.reports.write_reports`).
REPORT_FILE_NAMES = ("recall_curves.png", "tsne.png", "case_study.png", "metrics.json")


@dataclass(frozen=True)
class Output:
    """One file the command will write; ``flag`` names the option it comes from."""

    path: Path
    flag: str


@dataclass
class EvalInputs:
    """What the command reads: single ``files`` and ``trees`` (folders; any existing file below one is an input)."""

    files: list[tuple[Path, str]]  # (path, what it is)
    trees: list[tuple[Path, str]]

    def add_file(self, path: Path | str | None, what: str) -> None:
        if path is not None:
            self.files.append((Path(path), what))

    def add_tree(self, path: Path | str | None, what: str) -> None:
        if path is not None:
            self.trees.append((Path(path), what))


def planned_outputs(*, json_path: Path | None, export_embeddings: Path | None, report_dir: Path | None) -> list[Output]:
    """The files ``itr eval`` will write for these options (report folders: every file a report may hold)."""
    outs: list[Output] = []
    if json_path is not None:
        outs.append(Output(Path(json_path), "--json"))
    if export_embeddings is not None:
        outs.append(Output(Path(export_embeddings), "--export-embeddings"))
    if report_dir is not None:
        outs += [Output(Path(report_dir) / name, "--report-dir") for name in REPORT_FILE_NAMES]
    return outs


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _same(a: Path, b: Path) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _under(path: Path, tree: Path) -> bool:
    real, root = _real(path), _real(tree)
    return real == root or root in real.parents


def _check_not_input(out: Output, inputs: EvalInputs, bulk: frozenset[str]) -> None:
    for path, what in inputs.files:
        if _same(out.path, path):
            raise UserError(
                f"is an input of this command ({what}); choose another output path", path=str(out.path), field=out.flag
            )
    if str(_real(out.path)) in bulk:
        raise UserError(
            "is an input of this command (a dataset image); choose another output path",
            path=str(out.path),
            field=out.flag,
        )
    if out.path.exists() and not out.path.is_dir():
        for tree, what in inputs.trees:
            if _under(out.path, tree):
                raise UserError(
                    f"would overwrite a file of {what} ({tree}); choose another output path",
                    path=str(out.path),
                    field=out.flag,
                )


def _check_writable(out: Output, *, folder: bool = False) -> None:
    """The output's folder exists (or its nearest existing ancestor does) and accepts a new file."""
    target = Path(out.path).expanduser()
    if not folder and target.is_dir():
        raise UserError("is a folder; give a file name", path=str(target), field=out.flag)
    parent = target if folder else target.parent
    probe = parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write here: {probe} is not a folder", path=str(target), field=out.flag)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write here: folder {probe} is not writable", path=str(target), field=out.flag)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".itr-write-check-", dir=probe)
    except OSError as err:
        raise UserError(f"cannot write here ({err.strerror or err})", path=str(target), field=out.flag) from None
    os.close(fd)
    os.unlink(tmp)


def check_outputs(
    outputs: Sequence[Output], inputs: EvalInputs, *, bulk_inputs: Iterable[Path] = (), report_dir: Path | None = None
) -> None:
    """``UserError`` (exit 2, naming the option) for an output that is an input, two outputs on one file, or an
    output that cannot be written. ``bulk_inputs``: many input files (a dataset's images), compared by resolved
    path only."""
    bulk = frozenset(str(p) for p in bulk_inputs)
    seen: dict[Path, Output] = {}
    for out in outputs:
        _check_not_input(out, inputs, bulk)
        real = _real(out.path)
        if real in seen:
            raise UserError(f"is also the output of {seen[real].flag}", path=str(out.path), field=out.flag)
        seen.setdefault(real, out)
    if report_dir is not None:
        if Path(report_dir).exists() and not Path(report_dir).is_dir():
            raise UserError("is a file, not a folder", path=str(report_dir), field="--report-dir")
        _check_writable(Output(Path(report_dir), "--report-dir"), folder=True)
    for out in outputs:
        if out.flag != "--report-dir":
            _check_writable(out)
