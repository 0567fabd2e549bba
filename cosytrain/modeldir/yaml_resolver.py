"""Resolve an inert HyperPyYAML tree: overrides, ``!ref``/``!copy`` (with arithmetic), ``!include:``.

Overrides are merged (nested, top-level keys must exist, as ``load_hyperpyyaml`` does) and
``!ref``/``!copy`` are resolved with a tiny arithmetic evaluator (:func:`safe_arithmetic`: numbers
and ``+ - * / // % **`` only, never a name). Differences from hyperpyyaml, on purpose:
``!ref <key.attr>`` (attribute access on a built object) is refused; a plain string reached through
a ``!ref`` is not itself re-scanned for ``<...>`` references; an included file must lie inside the
including config's folder.
"""

from __future__ import annotations

import ast
import copy
import math
import operator
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cosytrain.modeldir.errors import UpstreamConfigError
from cosytrain.modeldir.registry import validate_names
from cosytrain.modeldir.yaml_loader import parse_upstream_yaml
from cosytrain.modeldir.yaml_nodes import Call, Include, Placeholder, Ref, path_join

__all__ = ["merge_overrides", "safe_arithmetic", "Resolver", "load_tree"]

_REF_RE = re.compile(r"<([^<>]*)>")


def merge_overrides(tree: dict[str, Any], overrides: Mapping[str, Any], source: str, path: str = "") -> None:
    """Nested update; like ``load_hyperpyyaml`` every top-level override key must exist."""
    for key, value in overrides.items():
        where = f"{path}{key}"
        if isinstance(value, Mapping) and isinstance(tree.get(key), dict):
            merge_overrides(tree[key], value, source, where + ".")
        elif isinstance(value, Mapping) and isinstance(tree.get(key), Call) and tree[key].kwargs:
            merge_overrides(tree[key].kwargs, value, source, where + ".")  # hyperpyyaml merges into kwargs
        elif not path and key not in tree:
            raise UpstreamConfigError(
                f"{source}: override {where!r} matches no key of the config (keys: {', '.join(map(str, tree))})"
            )
        else:
            tree[key] = copy.deepcopy(value)


