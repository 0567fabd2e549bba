"""Read and write upstream CosyVoice model-directory configs (HyperPyYAML) without executing them.

Upstream loads ``cosyvoice.yaml`` / ``cosyvoice2.yaml`` / ``cosyvoice3.yaml`` with
``hyperpyyaml.load_hyperpyyaml``, which imports and calls whatever a ``!new:``, ``!name:`` or
``!apply:`` tag names. A model directory is downloaded data, so cosytrain reads it differently:

1. ``_InertLoader`` (a ``yaml.SafeLoader``) turns every HyperPyYAML tag into an inert node object
   (:class:`New`, :class:`Name`, :class:`Apply`, :class:`Ref`, ...). Nothing named in the file is
   imported; python tags (``!!python/...``) and unknown tags are refused. Plain scalars follow
   YAML 1.2 (``1e-06`` is a float, ``yes`` a string), as they do after upstream's ruamel pass.
2. Overrides are merged (nested, keys must exist, as ``load_hyperpyyaml`` does) and ``!ref``/``!copy``
   are resolved with a tiny arithmetic evaluator (numbers and ``+ - * / // % **`` only).
3. Every name is checked against :mod:`cosytrain.models.registry`: known model classes/functions,
   recognised-but-inert front-end names, and upstream's seed setters under ``!apply:`` (ignored).
   Anything else refuses the whole file with a one-line :class:`UpstreamConfigError`.
4. :func:`build_parts` instantiates only the requested sections (``llm``, ``flow``, ``hift``)
   depth-first in key order, like hyperpyyaml, mapping upstream names to cosytrain classes.

:func:`dump_upstream_yaml` is the inverse: it renders an inert tree as HyperPyYAML that upstream's
loader accepts, writing a node that occurs twice (a full ``!ref``) as ``!ref <path>`` again.

Differences from hyperpyyaml, on purpose: keys starting with ``__`` (the seed setters) are kept in
the inert tree so a written config still carries them; ``!ref <key.attr>`` (attribute access on a
built object) and ``!module:`` are refused; a plain string reached through a ``!ref`` is not itself
re-scanned for ``<...>`` references.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import io
import math
import operator
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml

from cosytrain.errors import ConfigurationError

__all__ = [
    "UpstreamConfigError",
    "New",
    "Name",
    "Apply",
    "Module",
    "Ref",
    "Placeholder",
    "Include",
    "MODEL_CONFIG_NAMES",
    "parse_upstream_yaml",
    "load_upstream_config",
    "find_model_dir_config",
    "load_model_dir_config",
    "generation_of",
    "validate_names",
    "safe_arithmetic",
    "dump_upstream_yaml",
    "build_parts",
    "check_state_dict",
]

# Upstream's AutoModel picks the first of these that exists in a model directory.
MODEL_CONFIG_NAMES = ("cosyvoice.yaml", "cosyvoice2.yaml", "cosyvoice3.yaml")


class UpstreamConfigError(ConfigurationError):
    """An upstream config was refused or cannot be built; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------
# Inert nodes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=True)
class _Call:
    """A tagged call site (``!new:x.Y``); ``args`` from a sequence node, ``kwargs`` from a mapping."""

    tag: ClassVar[str] = ""
    target: str
    args: list[Any] = dataclasses.field(default_factory=list)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def tag_text(self) -> str:
        return f"{self.tag}{self.target}"


class New(_Call):
    """``!new:pkg.Cls`` -> an instance of the mapped class."""

    tag = "!new:"


class Name(_Call):
    """``!name:pkg.fn`` -> ``functools.partial`` of the mapped function."""

    tag = "!name:"


class Apply(_Call):
    """``!apply:pkg.fn`` -> never called; only upstream's seed setters are accepted (and ignored)."""

    tag = "!apply:"


class Module(_Call):
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


