"""The inert tree a HyperPyYAML config is read into: one node class per tag, nothing imported or called.

``!new:x.Y`` -> :class:`New`, ``!name:x.f`` -> :class:`Name`, ``!apply:x.f`` -> :class:`Apply`,
``!module:x`` -> :class:`Module`, ``!ref``/``!copy`` -> :class:`Ref`, ``!PLACEHOLDER`` ->
:class:`Placeholder`, ``!include:f.yaml`` -> :class:`Include`. The reader
(:mod:`cosytrain.modeldir.yaml_loader`), the resolver, the registry, the builder and the writer all
speak this tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

__all__ = ["Call", "New", "Name", "Apply", "Module", "Ref", "Placeholder", "Include", "CALL_KINDS",
           "path_join", "iter_calls"]


@dataclasses.dataclass(eq=True)
class Call:
    """A tagged call site (``!new:x.Y``); ``args`` from a sequence node, ``kwargs`` from a mapping."""

    tag: ClassVar[str] = ""
    target: str
    args: list[Any] = dataclasses.field(default_factory=list)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def tag_text(self) -> str:
        return f"{self.tag}{self.target}"


class New(Call):
    """``!new:pkg.Cls`` -> an instance of the mapped class."""

    tag = "!new:"


class Name(Call):
    """``!name:pkg.fn`` -> ``functools.partial`` of the mapped function."""

    tag = "!name:"


class Apply(Call):
    """``!apply:pkg.fn`` -> never called; only upstream's seed setters are accepted (and ignored)."""

    tag = "!apply:"


class Module(Call):
    """``!module:pkg`` -> always refused (kept as a node only to name it in the error)."""

    tag = "!module:"


@dataclasses.dataclass(eq=True)
class Ref:
    """``!ref <a> * <b>`` (``copy=False``) or ``!copy <a>`` (``copy=True``), before resolution."""

    expr: str
    copy: bool = False


@dataclasses.dataclass(eq=True)
class Placeholder:
    """``!PLACEHOLDER``: a value the caller must supply through overrides."""


@dataclasses.dataclass(eq=True)
class Include:
    """``!include:file.yaml`` with optional child overrides; resolved relative to the config's folder."""

    filename: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


CALL_KINDS: dict[str, type[Call]] = {c.tag: c for c in (New, Name, Apply, Module)}


def path_join(path: str, key: Any) -> str:
    """``llm`` + ``encoder`` -> ``llm.encoder``; ``x`` + 0 -> ``x[0]`` (the paths errors name)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def iter_calls(value: Any, path: str = "", seen: set[int] | None = None) -> Iterable[tuple[str, Call]]:
    """Every :class:`Call` reachable from ``value`` with its path, each node object once."""
    seen = set() if seen is None else seen
    if isinstance(value, (dict, list, Call)):
        if id(value) in seen:
            return
        seen.add(id(value))
    if isinstance(value, Call):
        yield path, value
        items: Iterable[tuple[Any, Any]] = [*enumerate(value.args), *value.kwargs.items()]
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        yield from iter_calls(item, path_join(path, key), seen)