def safe_arithmetic(text: str) -> int | float | None:
    """Evaluate ``text`` if it is plain arithmetic on numbers, else return None (never evaluates names).

    Why: hyperpyyaml evaluates ``!ref <a> * <b>`` after substitution with an AST walker; this is
    the same idea with a whitelist of number literals and ``+ - * / // % **`` and size limits.
    """
    if len(text) > 1000:
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    binops: dict[type, Any] = {
        ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow,
    }

    def ev(node: ast.AST, depth: int = 0) -> int | float:
        if depth > 50:
            raise TypeError("too deep")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = ev(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BinOp) and type(node.op) in binops:
            left, right = ev(node.left, depth + 1), ev(node.right, depth + 1)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 2**32):
                raise OverflowError("power too large")
            result = binops[type(node.op)](left, right)
            if isinstance(result, complex) or (isinstance(result, int) and result.bit_length() > 256):
                raise OverflowError("result too large")
            return result
        raise TypeError(type(node).__name__)

    try:
        value = ev(tree.body)
    except (TypeError, OverflowError):
        return None
    except ZeroDivisionError:
        raise UpstreamConfigError(f"division by zero in {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Resolver:
    """Resolves ``!ref``/``!copy``/``!include:``/``!PLACEHOLDER`` in place, following ref chains."""

    def __init__(self, tree: dict[str, Any], source: str, base_dir: Path | None, depth: int = 0) -> None:
        self.tree, self.source, self.base_dir, self.depth = tree, source, base_dir, depth
        # id -> (node, result); the node is kept so its id cannot be reused while resolving
        self.done: dict[int, tuple[Any, Any]] = {}
        self.active: list[str] = []

    def run(self) -> dict[str, Any]:
        for key in list(self.tree):
            self.tree[key] = self.node(self.tree[key], str(key))
        return self.tree

    def node(self, value: Any, path: str) -> Any:
        if id(value) in self.done:
            return self.done[id(value)][1]
        if isinstance(value, Ref):
            result = self.ref(value, path)
        elif isinstance(value, Placeholder):
            raise UpstreamConfigError(f"{self.source}: {path}: is a !PLACEHOLDER; give it in overrides")
        elif isinstance(value, Include):
            result = self.include(value, path)
        else:
            result = value
            self.done[id(value)] = (value, value)  # before descending: cycles through aliases end
            if isinstance(value, dict):
                for key in list(value):
                    value[key] = self.node(value[key], path_join(path, key))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    value[i] = self.node(item, path_join(path, i))
            elif isinstance(value, Call):
                for i, item in enumerate(value.args):
                    value.args[i] = self.node(item, path_join(path, i))
                for key in list(value.kwargs):
                    value.kwargs[key] = self.node(value.kwargs[key], path_join(path, key))
            return result
        self.done[id(value)] = (value, result)
        return result

    def lookup(self, ref_path: str, path: str) -> tuple[Any, str]:
        ref_path = ref_path.strip()
        if "." in ref_path:
            raise UpstreamConfigError(
                f"{self.source}: {path}: attribute reference <{ref_path}> is refused"
                " (it would call getattr on a built object); refer to a key instead"
            )
        parts = [p.strip() for p in ref_path.replace("]", "").split("[")]
        branch: Any = self.tree
        walked = ""
        for part in parts:
            if not isinstance(branch, dict) or part not in branch:
                raise UpstreamConfigError(f"{self.source}: {path}: reference <{ref_path}> matches no key")
            walked = path_join(walked, part)
            branch = branch[part]
        return branch, walked

    def ref(self, ref: Ref, path: str) -> Any:
        expr = ref.expr.strip()
        if not _REF_RE.search(expr):
            raise UpstreamConfigError(f"{self.source}: {path}: !ref needs <key>, got {ref.expr!r}")
        if expr in self.active:
            raise UpstreamConfigError(f"{self.source}: {path}: circular reference {' -> '.join(self.active + [expr])}")
        self.active.append(expr)
        try:
            full = _REF_RE.fullmatch(expr)
            if full:
                target, target_path = self.lookup(full.group(1), path)
                value = self.node(target, target_path)
                return copy.deepcopy(value) if ref.copy else value

            def substitute(match: re.Match[str]) -> str:
                target, target_path = self.lookup(match.group(1), path)
                value = self.node(target, target_path)
                if isinstance(value, (dict, list, tuple, Call)):
                    raise UpstreamConfigError(
                        f"{self.source}: {path}: <{match.group(1)}> is not a scalar, cannot use it inside {expr!r}"
                    )
                return str(value)

            text = _REF_RE.sub(substitute, expr)
            number = safe_arithmetic(text)
            return text if number is None else number
        finally:
            self.active.pop()

    def include(self, inc: Include, path: str) -> Any:
        if self.base_dir is None:
            raise UpstreamConfigError(
                f"{self.source}: {path}: !include:{inc.filename} needs the config read from a file"
            )
        target = (self.base_dir / inc.filename).resolve()
        if self.base_dir.resolve() not in target.parents or self.depth > 8:
            raise UpstreamConfigError(
                f"{self.source}: {path}: !include:{inc.filename} must name a file inside {self.base_dir}"
            )
        if not target.is_file():
            raise UpstreamConfigError(f"{self.source}: {path}: !include:{inc.filename}: file not found")
        overrides = {k: self.node(v, path_join(path, k)) for k, v in inc.overrides.items()}
        return load_tree(target.read_text(), target.name, target.parent, overrides, self.depth + 1)


def load_tree(text: str, source: str, base_dir: Path | None, overrides: Mapping[str, Any] | None,
              depth: int = 0) -> dict[str, Any]:
    """Parse, merge ``overrides``, check every name and resolve: an included file, read as a whole."""
    tree = parse_upstream_yaml(text, source)
    if overrides:
        merge_overrides(tree, overrides, source)
    validate_names(tree, source)
    return Resolver(tree, source, base_dir, depth).run()
