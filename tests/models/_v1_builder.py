"""Test-only builder for the fixtures' nested ``{'class': ...}`` configs (a few known names).

The general, safe upstream-yaml reader lives elsewhere; this maps only what the v1 llm
fixture names, so these tests do not depend on it.
"""

from __future__ import annotations

import functools
from typing import Any

from cosytrain.models.llm import TransformerLM
from cosytrain.models.sampling import ras_sampling
from cosytrain.models.transformer.encoder import ConformerEncoder, TransformerEncoder

CLASSES = {
    "cosyvoice.llm.llm.TransformerLM": TransformerLM,
    "cosyvoice.transformer.encoder.ConformerEncoder": ConformerEncoder,
    "cosyvoice.transformer.encoder.TransformerEncoder": TransformerEncoder,
}
FUNCTIONS = {"cosyvoice.utils.common.ras_sampling": ras_sampling}


def build(node: Any) -> Any:
    """Build depth-first in key order, as hyperpyyaml does."""
    if isinstance(node, dict) and "class" in node:
        return CLASSES[node["class"]](**{k: build(v) for k, v in node.items() if k != "class"})
    if isinstance(node, dict) and "function" in node:
        kwargs = {k: build(v) for k, v in node.items() if k != "function"}
        return functools.partial(FUNCTIONS[node["function"]], **kwargs)
    if isinstance(node, dict):
        return {k: build(v) for k, v in node.items()}
    if isinstance(node, list):
        return [build(v) for v in node]
    return node
