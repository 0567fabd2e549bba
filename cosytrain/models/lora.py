"""LoRA adapters on a CosyVoice part, with ``peft``: attach, merge, and the recipe's settings.

The adapters are peft's own (``LoraConfig`` + ``get_peft_model``): peft injects its LoRA layers into
the part in place, so the part keeps its class and attributes (``llm.inference``, ``flow.inference``)
and its state-dict keys stay upstream's, with peft's renaming of each adapted layer
(``...q_proj.weight`` -> ``...q_proj.base_layer.weight`` beside ``...q_proj.lora_A.default.weight``).
:func:`merge_lora` folds the adapters back (``merge_and_unload``), after which the part's state dict
is exactly upstream's again (same keys, same shapes).

Attach adapters only AFTER the base weights are loaded: peft wraps the layers it finds, and a base
state dict loaded afterwards no longer matches the renamed keys (the trap fish-speech #1163 fell into,
where loading after attaching silently dropped the base). :func:`attach_lora` refuses a part that
already carries adapters, and the tasks attach right after ``init_from``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Union

from torch import nn

__all__ = ["LoRASpec", "attach_lora", "merge_lora", "default_target_modules", "has_adapters"]

# peft matches a list entry against the end of a module name; a string is a full-match regex
_QWEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_V1_LLM_TARGETS = (r"(text_encoder|llm)\.encoders\.\d+\."
                   r"(self_attn\.(linear_q|linear_k|linear_v|linear_out)|feed_forward\.(w_1|w_2))")
_FLOW_TARGETS = r"decoder\.estimator\..*\.(to_q|to_k|to_v|to_out\.0)"


@dataclass
class LoRASpec:
    """One part's LoRA settings, as a recipe writes them (``lora: {llm: {r: 16, alpha: 32, ...}}``).

    Args:
        r: adapter rank.
        alpha: peft's ``lora_alpha``; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
        dropout: dropout on the adapter's input (peft's ``lora_dropout``).
        target_modules: module-name suffixes (a list) or one full-match regex (a string); None picks the
            part's default (:func:`default_target_modules`).
        train: modules of the part (names or name suffixes, e.g. ``llm_decoder``, ``speech_embedding``)
            that train in full beside the adapters: peft's ``modules_to_save``, so they are saved with the
            adapter and switched off with it; everything else of the part stays frozen.
        use_rslora: rank-stabilised scaling (``alpha / sqrt(r)``).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    train: list[str] = field(default_factory=list)
    use_rslora: bool = False

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | "LoRASpec", what: str = "lora") -> "LoRASpec":
        if isinstance(value, LoRASpec):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{what}: expected a mapping like {{r: 16, alpha: 32}}, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{what}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        spec = cls(**dict(value))
        if int(spec.r) < 1 or float(spec.alpha) <= 0 or not 0.0 <= float(spec.dropout) < 1.0:
            raise ValueError(f"{what}: r must be >= 1, alpha > 0 and 0 <= dropout < 1 (got r={spec.r},"
                             f" alpha={spec.alpha}, dropout={spec.dropout})")
        spec.train = [str(p) for p in (spec.train or [])]
        return spec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def peft_config(self, part: nn.Module) -> Any:
        from peft import LoraConfig

        targets = self.target_modules if self.target_modules is not None else default_target_modules(part)
        return LoraConfig(r=int(self.r), lora_alpha=self.alpha, lora_dropout=float(self.dropout),
                          target_modules=targets, bias="none", use_rslora=bool(self.use_rslora),
                          modules_to_save=list(self.train) or None)


def default_target_modules(part: nn.Module) -> Union[list[str], str]:
    """The attention and feed-forward projections of a part's transformer, by part class."""
    names = {cls.__name__ for cls in type(part).__mro__}
    if "Qwen2LM" in names:  # v2 and v3 (CosyVoice3LM derives from Qwen2LM): the Qwen2 backbone
        return list(_QWEN_TARGETS)
    if "TransformerLM" in names:  # v1: the text encoder and the decoder-only LM
        return _V1_LLM_TARGETS
    if hasattr(part, "decoder") and hasattr(getattr(part, "decoder"), "estimator"):  # the flows' estimators
        return _FLOW_TARGETS
    raise ValueError(f"lora: no default target_modules for {type(part).__name__}; set target_modules")


def has_adapters(part: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in part.modules())


def attach_lora(part: nn.Module, spec: LoRASpec, what: str = "lora") -> Any:
    """Inject LoRA layers into ``part`` in place (its base weights must already be loaded).

    Returns peft's ``PeftModel`` around the part (for ``disable_adapter()``, ``merge_and_unload()`` and
    ``save_pretrained()``); the part itself is what trains. Everything of the part is frozen except the
    adapters and the ``spec.train`` modules.
    """
    from peft import get_peft_model

    if has_adapters(part):
        raise ValueError(f"{what}: the part already carries LoRA adapters; attach once, after the base weights load")
    names = [n for n, _ in part.named_modules() if n]
    for module in spec.train:  # peft ignores a modules_to_save entry that matches nothing
        if not any(n == module or n.endswith("." + module) for n in names):
            raise ValueError(f"{what}.train: {module!r} names no module of the part; modules look like {names[:3]}")
    config = spec.peft_config(part)
    try:
        return get_peft_model(part, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"{what}: {' '.join(str(exc).split())[:300]}; check target_modules") from None


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters into the base weights (peft's ``merge_and_unload``); returns the plain part."""
    return peft_model.merge_and_unload()