_CALL_KINDS: dict[str, type[_Call]] = {c.tag: c for c in (New, Name, Apply, Module)}
_TUPLE_RE = re.compile(r"^\(.*\)$", re.S)
# Upstream's loader reads the file with ruamel (YAML 1.2) and writes it out again before PyYAML sees
# it, so plain scalars mean what YAML 1.2 says: ``1e-06`` is a float (a string to PyYAML's 1.1
# rules; ``sigma_min``/``lr`` must be numbers), ``yes``/``on`` are strings, ``0o17`` is 15, ``017``
# is 17 and ``1:30`` is a string. Checked against hyperpyyaml 1.2.3 with ruamel.yaml 0.18.
_BOOL12_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT12_RE = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT12_RE = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_NUMBER_FIRST = list("-+0123456789.")
_REF_RE = re.compile(r"<([^<>]*)>")


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------


class _InertLoader(yaml.SafeLoader):
    """SafeLoader whose HyperPyYAML tags build inert nodes and whose unknown tags are refused."""

    source_name = "<config>"


def _where(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return f"{getattr(loader, 'source_name', '<config>')}: line {node.start_mark.line + 1}"


def _call_args(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(node, yaml.MappingNode):
        kwargs = loader.construct_mapping(node, deep=True)
        for key in kwargs:
            if not isinstance(key, str):
                raise UpstreamConfigError(
                    f"{_where(loader, node)}: argument name {key!r} of {node.tag} is not a string"
                )
        return [], dict(kwargs)
    if isinstance(node, yaml.SequenceNode):
        return list(loader.construct_sequence(node, deep=True)), {}
    value = loader.construct_scalar(node)
    if value not in ("", None):
        raise UpstreamConfigError(
            f"{_where(loader, node)}: {node.tag} takes a mapping or a list of arguments, not {value!r}"
        )
    return [], {}


def _construct_call(loader: yaml.SafeLoader, suffix: str, node: yaml.Node, kind: type[_Call]) -> _Call:
    target = suffix.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", target):
        raise UpstreamConfigError(f"{_where(loader, node)}: malformed tag {node.tag!r}")
    args, kwargs = _call_args(loader, node)
    return kind(target, args, kwargs)


def _construct_ref(loader: yaml.SafeLoader, node: yaml.Node, copy_mode: bool) -> Ref:
    if not isinstance(node, yaml.ScalarNode):
        raise UpstreamConfigError(f"{_where(loader, node)}: {node.tag} must be followed by text like <key>")
    return Ref(str(loader.construct_scalar(node)), copy=copy_mode)


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Any, ...]:
    text = str(loader.construct_scalar(node)).strip()
    if not _TUPLE_RE.match(text):
        raise UpstreamConfigError(f"{_where(loader, node)}: !tuple expects text like (1, 2), got {text!r}")
    # hyperpyyaml reads tuple items with PyYAML (YAML 1.1 rules, e.g. `(yes, 1e-06)` -> (True, '1e-06'))
    try:
        items = yaml.load("[" + text[1:-1] + "]", Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        raise UpstreamConfigError(f"{_where(loader, node)}: cannot read {text!r} as a tuple") from None
    if not isinstance(items, list):
        raise UpstreamConfigError(f"{_where(loader, node)}: cannot read {text!r} as a tuple")
    return tuple(items)


def _construct_include(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Include:
    overrides = _call_args(loader, node)[1] if isinstance(node, yaml.MappingNode) else {}
    if not isinstance(node, (yaml.MappingNode, yaml.ScalarNode)):
        raise UpstreamConfigError(f"{_where(loader, node)}: !include: takes a mapping of overrides")
    return Include(suffix, overrides)


def _construct_undefined(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    tag = node.tag or ""
    if tag.startswith("tag:yaml.org,2002:python/"):
        shown = "!!" + tag[len("tag:yaml.org,2002:"):]
        raise UpstreamConfigError(
            f"{_where(loader, node)}: python tag {shown!r} is refused; cosytrain never constructs"
            " python objects from a config (upstream configs use !new:/!name:)"
        )
    raise UpstreamConfigError(f"{_where(loader, node)}: unknown yaml tag {tag!r}")


for _prefix, _kind in _CALL_KINDS.items():
    _InertLoader.add_multi_constructor(
        _prefix, lambda loader, suffix, node, _k=_kind: _construct_call(loader, suffix, node, _k)
    )
_InertLoader.add_multi_constructor("!include:", _construct_include)
_InertLoader.add_constructor("!ref", lambda loader, node: _construct_ref(loader, node, False))
_InertLoader.add_constructor("!copy", lambda loader, node: _construct_ref(loader, node, True))
_InertLoader.add_constructor("!PLACEHOLDER", lambda loader, node: Placeholder())
_InertLoader.add_constructor("!tuple", _construct_tuple)
_InertLoader.add_constructor(None, _construct_undefined)


def _construct_int12(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    for prefix, base in (("0b", 2), ("0o", 8), ("0x", 16)):
        if text.startswith(prefix):
            return sign * int(text[2:], base)
    return sign * int(text, 10)  # YAML 1.2: a leading 0 is not octal


_InertLoader.add_constructor("tag:yaml.org,2002:int", _construct_int12)
_InertLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_InertLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL12_RE, list("tTfF"))
_InertLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT12_RE, _NUMBER_FIRST)
_InertLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT12_RE, _NUMBER_FIRST)
_InertLoader.add_implicit_resolver("!tuple", _TUPLE_RE, ["("])


def parse_upstream_yaml(text: str, source_name: str = "<config>") -> dict[str, Any]:
    """Parse HyperPyYAML text into an inert tree with :class:`Ref` nodes still unresolved."""
    loader = _InertLoader(text)
    loader.source_name = source_name
    try:
        data = loader.get_single_data()
    except UpstreamConfigError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f": line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UpstreamConfigError(f"{source_name}{line}: not valid yaml ({problem})") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UpstreamConfigError(f"{source_name}: the top level must be a mapping, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# Overrides, includes and references
# --------------------------------------------------------------------------------------------------


def _merge_overrides(tree: dict[str, Any], overrides: Mapping[str, Any], source: str, path: str = "") -> None:
    """Nested update; like ``load_hyperpyyaml`` every top-level override key must exist."""
    for key, value in overrides.items():
        where = f"{path}{key}"
        if isinstance(value, Mapping) and isinstance(tree.get(key), dict):
            _merge_overrides(tree[key], value, source, where + ".")
        elif isinstance(value, Mapping) and isinstance(tree.get(key), _Call) and tree[key].kwargs:
            _merge_overrides(tree[key].kwargs, value, source, where + ".")  # hyperpyyaml merges into kwargs
        elif not path and key not in tree:
            raise UpstreamConfigError(
                f"{source}: override {where!r} matches no key of the config (keys: {', '.join(map(str, tree))})"
            )
        else:
            tree[key] = copy.deepcopy(value)


def _path_join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


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


class _Resolver:
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
                    value[key] = self.node(value[key], _path_join(path, key))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    value[i] = self.node(item, _path_join(path, i))
            elif isinstance(value, _Call):
                for i, item in enumerate(value.args):
                    value.args[i] = self.node(item, _path_join(path, i))
                for key in list(value.kwargs):
                    value.kwargs[key] = self.node(value.kwargs[key], _path_join(path, key))
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
            walked = _path_join(walked, part)
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
                if isinstance(value, (dict, list, tuple, _Call)):
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
        overrides = {k: self.node(v, _path_join(path, k)) for k, v in inc.overrides.items()}
        return _load_tree(target.read_text(), target.name, target.parent, overrides, self.depth + 1)


def _load_tree(text: str, source: str, base_dir: Path | None, overrides: Mapping[str, Any] | None,
               depth: int = 0) -> dict[str, Any]:
    tree = parse_upstream_yaml(text, source)
    if overrides:
        _merge_overrides(tree, overrides, source)
    validate_names(tree, source)
    return _Resolver(tree, source, base_dir, depth).run()


# --------------------------------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------------------------------


def _looks_like_path(path_or_text: str | Path) -> bool:
    if isinstance(path_or_text, Path):
        return True
    text = str(path_or_text)
    if "\n" in text or text.endswith((".yaml", ".yml")):
        return "\n" not in text
    try:
        return Path(text).exists()
    except (OSError, ValueError):  # e.g. a one-line yaml text too long for a file name
        return False


def _read_source(path_or_text: str | Path) -> tuple[str, str, Path | None]:
    """(text, name for messages, folder for !include:) from a file, a model directory or yaml text."""
    if not _looks_like_path(path_or_text):
        return str(path_or_text), "<config>", None
    path = Path(path_or_text)
    if path.is_dir():
        path = find_model_dir_config(path)
    if not path.is_file():
        raise UpstreamConfigError(f"config file {path} not found")
    from cosytrain.utils.text_files import TextFileError, read_text

    try:
        return read_text(path), path.name, path.parent
    except TextFileError as err:  # names the line and column of the first byte that is not UTF-8
        raise UpstreamConfigError(str(err)) from None


def load_upstream_config(
    path_or_text: str | Path,
    overrides: Mapping[str, Any] | str | None = None,
    *,
    resolve: bool = True,
    source_name: str | None = None,
) -> dict[str, Any]:
    """Read a HyperPyYAML config into an inert tree; refuse anything cosytrain would not accept.

    ``overrides`` is a (nested) mapping or yaml text, merged before references are resolved, as in
    ``load_hyperpyyaml(f, overrides={'qwen_pretrain_path': ...})``. With ``resolve=False`` the tree
    keeps its :class:`Ref` nodes (for rewriting a config as it was written).
    """
    text, source, base_dir = _read_source(path_or_text)
    source = source_name or source
    if isinstance(overrides, str):
        overrides = parse_upstream_yaml(overrides, f"{source} overrides") if overrides.strip() else None
    tree = parse_upstream_yaml(text, source)
    if overrides:
        _merge_overrides(tree, overrides, source)
    validate_names(tree, source)  # before resolving, so an error names where a tag is written
    if resolve:
        tree = _Resolver(tree, source, base_dir).run()
        validate_names(tree, source)  # included files
    return tree


def find_model_dir_config(model_dir: str | Path) -> Path:
    """The config upstream's ``AutoModel`` would pick: cosyvoice.yaml, then cosyvoice2.yaml, then cosyvoice3.yaml."""
    model_dir = Path(model_dir)
    for name in MODEL_CONFIG_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise UpstreamConfigError(
        f"{model_dir}: no {', '.join(MODEL_CONFIG_NAMES)} found; is this a CosyVoice model directory?"
    )


def load_model_dir_config(model_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load a model directory's config.

    ``qwen_pretrain_path`` defaults to ``<dir>/CosyVoice-BlankEN``, as upstream's CosyVoice2/3 set it.
    """
    path = find_model_dir_config(model_dir)
    merged = dict(overrides or {})
    if "qwen_pretrain_path" not in merged and re.search(r"^qwen_pretrain_path\s*:", path.read_text(), re.M):
        merged["qwen_pretrain_path"] = str(Path(model_dir) / "CosyVoice-BlankEN")
    return load_upstream_config(path, merged or None)


def generation_of(config: Mapping[str, Any]) -> str:
    """'v1', 'v2' or 'v3' from the llm/flow/hift classes a config names."""
    names = {getattr(config.get(part), "target", "") for part in ("llm", "flow", "hift")}
    if names & {"cosyvoice.llm.llm.CosyVoice3LM", "cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
                "cosyvoice.hifigan.generator.CausalHiFTGenerator"}:
        return "v3"
    if names & {"cosyvoice.llm.llm.Qwen2LM", "cosyvoice.flow.flow.CausalMaskedDiffWithXvec"}:
        return "v2"
    if names & {"cosyvoice.llm.llm.TransformerLM", "cosyvoice.flow.flow.MaskedDiffWithXvec"}:
        return "v1"
    raise UpstreamConfigError("cannot tell the CosyVoice generation: no known llm/flow/hift class in the config")


def _iter_calls(value: Any, path: str, seen: set[int]) -> Iterable[tuple[str, _Call]]:
    if isinstance(value, (dict, list, _Call)):
        if id(value) in seen:
            return
        seen.add(id(value))
    if isinstance(value, _Call):
        yield path, value
        items: Iterable[tuple[Any, Any]] = [*enumerate(value.args), *value.kwargs.items()]
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        yield from _iter_calls(item, _path_join(path, key), seen)


def validate_names(tree: Mapping[str, Any], source: str = "<config>") -> None:
    """Refuse the first tag anywhere in ``tree`` that is neither buildable nor recognised as inert."""
    from cosytrain.models import registry

    for path, call in _iter_calls(dict(tree), "", set()):
        problem = registry.refusal(call)
        if problem:
            raise UpstreamConfigError(f"{source}: {path}: {problem}")


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class _HyperDumper(yaml.SafeDumper):
    """SafeDumper that writes inert nodes as HyperPyYAML tags and never emits anchors."""

    def ignore_aliases(self, data: Any) -> bool:  # shared nodes are written as !ref instead
        return True

    def choose_scalar_style(self) -> str:
        """Write tagged scalars plain (``!ref <a> * <b>``, bare ``!new:x.Y``) as upstream's files do."""
        event = self.event
        if event.tag and event.tag.startswith("!") and not event.style:
            if self.analysis is None:
                self.analysis = self.analyze_scalar(event.value)
            a = self.analysis
            plain_ok = a.allow_flow_plain if self.flow_level else a.allow_block_plain
            if a.empty and not self.simple_key_context:
                return ""
            if not a.empty and not a.multiline and plain_ok:
                return ""
        return super().choose_scalar_style()


def _represent_call(dumper: yaml.SafeDumper, data: _Call) -> yaml.Node:
    if data.args and data.kwargs:
        raise UpstreamConfigError(f"{data.tag_text}: HyperPyYAML cannot write both positional and keyword arguments")
    if data.kwargs:
        return dumper.represent_mapping(data.tag_text, data.kwargs)
    if data.args:
        return dumper.represent_sequence(data.tag_text, data.args, flow_style=True)
    return dumper.represent_scalar(data.tag_text, "")


def _represent_tuple(dumper: yaml.SafeDumper, data: tuple[Any, ...]) -> yaml.Node:
    for item in data:
        if isinstance(item, (dict, list, tuple, _Call, Ref, Placeholder, Include)):
            raise UpstreamConfigError(f"tuple {data!r}: HyperPyYAML tuples hold only plain scalars")
    inner = yaml.dump(list(data), Dumper=_HyperDumper, default_flow_style=True, width=1 << 30).strip()
    return dumper.represent_scalar("!tuple", "(" + inner[1:-1] + ")")


def _represent_include(dumper: yaml.SafeDumper, data: Include) -> yaml.Node:
    if data.overrides:
        return dumper.represent_mapping(f"!include:{data.filename}", data.overrides)
    return dumper.represent_scalar(f"!include:{data.filename}", "")


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    def flat(item: Any) -> bool:
        return item is None or isinstance(item, (str, int, float, bool))

    inline = all(flat(i) or (isinstance(i, list) and all(map(flat, i))) for i in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


for _kind in _CALL_KINDS.values():
    _HyperDumper.add_representer(_kind, _represent_call)
_HyperDumper.add_representer(list, _represent_list)
_HyperDumper.add_representer(tuple, _represent_tuple)
_HyperDumper.add_representer(
    Ref, lambda d, r: d.represent_scalar("!copy" if r.copy else "!ref", r.expr)
)
_HyperDumper.add_representer(Placeholder, lambda d, p: d.represent_scalar("!PLACEHOLDER", ""))
_HyperDumper.add_representer(Include, _represent_include)
# Quote every string that YAML 1.1 (PyYAML) or 1.2 (ruamel) would read as something else.
_HyperDumper.add_implicit_resolver("!tuple", _TUPLE_RE, ["("])
_HyperDumper.add_implicit_resolver("tag:yaml.org,2002:int", _INT12_RE, _NUMBER_FIRST)
_HyperDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT12_RE, _NUMBER_FIRST)

_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")


def _with_refs(value: Any, path: str | None, first: dict[int, str], seen: dict[int, Any]) -> Any:
    """Copy of ``value`` where the 2nd+ occurrence of a shared node becomes ``!ref <first path>``.

    ``path`` is None below a list or call argument list: hyperpyyaml can only refer through keys.
    """
    shareable = isinstance(value, (dict, list, _Call)) and not (isinstance(value, (dict, list)) and not value)
    if shareable and id(value) in first:
        return Ref(f"<{first[id(value)]}>")
    if shareable and id(value) in seen:
        return seen[id(value)]  # reachable only through lists: write it again in full
    if shareable and path is not None:
        first[id(value)] = path

    def sub(key: Any, item: Any, keyed: bool) -> Any:
        ok = keyed and path is not None and isinstance(key, str) and _KEY_RE.fullmatch(key)
        return _with_refs(item, (f"{path}[{key}]" if path else key) if ok else None, first, seen)

    if isinstance(value, dict):
        out: Any = {k: sub(k, v, True) for k, v in value.items()}
    elif isinstance(value, list):
        out = [sub(i, v, False) for i, v in enumerate(value)]
    elif isinstance(value, _Call):
        out = type(value)(value.target, [sub(i, v, False) for i, v in enumerate(value.args)],
                          {k: sub(k, v, True) for k, v in value.kwargs.items()})
    else:
        return value
    if shareable:
        seen[id(value)] = out
    return out


def dump_upstream_yaml(
    tree: Mapping[str, Any], stream: io.TextIOBase | None = None, *, header: str | None = None
) -> str:
    """Render an inert tree (resolved or not) as HyperPyYAML text that ``load_hyperpyyaml`` accepts.

    A node object reachable twice (what a full ``!ref <key>`` produced) is written once and then as
    ``!ref <key[sub]>``, so upstream builds one shared instance again (e.g. ``hifigan.generator``).
    """
    try:
        body = yaml.dump(
            _with_refs(dict(tree), "", {}, {}), Dumper=_HyperDumper, sort_keys=False,
            default_flow_style=False, allow_unicode=True, width=100,
        )
    except yaml.YAMLError as exc:  # e.g. a tensor or a built module left in the tree
        raise UpstreamConfigError(f"cannot write the config as yaml: {exc}") from None
    text = (("".join(f"# {line}\n" for line in header.splitlines())) if header else "") + body
    if stream is not None:
        stream.write(text)
    return text


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


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
    from cosytrain.models import registry

    if isinstance(config, (str, Path)):
        source = source_name or (_read_source(config)[1])
        config = load_upstream_config(config, overrides, source_name=source)
    else:
        source = source_name or "<config>"
        if overrides:
            raise UpstreamConfigError("overrides apply when reading a config; pass them to load_upstream_config")
        validate_names(config, source)
    builder = registry.Builder(source, device=device)
    built: dict[str, Any] = {}
    for part in parts:
        node = config.get(part)
        if node is None:
            raise UpstreamConfigError(f"{source}: has no {part!r} section to build")
        if not isinstance(node, New):
            raise UpstreamConfigError(f"{source}: {part}: expected a !new: class, got {type(node).__name__}")
        built[part] = builder.build(node, part)
    return built


def check_state_dict(model: Any, state_dict: Mapping[str, Any], name: str = "model", limit: int = 5) -> None:
    """Raise one line naming missing / unexpected / shape-mismatched keys before a strict load."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected if k in given and expected[k] != given[k]]
    if not (missing or unexpected or mismatched):
        return

    def listing(keys: list[str], show: Any = str) -> str:
        more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(show(k) for k in keys[:limit]) + more

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({listing(unexpected)})")
    if mismatched:
        def shapes(k: str) -> str:
            return f"{k}: model {list(expected[k])} vs checkpoint {list(given[k])}"

        problems.append(f"{len(mismatched)} shape-mismatched ({listing(mismatched, shapes)})")
    raise UpstreamConfigError(
        f"{name}: state dict does not fit the model built from the config: {'; '.join(problems)};"
        " check that the config and the checkpoint come from the same model"
    )
