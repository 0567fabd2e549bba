"""Which upstream names cosytrain builds and which it only recognises (the builder is
:mod:`cosytrain.modeldir.builder`).

An upstream config names classes by their upstream dotted path (``!new:cosyvoice.llm.llm.TransformerLM``).
This module maps each buildable name to a cosytrain object as a lazy ``"module:attr"`` string, so
reading a config imports nothing, and a generation whose classes are not written yet still parses
(building it then says "not implemented yet in cosytrain"). Every target lies in
:mod:`cosytrain.models` or :mod:`cosytrain.data` (``tests/test_architecture.py`` checks it).

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

import importlib
from collections.abc import Mapping
from typing import Any

from cosytrain.modeldir.errors import UpstreamConfigError
from cosytrain.modeldir.yaml_nodes import Apply, Call, Module, New, iter_calls

__all__ = [
    "CLASSES",
    "FUNCTIONS",
    "PLAIN_DICT_CLASSES",
    "INERT_NAMES",
    "INERT_PREFIXES",
    "IGNORED_APPLY",
    "is_inert",
    "refusal",
    "validate_names",
    "resolve",
]

# upstream class (for !new:) -> cosytrain "module:attr"
CLASSES: dict[str, str] = {
    # v1 (CosyVoice-300M)
    "cosyvoice.llm.llm.TransformerLM": "cosytrain.models.llm.transformer_lm:TransformerLM",
    "cosyvoice.transformer.encoder.ConformerEncoder": "cosytrain.models.transformer.encoder:ConformerEncoder",
    "cosyvoice.transformer.encoder.TransformerEncoder": "cosytrain.models.transformer.encoder:TransformerEncoder",
    "cosyvoice.flow.flow.MaskedDiffWithXvec": "cosytrain.models.flow.flow:MaskedDiffWithXvec",
    "cosyvoice.flow.length_regulator.InterpolateRegulator":
        "cosytrain.models.flow.length_regulator:InterpolateRegulator",
    "cosyvoice.flow.flow_matching.ConditionalCFM": "cosytrain.models.flow.flow_matching:ConditionalCFM",
    "cosyvoice.flow.decoder.ConditionalDecoder": "cosytrain.models.flow.decoder:ConditionalDecoder",
    "cosyvoice.hifigan.generator.HiFTGenerator": "cosytrain.models.hift.generator:HiFTGenerator",
    "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor": "cosytrain.models.hift.f0_predictor:ConvRNNF0Predictor",
    # v2 (CosyVoice2) and v3 (CosyVoice3)
    "cosyvoice.llm.llm.Qwen2LM": "cosytrain.models.llm.qwen_lm:Qwen2LM",
    "cosyvoice.llm.llm.CosyVoice3LM": "cosytrain.models.llm.qwen_lm:CosyVoice3LM",
    "cosyvoice.llm.llm.Qwen2Encoder": "cosytrain.models.llm.qwen_lm:Qwen2Encoder",
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


def is_inert(name: str) -> bool:
    """A name recognised in upstream configs but never built by cosytrain."""
    return name in INERT_NAMES or name.startswith(INERT_PREFIXES)


def refusal(call: Call) -> str | None:
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
        if name in CLASSES or name in PLAIN_DICT_CLASSES or is_inert(name):
            return None
        return f"unknown class {name!r} ({call.tag_text}); cosytrain builds only known CosyVoice classes"
    if name in FUNCTIONS or name in CLASSES or is_inert(name):  # !name: of a class is a partial too
        return None
    return f"unknown function {name!r} ({call.tag_text}); cosytrain builds only known CosyVoice functions"


def validate_names(tree: Mapping[str, Any], source: str = "<config>") -> None:
    """Refuse the first tag anywhere in ``tree`` that is neither buildable nor recognised as inert."""
    for path, call in iter_calls(dict(tree)):
        problem = refusal(call)
        if problem:
            raise UpstreamConfigError(f"{source}: {path}: {problem}")


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
