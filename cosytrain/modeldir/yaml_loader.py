"""Parse HyperPyYAML text into an inert tree (:mod:`cosytrain.modeldir.yaml_nodes`) without running it.

Upstream loads its configs with ``hyperpyyaml.load_hyperpyyaml``, which imports and calls whatever a
``!new:``, ``!name:`` or ``!apply:`` tag names. Here ``_InertLoader`` (a ``yaml.SafeLoader``) turns
every HyperPyYAML tag into an inert node object instead; nothing named in the file is imported,
python tags (``!!python/...``) and unknown tags are refused with a one-line
:class:`~cosytrain.modeldir.errors.UpstreamConfigError`. Plain scalars follow YAML 1.2 (``1e-06`` is
a float, ``yes`` a string), as they do after upstream's ruamel pass.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from cosytrain.modeldir.errors import UpstreamConfigError
from cosytrain.modeldir.yaml_nodes import CALL_KINDS, Call, Include, Placeholder, Ref

__all__ = ["parse_upstream_yaml", "TUPLE_RE", "INT12_RE", "FLOAT12_RE", "NUMBER_FIRST"]

TUPLE_RE = re.compile(r"^\(.*\)$", re.S)
# Upstream's loader reads the file with ruamel (YAML 1.2) and writes it out again before PyYAML sees
# it, so plain scalars mean what YAML 1.2 says: ``1e-06`` is a float (a string to PyYAML's 1.1
# rules; ``sigma_min``/``lr`` must be numbers), ``yes``/``on`` are strings, ``0o17`` is 15, ``017``
# is 17 and ``1:30`` is a string. Checked against hyperpyyaml 1.2.3 with ruamel.yaml 0.18.
_BOOL12_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
INT12_RE = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+)$")
FLOAT12_RE = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
NUMBER_FIRST = list("-+0123456789.")


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


def _construct_call(loader: yaml.SafeLoader, suffix: str, node: yaml.Node, kind: type[Call]) -> Call:
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
    if not TUPLE_RE.match(text):
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


for _prefix, _kind in CALL_KINDS.items():
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
_InertLoader.add_implicit_resolver("tag:yaml.org,2002:int", INT12_RE, NUMBER_FIRST)
_InertLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT12_RE, NUMBER_FIRST)
_InertLoader.add_implicit_resolver("!tuple", TUPLE_RE, ["("])


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
