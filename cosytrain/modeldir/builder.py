"""Instantiate the ``llm``/``flow``/``hift`` sections of an inert config with cosytrain classes.

:func:`build_parts` builds only the requested sections, depth-first in key order like hyperpyyaml,
each upstream name mapped through :mod:`cosytrain.modeldir.registry`; a node object shared by a full
``!ref`` is built once. The reference fixtures describe their models as nested dicts with a
``class``/``function`` key; :func:`build_from_fixture_config` builds those exactly as a yaml section.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from cosytrain.modeldir.config import load_upstream_config, read_source
from cosytrain.modeldir.errors import UpstreamConfigError
from cosytrain.modeldir.registry import CLASSES, PLAIN_DICT_CLASSES, is_inert, refusal, resolve, validate_names
from cosytrain.modeldir.yaml_nodes import Apply, Call, Name, New, iter_calls, path_join

__all__ = ["Builder", "build_parts", "fixture_config_to_tree", "build_from_fixture_config"]


class Builder:
    """Instantiates inert nodes depth-first in key order; a node object shared by ``!ref`` is built once."""

    def __init__(self, source: str = "<config>", device: Any = None) -> None:
        self.source = source
        self.device = device
        self._memo: dict[int, tuple[Any, Any]] = {}
        self._active: set[int] = set()

    def build(self, node: Any, path: str) -> Any:
        context: Any = nullcontext()
        if self.device is not None:
            import torch

            context = torch.device(self.device)
        with context:
            return self._value(node, path)

    def _fail(self, path: str, message: str) -> UpstreamConfigError:
        return UpstreamConfigError(f"{self.source}: {path}: {message}")

    def _value(self, node: Any, path: str) -> Any:
        if isinstance(node, (dict, list, Call)):
            key = id(node)
            if key in self._memo:
                return self._memo[key][1]
            if key in self._active:
                raise self._fail(path, "refers to itself")
            self._active.add(key)
            try:
                value = self._container(node, path)
            finally:
                self._active.discard(key)
            self._memo[key] = (node, value)
            return value
        if isinstance(node, tuple):
            return tuple(self._value(v, path_join(path, i)) for i, v in enumerate(node))
        if node is None or isinstance(node, (str, int, float, bool)):
            return node
        raise self._fail(path, f"cannot build a {type(node).__name__} (unresolved reference or placeholder?)")

    def _container(self, node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: self._value(v, path_join(path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self._value(v, path_join(path, i)) for i, v in enumerate(node)]
        return self._call(node, path)

    def _call(self, node: Call, path: str) -> Any:
        problem = refusal(node)
        if problem:
            raise self._fail(path, problem)
        if isinstance(node, Apply):
            raise self._fail(path, f"{node.tag_text} is a top-level seed setter; it is ignored, not built")
        if is_inert(node.target):
            raise self._fail(path, f"{node.tag_text} is recognised but not built by cosytrain (it is not part of"
                                   " the llm/flow/hift models)")
        if isinstance(node, New) and node.target in PLAIN_DICT_CLASSES:
            if node.args or set(node.kwargs) - {"content"}:
                raise self._fail(path, f"{node.tag_text} takes only 'content:'")
            content = self._value(node.kwargs.get("content", {}), path_join(path, "content"))
            if not isinstance(content, dict):
                raise self._fail(path, f"{node.tag_text} content must be a mapping")
            return dict(content)
        kind = "class" if isinstance(node, New) or node.target in CLASSES else "function"
        try:
            target = resolve(node.target, kind)
        except UpstreamConfigError as exc:
            raise self._fail(path, str(exc)) from None
        args = [self._value(v, path_join(path, i)) for i, v in enumerate(node.args)]
        kwargs = {k: self._value(v, path_join(path, k)) for k, v in node.kwargs.items()}
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            try:
                (signature.bind if isinstance(node, New) else signature.bind_partial)(*args, **kwargs)
            except TypeError as exc:
                raise self._fail(path, f"{node.tag_text} does not take these arguments: {exc}") from None
        if isinstance(node, Name):
            return functools.partial(target, *args, **kwargs)
        return target(*args, **kwargs)


def build_parts(
    config: Mapping[str, Any] | str | Path,
    parts: Iterable[str] = ("llm", "flow", "hift"),
    device: Any = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    source_name: str | None = None,
) -> dict[str, Any]:
    """Instantiate only ``parts`` of an upstream config with cosytrain classes.

    ``device='meta'`` builds shape-only modules (official sizes in well under a second), e.g. to
    compare state-dict keys and shapes with a checkpoint before loading it.
    """
    if isinstance(config, (str, Path)):
        source = source_name or read_source(config)[1]
        config = load_upstream_config(config, overrides, source_name=source)
    else:
        source = source_name or "<config>"
        if overrides:
            raise UpstreamConfigError("overrides apply when reading a config; pass them to load_upstream_config")
        validate_names(config, source)
    builder = Builder(source, device=device)
    built: dict[str, Any] = {}
    for part in parts:
        node = config.get(part)
        if node is None:
            raise UpstreamConfigError(f"{source}: has no {part!r} section to build")
        if not isinstance(node, New):
            raise UpstreamConfigError(f"{source}: {part}: expected a !new: class, got {type(node).__name__}")
        built[part] = builder.build(node, part)
    return built


# --------------------------------------------------------------------------------------------------
# Fixture configs: nested dicts with a 'class' or 'function' key
# --------------------------------------------------------------------------------------------------


def fixture_config_to_tree(cfg: Any) -> Any:
    """``{'class': 'pkg.Cls', kw: ...}`` -> :class:`New`, ``{'function': ...}`` -> :class:`Name`, recursively."""
    if isinstance(cfg, Mapping):
        if "class" in cfg or "function" in cfg:
            kind = New if "class" in cfg else Name
            target = cfg["class"] if "class" in cfg else cfg["function"]
            kwargs = {k: fixture_config_to_tree(v) for k, v in cfg.items() if k not in ("class", "function")}
            return kind(str(target), [], kwargs)
        return {k: fixture_config_to_tree(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [fixture_config_to_tree(v) for v in cfg]
    return cfg


def build_from_fixture_config(cfg: Mapping[str, Any], device: Any = None) -> Any:
    """Build a fixture's ``fx['config']`` with cosytrain classes, exactly as a yaml section is built."""
    tree = fixture_config_to_tree(cfg)
    if not isinstance(tree, New):
        raise UpstreamConfigError("fixture config: the top level needs a 'class' key")
    for path, call in iter_calls(tree, tree.target.rsplit(".", 1)[-1]):
        problem = refusal(call)
        if problem:
            raise UpstreamConfigError(f"fixture config: {path}: {problem}")
    return Builder("fixture config", device=device).build(tree, tree.target.rsplit(".", 1)[-1])
