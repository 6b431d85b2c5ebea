"""What never reaches the tracking store: the values of secret-looking keys, in params, tags and YAML/JSON text."""

from __future__ import annotations

import json
from typing import Any

#: Keys whose values look like secrets are never logged.
SECRET_MARKERS = ("password", "secret", "token", "api_key", "apikey", "access_key", "credential", "private_key")


def is_secret_key(key: str) -> bool:
    """Whether ``key`` names a secret (it holds one of :data:`SECRET_MARKERS`, any case)."""
    low = key.lower()
    return any(marker in low for marker in SECRET_MARKERS)


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the values of secret-looking keys replaced by ``***``."""
    return {k: ("***" if is_secret_key(k) else v) for k, v in params.items()}


def redact_tree(tree: Any) -> Any:
    """A copy of a nested dict/list with the values of secret-looking keys (at any depth) replaced by ``***``."""
    if isinstance(tree, dict):
        return {k: ("***" if isinstance(k, str) and is_secret_key(k) else redact_tree(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v) for v in tree]
    return tree


def redact_text(name: str, text: str) -> str:
    """A YAML/JSON text artifact (``*.yaml``, ``*.yml``, ``*.json``) with secret-looking keys redacted; other
    names, and text that does not parse, unchanged unless a secret key would survive (then it is dropped)."""
    if not name.lower().endswith((".yaml", ".yml", ".json")):
        return text
    import yaml

    from orchestrator.errors import UserError
    from orchestrator.yaml_io import parse_yaml

    try:
        tree = parse_yaml(text, name).tree  # JSON is YAML; a duplicate key or an alias bomb counts as unparsable
    except UserError:
        return (
            "# redacted: unparsable text with secret-looking keys\n"
            if any(m in text.lower() for m in SECRET_MARKERS)
            else text
        )
    if redact_tree(tree) == tree:
        return text
    if name.lower().endswith(".json"):
        return json.dumps(redact_tree(tree), indent=2)
    return yaml.safe_dump(redact_tree(tree), sort_keys=False)
