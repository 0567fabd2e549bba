"""Which CosyVoice generation (v1, v2, v3) a config or a part's weights belong to.

Three witnesses, one table (:data:`PART_CLASS_GENERATIONS`, the upstream class of each part):

* a config's file name, which upstream's ``AutoModel`` dispatches on, must agree with the classes
  the config names (:func:`config_generation`; upstream's ``CosyVoice*`` classes assert the same);
* a config written from training runs takes the generation its classes name (:func:`generation_of`);
* weights are recognised by their key layout (:func:`state_dict_generation`), so that a checkpoint
  of another generation is named as such instead of as a list of missing keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cosytrain.modeldir.errors import ModelDirError, UpstreamConfigError
from cosytrain.modeldir.layout import CONFIG_GENERATION

__all__ = ["GENERATION_NAMES", "PART_CLASS_GENERATIONS", "generation_of", "config_generation",
           "state_dict_generation"]

GENERATION_NAMES = {"v1": "CosyVoice 1", "v2": "CosyVoice 2", "v3": "CosyVoice 3"}

# upstream class of each part -> the generations it belongs to
PART_CLASS_GENERATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "llm": {
        "cosyvoice.llm.llm.TransformerLM": ("v1",),
        "cosyvoice.llm.llm.Qwen2LM": ("v2",),
        "cosyvoice.llm.llm.CosyVoice3LM": ("v3",),
    },
    "flow": {
        "cosyvoice.flow.flow.MaskedDiffWithXvec": ("v1",),
        "cosyvoice.flow.flow.CausalMaskedDiffWithXvec": ("v2",),
        "cosyvoice.flow.flow.CausalMaskedDiffWithDiT": ("v3",),
    },
    "hift": {
        "cosyvoice.hifigan.generator.HiFTGenerator": ("v1", "v2"),
        "cosyvoice.hifigan.generator.CausalHiFTGenerator": ("v3",),
    },
}


def generation_of(config: Mapping[str, Any]) -> str:
    """'v1', 'v2' or 'v3' from the llm/flow/hift classes a config names (the newest one a class is
    exclusive to wins; v1/v2's shared vocoder class decides nothing)."""
    found = set()
    for part, classes in PART_CLASS_GENERATIONS.items():
        generations = classes.get(getattr(config.get(part), "target", ""), ())
        if len(generations) == 1:
            found.add(generations[0])
    for generation in ("v3", "v2", "v1"):
        if generation in found:
            return generation
    raise UpstreamConfigError("cannot tell the CosyVoice generation: no known llm/flow/hift class in the config")


def config_generation(config: Mapping[str, Any], config_path: Path) -> str:
    """The file name's generation, after checking that every part class the config names agrees."""
    generation = CONFIG_GENERATION[config_path.name]
    for part, classes in PART_CLASS_GENERATIONS.items():
        node = config.get(part)
        target = getattr(node, "target", None)
        if target is None:
            raise ModelDirError(f"{config_path}: has no '{part}: !new:...' section; upstream needs llm, flow and hift")
        if target not in classes:
            known = ", ".join(classes)
            raise ModelDirError(f"{config_path}: {part} is {target}, not a CosyVoice {part} class ({known})")
        if generation not in classes[target]:
            other = GENERATION_NAMES[classes[target][0]]
            raise ModelDirError(
                f"{config_path}: {part} is {target} ({other}) but upstream AutoModel loads {config_path.name} as "
                f"{GENERATION_NAMES[generation]}; name the file after the model's generation"
            )
    return generation


def state_dict_generation(part: str, state: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """Guess which generation a part's weights belong to from their key layout.

    Returns the generation (or None when the layout is not recognised) and the keys that told.
    """
    keys = list(state)
    if part == "llm":
        v1 = [k for k in keys if k.startswith("text_encoder.")]
        qwen = [k for k in keys if k.startswith("llm.model.")]
        if v1 and not qwen:
            return "v1", v1
        if qwen and not v1:
            return ("v2" if "llm_embedding.weight" in state else "v3"), qwen
    elif part == "flow":
        v1 = [k for k in keys if k.startswith("length_regulator.")]
        v2 = [k for k in keys if k.startswith(("encoder.up_encoders.", "encoder.pre_lookahead_layer."))]
        v3 = [k for k in keys if k.startswith("pre_lookahead_layer.")]
        found = [(g, ks) for g, ks in (("v1", v1), ("v2", v2), ("v3", v3)) if ks]
        if len(found) == 1:
            return found[0]
    elif part == "hift":
        ups = sorted({k.split(".")[1] for k in keys if k.startswith("ups.") and k.split(".")[1].isdigit()})
        if not ups:
            return None, []
        if len(ups) == 2:
            return "v1", [k for k in keys if k.startswith("ups.")]
        pre = [k for k in keys
               if k.startswith("conv_pre.") and k.endswith(("original1", "weight_v", "conv_pre.weight"))]
        if pre and len(ups) == 3:
            kernel = int(state[pre[0]].shape[-1])
            return ("v2" if kernel == 7 else "v3"), pre
    return None, []
