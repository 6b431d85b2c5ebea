"""The project's one YAML reader: configs, search spaces, recipes, ``--set`` values, the artifacts tracking reads
back and checkpoints' embedded configs all go through :func:`parse_yaml` (files: :func:`read_yaml_file`).

What it guarantees, before any Python object is built (so a hostile file is rejected in milliseconds):

- the safe loader only, and only the standard YAML tags (``!!python/...`` and custom tags are rejected);
- no key twice in one mapping (plain ``safe_load`` silently keeps the last); the error names both lines;
- no recursive alias (``&a {self: *a}``);
- an alias budget: aliases may add at most :data:`ALIAS_BUDGET` nodes to the document in total (every node
  reached again through an alias counts once per time it is reached), which stops "billion laughs" bombs while
  leaving real anchors (a recipe's shared ``config: &setting``) far below it;
- a :class:`LineMap` (key path -> line) for error messages found after loading.

Every failure is a :class:`~orchestrator.errors.UserError` whose path is ``<source>:<line>`` and whose field is the
dotted key path, so the CLI prints one line and exits 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError

__all__ = ["ALIAS_BUDGET", "LineMap", "YamlDoc", "YamlSyntaxError", "parse_yaml", "read_yaml_file"]

#: the most nodes aliases may add to one document (a 10-level, 10-wide bomb adds 10^10)
ALIAS_BUDGET = 10_000

_MERGE_TAG = "tag:yaml.org,2002:merge"
_STD_PREFIX = "tag:yaml.org,2002:"


class YamlSyntaxError(UserError):
    """The text is not YAML at all (scanner / parser / composer error); other rejections are plain UserErrors."""


class _Loader(yaml.SafeLoader):
    """The project's loader: SafeLoader's constructors, in a subclass so nothing added here leaks into SafeLoader."""


class LineMap:
    """Line numbers (1-based) of the keys of a YAML document, looked up by key path."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    def line(self, path: tuple[Any, ...] | list[Any]) -> int | None:
        """The line of the deepest key (or item) of ``path`` found in the document."""
        node, found = self.root, None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                        found, node = key_node.start_mark.line + 1, value_node
                        break
                else:
                    return found
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                node = node.value[part]
                found = node.start_mark.line + 1
            else:
                return found
        return found


@dataclass(frozen=True)
class YamlDoc:
    """A parsed document: ``tree`` (plain dicts, lists and scalars), its ``lines`` and the ``text`` it came from."""

    tree: Any
    lines: LineMap
    text: str


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_STD_PREFIX) :] if tag.startswith(_STD_PREFIX) else tag


def _fail(message: str, source: str, line: int | None, path: list[str]) -> UserError:
    return UserError(message, path=f"{source}:{line}" if line else source, field=".".join(path) or None)


def _check_graph(root: yaml.Node, loader: _Loader, source: str, budget: int) -> None:
    """Walk the expanded document (iteratively) and raise on a disallowed tag, a duplicate key, a recursive alias
    or more than ``budget`` nodes reached again through aliases. The walk stops at the budget, so its cost is
    bounded by the document's size plus ``budget`` whatever the aliases expand to.

    A node reached through an alias carries the anchor's line, so errors there name the line of the alias
    site instead: the key (or sequence) in the text under which the alias was written."""
    allowed = (set(loader.yaml_constructors) - {None}) | {_MERGE_TAG}
    seen: set[int] = set()
    on_path: set[int] = set()
    repeats = 0
    # (node, dotted path, line of the alias site, leaving?) -- a leave marker pops the node off the path
    stack: list[tuple[yaml.Node, list[str], int, bool]] = [(root, [], _line(root), False)]
    while stack:
        node, path, site, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        if id(node) in on_path:
            raise _fail("recursive YAML alias (it refers to a node that contains it)", source, site, path)
        repeat = id(node) in seen
        if repeat:
            repeats += 1
            if repeats > budget:
                raise _fail(
                    f"YAML aliases expand to more than {budget} extra nodes (an alias bomb?)", source, site, path
                )
        else:
            seen.add(id(node))
            if node.tag not in allowed:
                raise _fail(
                    f"YAML tag {_short_tag(node.tag)} is not allowed (plain YAML data only)", source, _line(node), path
                )
            if isinstance(node, yaml.MappingNode):
                _check_duplicates(node, loader, source, path)
        if isinstance(node, yaml.ScalarNode):
            continue
        on_path.add(id(node))
        stack.append((node, path, site, True))
        children: list[tuple[yaml.Node, list[str], int, bool]] = []
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                here = site if repeat else _line(key_node)
                children += [(key_node, path + [key], here, False), (value_node, path + [key], here, False)]
        else:
            for i, item in enumerate(node.value):
                here = site if repeat else (_line(node) if id(item) in seen else _line(item))
                children.append((item, path + [str(i)], here, False))
        stack.extend(reversed(children))


def _check_duplicates(node: yaml.MappingNode, loader: _Loader, source: str, path: list[str]) -> None:
    """Raise when two scalar keys of ``node`` construct to equal values (``epochs`` and ``"epochs"`` included)."""
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        if key_node.tag not in loader.yaml_constructors:
            continue  # rejected as a tag when the walk reaches it
        key = loader.construct_object(key_node)
        try:
            earlier = first.get(key)
        except TypeError:  # unhashable: the constructor reports it
            continue
        if earlier is not None:
            raise _fail(
                f"key given twice (lines {earlier} and {_line(key_node)}); remove one",
                source,
                _line(key_node),
                path + [str(key_node.value)],
            )
        first[key] = _line(key_node)


def _unshare(tree: Any) -> Any:
    """The tree with every alias a copy of its anchor, not the same object (``--set a.x=1`` must not change an
    alias ``b: *a`` too). Bounded by the alias budget, which the walk has checked."""
    if isinstance(tree, dict):
        return {k: _unshare(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unshare(v) for v in tree]
    return tree


def parse_yaml(text: str, source: str, *, budget: int = ALIAS_BUDGET) -> YamlDoc:
    """Parse one YAML document from ``text`` with every check of this module; ``source`` names it in errors.

    An empty document gives ``tree`` None. Raises :class:`YamlSyntaxError` for text that is not YAML and
    :class:`UserError` for a rejected document (tag, duplicate key, recursive alias, alias budget)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return YamlDoc(None, LineMap(None), text)
        _check_graph(node, loader, source, budget)
        tree = _unshare(loader.construct_document(node))
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise UserError(f"not plain YAML data ({err.problem})", path=where) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise YamlSyntaxError(f"not valid YAML ({getattr(err, 'problem', None) or err})", path=where) from None
    except RecursionError:
        raise UserError("YAML nested too deeply", path=source) from None
    finally:
        loader.dispose()
    return YamlDoc(tree, LineMap(node), text)


def read_yaml_file(path: str | Path, *, what: str = "file", mapping: bool = True) -> YamlDoc:
    """:func:`parse_yaml` of the file at ``path``; ``what`` (``config file``, ``recipe file``, ...) names it
    when it is missing. With ``mapping`` the top level must be a mapping (an empty file is ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found", path=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 text file", path=str(path)) from None
    except OSError as err:
        raise UserError(f"cannot read the file ({err.strerror or err})", path=str(path)) from None
    doc = parse_yaml(text, str(path))
    if mapping:
        if doc.tree is None:
            return YamlDoc({}, doc.lines, text)
        if not isinstance(doc.tree, dict):
            raise UserError(f"the top level must be a mapping, not {type(doc.tree).__name__}", path=str(path))
    return doc
