"""Write an inert tree as HyperPyYAML text that upstream's ``load_hyperpyyaml`` accepts.

The inverse of :mod:`cosytrain.modeldir.config`: nodes become their tags again (``!new:``,
``!name:``, ``!apply:``, ``!ref``, ``!copy``, ``!tuple``, ``!include:``, ``!PLACEHOLDER``), a node object
reachable twice (what a full ``!ref <key>`` produced) is written once and then as ``!ref <path>``,
and every string that YAML 1.1 (PyYAML) or 1.2 (ruamel) would read as something else is quoted.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from typing import Any

import yaml

from cosytrain.modeldir.errors import UpstreamConfigError
from cosytrain.modeldir.yaml_loader import FLOAT12_RE, INT12_RE, NUMBER_FIRST, TUPLE_RE
from cosytrain.modeldir.yaml_nodes import CALL_KINDS, Call, Include, Placeholder, Ref

__all__ = ["dump_upstream_yaml"]


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


def _represent_call(dumper: yaml.SafeDumper, data: Call) -> yaml.Node:
    if data.args and data.kwargs:
        raise UpstreamConfigError(f"{data.tag_text}: HyperPyYAML cannot write both positional and keyword arguments")
    if data.kwargs:
        return dumper.represent_mapping(data.tag_text, data.kwargs)
    if data.args:
        return dumper.represent_sequence(data.tag_text, data.args, flow_style=True)
    return dumper.represent_scalar(data.tag_text, "")


def _represent_tuple(dumper: yaml.SafeDumper, data: tuple[Any, ...]) -> yaml.Node:
    for item in data:
        if isinstance(item, (dict, list, tuple, Call, Ref, Placeholder, Include)):
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


for _kind in CALL_KINDS.values():
    _HyperDumper.add_representer(_kind, _represent_call)
_HyperDumper.add_representer(list, _represent_list)
_HyperDumper.add_representer(tuple, _represent_tuple)
_HyperDumper.add_representer(
    Ref, lambda d, r: d.represent_scalar("!copy" if r.copy else "!ref", r.expr)
)
_HyperDumper.add_representer(Placeholder, lambda d, p: d.represent_scalar("!PLACEHOLDER", ""))
_HyperDumper.add_representer(Include, _represent_include)
# Quote every string that YAML 1.1 (PyYAML) or 1.2 (ruamel) would read as something else.
_HyperDumper.add_implicit_resolver("!tuple", TUPLE_RE, ["("])
_HyperDumper.add_implicit_resolver("tag:yaml.org,2002:int", INT12_RE, NUMBER_FIRST)
_HyperDumper.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT12_RE, NUMBER_FIRST)

_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")


def _with_refs(value: Any, path: str | None, first: dict[int, str], seen: dict[int, Any]) -> Any:
    """Copy of ``value`` where the 2nd+ occurrence of a shared node becomes ``!ref <first path>``.

    ``path`` is None below a list or call argument list: hyperpyyaml can only refer through keys.
    """
    shareable = isinstance(value, (dict, list, Call)) and not (isinstance(value, (dict, list)) and not value)
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
    elif isinstance(value, Call):
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
