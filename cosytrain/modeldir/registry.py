"""Which upstream names cosytrain builds, which it only recognises, and how it builds them.

An upstream config names classes by their upstream dotted path (``!new:cosyvoice.llm.llm.TransformerLM``).
This module maps each buildable name to a cosytrain object as a lazy ``"module:attr"`` string, so
reading a config imports nothing, and a generation whose classes are not written yet still parses
(building it then says "not implemented yet in cosytrain").

Names that appear in upstream configs but are never built here are *recognised-inert*: the
dataset processors (cosytrain has its own data pipeline), the text tokenizers (the front end loads
its tokenizer itself), the GAN wrapper ``HiFiGan`` (the vocoder task holds generator and
discriminator itself), the unused DAC-style ``MultiResolutionDiscriminator`` and the mel function
aliases. A config may contain them; building a section that contains one is refused. Any other
name, anywhere in the file, refuses the whole file.

``!apply:`` is never executed. Upstream ships only the four seed setters below, at the top of every
config; they are recognised and ignored because the weights come from the checkpoint, and the
only construction-time randomness that matters (the v2/v3 fixed noise buffers of
``CausalConditionalCFM`` and ``CausalHiFTGenerator``) is created by our modules themselves.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

from cosytrain.models.upstream_yaml import Apply, Module, Name, New, UpstreamConfigError, _Call, _path_join

__all__ = [
    "CLASSES",
    "FUNCTIONS",
    "PLAIN_DICT_CLASSES",
    "INERT_NAMES",
    "INERT_PREFIXES",
    "IGNORED_APPLY",
    "refusal",
    "resolve",
    "Builder",
    "fixture_config_to_tree",
    "build_from_fixture_config",
]

# upstream class (for !new:) -> cosytrain "module:attr"
CLASSES: dict[str, str] = {
    # v1 (CosyVoice-300M)
    "cosyvoice.llm.llm.TransformerLM": "cosytrain.models.llm:TransformerLM",
    "cosyvoice.transformer.encoder.ConformerEncoder": "cosytrain.models.transformer.encoder:ConformerEncoder",
    "cosyvoice.transformer.encoder.TransformerEncoder": "cosytrain.models.transformer.encoder:TransformerEncoder",
    "cosyvoice.flow.flow.MaskedDiffWithXvec": "cosytrain.models.flow.flow:MaskedDiffWithXvec",
    "cosyvoice.flow.length_regulator.InterpolateRegulator":
        "cosytrain.models.flow.length_regulator:InterpolateRegulator",
    "cosyvoice.flow.flow_matching.ConditionalCFM": "cosytrain.models.flow.flow_matching:ConditionalCFM",
    "cosyvoice.flow.decoder.ConditionalDecoder": "cosytrain.models.flow.decoder:ConditionalDecoder",
    "cosyvoice.hifigan.generator.HiFTGenerator": "cosytrain.models.hift.generator:HiFTGenerator",
    "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor": "cosytrain.models.hift.f0_predictor:ConvRNNF0Predictor",
    # v2 (CosyVoice2) and v3 (CosyVoice3): planned paths, built once those classes exist
    "cosyvoice.llm.llm.Qwen2LM": "cosytrain.models.llm:Qwen2LM",
    "cosyvoice.llm.llm.CosyVoice3LM": "cosytrain.models.llm:CosyVoice3LM",
    "cosyvoice.llm.llm.Qwen2Encoder": "cosytrain.models.llm:Qwen2Encoder",
    "cosyvoice.flow.flow.CausalMaskedDiffWithXvec": "cosytrain.models.flow.flow:CausalMaskedDiffWithXvec",
    "cosyvoice.flow.flow.CausalMaskedDiffWithDiT": "cosytrain.models.flow.flow:CausalMaskedDiffWithDiT",
    "cosyvoice.flow.flow_matching.CausalConditionalCFM": "cosytrain.models.flow.flow_matching:CausalConditionalCFM",
    "cosyvoice.flow.decoder.CausalConditionalDecoder": "cosytrain.models.flow.decoder:CausalConditionalDecoder",
    "cosyvoice.flow.DiT.dit.DiT": "cosytrain.models.flow.dit:DiT",
    "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder":
        "cosytrain.models.transformer.upsample_encoder:UpsampleConformerEncoder",
    "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer": "cosytrain.models.flow.pre_lookahead:PreLookaheadLayer",
    "cosyvoice.hifigan.generator.CausalHiFTGenerator": "cosytrain.models.hift.generator:CausalHiFTGenerator",
    "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor":
        "cosytrain.models.hift.f0_predictor:CausalConvRNNF0Predictor",
    # vocoder GAN discriminators (upstream hifigan section; the HiFiGan wrapper itself stays inert)
    "cosyvoice.hifigan.discriminator.MultipleDiscriminator": "cosytrain.models.hift.discriminator:MultipleDiscriminator",
    "cosyvoice.hifigan.discriminator.MultiResSpecDiscriminator":
        "cosytrain.models.hift.discriminator:MultiResSpecDiscriminator",
    "matcha.hifigan.models.MultiPeriodDiscriminator": "cosytrain.models.hift.discriminator:MultiPeriodDiscriminator",
}

# upstream function (for !name:) -> cosytrain "module:attr"
FUNCTIONS: dict[str, str] = {
    "cosyvoice.utils.common.ras_sampling": "cosytrain.models.sampling:ras_sampling",
    "cosyvoice.utils.common.nucleus_sampling": "cosytrain.models.sampling:nucleus_sampling",
    "cosyvoice.utils.common.random_sampling": "cosytrain.models.sampling:random_sampling",
    "matcha.utils.audio.mel_spectrogram": "cosytrain.data.features:mel_spectrogram",
}

# ``!new:omegaconf.DictConfig {content: {...}}`` (the flow's cfm_params) becomes a plain dict.
PLAIN_DICT_CLASSES = frozenset({"omegaconf.DictConfig"})

# Recognised names that are parsed but never built from a config.
INERT_NAMES = frozenset({
    "whisper.tokenizer.get_tokenizer",
    "cosyvoice.hifigan.hifigan.HiFiGan",
    "cosyvoice.hifigan.discriminator.MultiResolutionDiscriminator",
})
# Every name under these prefixes is inert too (forks add processors/tokenizers of their own).
INERT_PREFIXES = ("cosyvoice.dataset.processor.", "cosyvoice.tokenizer.tokenizer.")

IGNORED_APPLY = frozenset({"random.seed", "numpy.random.seed", "torch.manual_seed", "torch.cuda.manual_seed_all"})


def _is_inert(name: str) -> bool:
    return name in INERT_NAMES or name.startswith(INERT_PREFIXES)


def refusal(call: _Call) -> str | None:
    """Why a tag is refused anywhere in a config (None when it is acceptable to parse)."""
    name = call.target
    if isinstance(call, Module):
        return f"module tag ({call.tag_text}) is refused; cosytrain never imports modules named in a config"
    if isinstance(call, Apply):
        if name in IGNORED_APPLY:
            return None
        return (f"{call.tag_text} is not run; cosytrain ignores only upstream's seed setters"
                f" ({', '.join(sorted(IGNORED_APPLY))})")
    if isinstance(call, New):
        if name in CLASSES or name in PLAIN_DICT_CLASSES or _is_inert(name):
            return None
        return f"unknown class {name!r} ({call.tag_text}); cosytrain builds only known CosyVoice classes"
    if name in FUNCTIONS or name in CLASSES or _is_inert(name):  # !name: of a class is a partial too
        return None
    return f"unknown function {name!r} ({call.tag_text}); cosytrain builds only known CosyVoice functions"


def resolve(upstream_name: str, kind: str = "class") -> Any:
    """Import the cosytrain object for an upstream name (``kind`` 'class' or 'function')."""
    table = CLASSES if kind == "class" else FUNCTIONS
    if upstream_name not in table:
        plural = "classes" if kind == "class" else "functions"
        raise UpstreamConfigError(f"unknown {kind} {upstream_name!r}; cosytrain builds only known CosyVoice {plural}")
    module_name, attr = table[upstream_name].split(":")
    missing = (f"{upstream_name!r} maps to {module_name}:{attr}, which is not implemented yet in cosytrain")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only "our module is not written yet" is that; a missing dependency inside it is a real error.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UpstreamConfigError(missing) from None
        raise
    if not hasattr(module, attr):
        raise UpstreamConfigError(missing)
    return getattr(module, attr)


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
        if isinstance(node, (dict, list, _Call)):
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
            return tuple(self._value(v, _path_join(path, i)) for i, v in enumerate(node))
        if node is None or isinstance(node, (str, int, float, bool)):
            return node
        raise self._fail(path, f"cannot build a {type(node).__name__} (unresolved reference or placeholder?)")

    def _container(self, node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: self._value(v, _path_join(path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self._value(v, _path_join(path, i)) for i, v in enumerate(node)]
        return self._call(node, path)

    def _call(self, node: _Call, path: str) -> Any:
        problem = refusal(node)
        if problem:
            raise self._fail(path, problem)
        if isinstance(node, Apply):
            raise self._fail(path, f"{node.tag_text} is a top-level seed setter; it is ignored, not built")
        if _is_inert(node.target):
            raise self._fail(path, f"{node.tag_text} is recognised but not built by cosytrain (it is not part of"
                                   " the llm/flow/hift models)")
        if isinstance(node, New) and node.target in PLAIN_DICT_CLASSES:
            if node.args or set(node.kwargs) - {"content"}:
                raise self._fail(path, f"{node.tag_text} takes only 'content:'")
            content = self._value(node.kwargs.get("content", {}), _path_join(path, "content"))
            if not isinstance(content, dict):
                raise self._fail(path, f"{node.tag_text} content must be a mapping")
            return dict(content)
        kind = "class" if isinstance(node, New) or node.target in CLASSES else "function"
        try:
            target = resolve(node.target, kind)
        except UpstreamConfigError as exc:
            raise self._fail(path, str(exc)) from None
        args = [self._value(v, _path_join(path, i)) for i, v in enumerate(node.args)]
        kwargs = {k: self._value(v, _path_join(path, k)) for k, v in node.kwargs.items()}
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
    for path, call in _walk_calls(tree, tree.target.rsplit(".", 1)[-1]):
        problem = refusal(call)
        if problem:
            raise UpstreamConfigError(f"fixture config: {path}: {problem}")
    return Builder("fixture config", device=device).build(tree, tree.target.rsplit(".", 1)[-1])


def _walk_calls(node: Any, path: str):
    if isinstance(node, _Call):
        yield path, node
        for k, v in node.kwargs.items():
            yield from _walk_calls(v, _path_join(path, k))
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_calls(v, _path_join(path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_calls(v, _path_join(path, i))
