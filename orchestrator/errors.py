"""User-facing errors: bad input that the CLI reports in one line and exits 2 for."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, dataset, checkpoint). The CLI prints ``str(err)`` and exits 2.

    The message names the file and, where known, the dotted field or the record.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        self.detail = message
        self.path = path
        self.field = field
        where = ":".join(p for p in (path, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
