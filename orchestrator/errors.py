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


def find_in_chain(err: BaseException, kind: type, links: tuple[str, ...] = ("cause",)):
    """The first exception of type ``kind`` in ``err``'s chain: ``__cause__``, ``__context__``, the attributes
    named in ``links`` (Ray's wrappers keep the original there) and exception ``args``; ``None`` if absent."""
    seen: set[int] = set()
    stack: list = [err]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        stack.extend([e.__cause__, e.__context__, *(getattr(e, name, None) for name in links)])
        stack.extend(x for x in e.args if isinstance(x, BaseException))
    return None
