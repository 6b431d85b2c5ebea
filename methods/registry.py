"""Loss families registered by name, so a config selects one with ``loss.family``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_FAMILIES: dict[str, type[nn.Module]] = {}
T = TypeVar("T", bound=type[nn.Module])


def register(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in _FAMILIES:
            raise ValueError(f"loss family {name!r} registered twice")
        _FAMILIES[name] = cls
        cls.family_name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def family_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``; KeyError naming the known families otherwise."""
    if name not in _FAMILIES:
        raise KeyError(f"unknown loss family {name!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def build(name: str, **params: Any) -> nn.Module:
    """The loss family ``name`` built from its parameters (named like its config section's fields)."""
    return family_class(name)(**params)


def families() -> list[str]:
    return sorted(_FAMILIES)
