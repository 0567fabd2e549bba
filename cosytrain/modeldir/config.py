"""Read an upstream CosyVoice config (HyperPyYAML) into an inert tree, without executing it.

Upstream loads ``cosyvoice.yaml`` / ``cosyvoice2.yaml`` / ``cosyvoice3.yaml`` with
``hyperpyyaml.load_hyperpyyaml``, which imports and calls whatever a ``!new:``, ``!name:`` or
``!apply:`` tag names. A model directory is downloaded data, so cosytrain reads it in steps, one
module each:

1. :mod:`~cosytrain.modeldir.yaml_loader` parses the text into inert nodes
   (:mod:`~cosytrain.modeldir.yaml_nodes`); python tags and unknown tags are refused.
2. Overrides are merged and ``!ref``/``!copy``/``!include:`` resolved
   (:mod:`~cosytrain.modeldir.yaml_resolver`, with its own arithmetic on numbers only).
3. Every name is checked against :mod:`~cosytrain.modeldir.registry`: known model classes and
   functions, recognised-but-inert front-end names, and upstream's seed setters under ``!apply:``
   (ignored). Anything else refuses the whole file with a one-line :class:`UpstreamConfigError`.
4. :func:`cosytrain.modeldir.builder.build_parts` instantiates only the requested sections.

:func:`cosytrain.modeldir.yaml_writer.dump_upstream_yaml` is the inverse. Keys starting with ``__``
(the seed setters) are kept in the inert tree so a written config still carries them;
``!module:`` is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cosytrain.modeldir.errors import ModelDirError, UpstreamConfigError
from cosytrain.modeldir.layout import MODEL_CONFIG_NAMES, QWEN_DIR
from cosytrain.modeldir.registry import validate_names
from cosytrain.modeldir.yaml_loader import parse_upstream_yaml
from cosytrain.modeldir.yaml_resolver import Resolver, merge_overrides

__all__ = ["read_source", "load_upstream_config", "find_config", "load_model_dir_config"]


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


def read_source(path_or_text: str | Path) -> tuple[str, str, Path | None]:
    """(text, name for messages, folder for !include:) from a file, a model directory or yaml text."""
    if not _looks_like_path(path_or_text):
        return str(path_or_text), "<config>", None
    path = Path(path_or_text)
    if path.is_dir():
        path = find_config(path)
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
    text, source, base_dir = read_source(path_or_text)
    source = source_name or source
    if isinstance(overrides, str):
        overrides = parse_upstream_yaml(overrides, f"{source} overrides") if overrides.strip() else None
    tree = parse_upstream_yaml(text, source)
    if overrides:
        merge_overrides(tree, overrides, source)
    validate_names(tree, source)  # before resolving, so an error names where a tag is written
    if resolve:
        tree = Resolver(tree, source, base_dir).run()
        validate_names(tree, source)  # included files
    return tree


def find_config(model_dir: str | Path) -> Path:
    """The config upstream's ``AutoModel`` would pick: cosyvoice.yaml, then cosyvoice2.yaml, then cosyvoice3.yaml."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: not a directory; give an upstream-layout CosyVoice model directory")
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
    path = find_config(model_dir)
    merged = dict(overrides or {})
    if "qwen_pretrain_path" not in merged and re.search(r"^qwen_pretrain_path\s*:", path.read_text(), re.M):
        merged["qwen_pretrain_path"] = str(Path(model_dir) / QWEN_DIR)
    return load_upstream_config(path, merged or None)
