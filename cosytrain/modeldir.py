"""Read an upstream-layout CosyVoice model directory without trusting it.

A model directory (``llm.pt``, ``flow.pt``, ``hift.pt`` plus ``cosyvoice.yaml`` /
``cosyvoice2.yaml`` / ``cosyvoice3.yaml``) is usually downloaded, so reading one must never run
code from it: the yaml goes through cosytrain's inert HyperPyYAML reader
(:mod:`cosytrain.models.upstream_yaml`, which maps tags to known classes or refuses the file) and
the weights through ``torch.load(weights_only=True)``.

Loading mirrors upstream so that what loads here loads there and vice versa:

* the yaml is picked in upstream ``AutoModel`` order (``cosyvoice.yaml``, then ``cosyvoice2.yaml``,
  then ``cosyvoice3.yaml``); the file name decides the generation, and the classes the config names
  must agree with it (upstream's ``CosyVoice*`` classes assert the same);
* every part is loaded with ``strict=True``; hift keys may carry a ``generator.`` prefix (a hift
  saved inside upstream's HiFiGan wrapper), which is stripped as ``CosyVoiceModel.load`` does.

Every failure is one :class:`ModelDirError` line naming the file and the fix: a missing file, a
config of another generation, weights of another generation (with a few telling keys) or a shape
mismatch (naming the keys).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.upstream_yaml import (
    MODEL_CONFIG_NAMES,
    UpstreamConfigError,
    build_parts,
    check_state_dict,
    load_model_dir_config,
)

__all__ = [
    "PARTS",
    "CONFIG_GENERATION",
    "GENERATION_NAMES",
    "FRONT_END_FILES",
    "ModelDirError",
    "ModelDirectory",
    "find_config",
    "open_model_dir",
    "load_model_dir",
    "load_weights_file",
    "clean_part_state_dict",
    "state_dict_generation",
    "check_part_state_dict",
    "load_part",
]

PARTS = ("llm", "flow", "hift")
# The config file name is what upstream AutoModel dispatches on.
CONFIG_GENERATION = {"cosyvoice.yaml": "v1", "cosyvoice2.yaml": "v2", "cosyvoice3.yaml": "v3"}
GENERATION_NAMES = {"v1": "CosyVoice 1", "v2": "CosyVoice 2", "v3": "CosyVoice 3"}
# Files the upstream front end reads beside the weights (copied by the exporter when present).
FRONT_END_FILES = ("campplus.onnx", "speech_tokenizer_v1.onnx", "speech_tokenizer_v2.onnx",
                   "speech_tokenizer_v3.onnx", "spk2info.pt")

# upstream class of each part -> the generations it belongs to
_PART_CLASS_GENERATIONS: dict[str, dict[str, tuple[str, ...]]] = {
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


class ModelDirError(ConfigurationError):
    """A model directory (or a weights file) was refused; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def find_config(model_dir: str | Path) -> Path:
    """The yaml upstream ``AutoModel`` would use (first of cosyvoice.yaml, cosyvoice2.yaml, cosyvoice3.yaml)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: not a directory; give an upstream-layout CosyVoice model directory")
    for name in MODEL_CONFIG_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise ModelDirError(f"{model_dir}: no {', '.join(MODEL_CONFIG_NAMES)} found; is this a CosyVoice model directory?")


def _config_generation(config: Mapping[str, Any], config_path: Path) -> str:
    """The file name's generation, after checking that every part class the config names agrees."""
    generation = CONFIG_GENERATION[config_path.name]
    for part, classes in _PART_CLASS_GENERATIONS.items():
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


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def load_weights_file(path: str | Path, what: str | None = None) -> Any:
    """``torch.load(path, 'cpu', weights_only=True)`` with one-line errors (missing file, pickled code)."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise ModelDirError(f"{what}: file not found")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # mmap needs the zip format; old-style files load without it
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines() if line.strip()]
        # torch names the refused callable on a line of its own ("Unsupported global: GLOBAL os.system ...")
        first = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                     lines[0] if lines else type(exc).__name__)
        raise ModelDirError(
            f"{what}: holds pickled Python objects that torch.load(weights_only=True) refuses ({first[:160]});"
            " cosytrain loads plain tensors only - re-save it as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelDirError(f"{what}: cannot be read as a torch file ({first[:160]})") from None


def clean_part_state_dict(part: str, state: Any, what: str) -> dict[str, torch.Tensor]:
    """Plain ``{key: tensor}`` for ``part``: non-tensor entries dropped (upstream's train loop saves
    ``epoch``/``step`` beside the weights), the hift ``generator.`` prefix stripped."""
    if not isinstance(state, Mapping):
        raise ModelDirError(f"{what}: expected a state dict (a mapping of names to tensors),"
                            f" got {type(state).__name__}")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelDirError(f"{what}: contains no tensors")
    if part == "hift":
        from cosytrain.models.hift.weight_norm import strip_generator_prefix

        try:
            tensors = strip_generator_prefix(tensors)
        except ValueError as exc:
            raise ModelDirError(f"{what}: {exc}") from None
    return tensors


def _few(keys: Iterable[str], limit: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} keys)" if len(keys) > limit else "")


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


def check_part_state_dict(part: str, module: nn.Module, state: Mapping[str, Any], generation: str,
                          what: str, config_what: str) -> None:
    """One-line error before a strict load: weights of another generation, or mismatched keys/shapes."""
    guessed, telling = state_dict_generation(part, state)
    if guessed is not None:
        # Compare layouts, not labels: a custom v1 config with a 3-stage vocoder looks "v2" on both sides.
        expected = state_dict_generation(part, module.state_dict())[0] or generation
        if guessed != expected:
            raise ModelDirError(
                f"{what}: {part} weights look like {GENERATION_NAMES[guessed]} ({_few(telling)}) but {config_what} is"
                f" {GENERATION_NAMES[generation]}; use a model directory/config of the same generation"
            )
    try:
        check_state_dict(module, state, name=what, limit=3)
    except UpstreamConfigError as exc:
        raise ModelDirError(str(exc)) from None


def load_part(part: str, module: nn.Module, state: Mapping[str, torch.Tensor], generation: str, what: str,
              config_what: str) -> nn.Module:
    """Strictly load ``state`` into ``module`` after the one-line checks."""
    check_part_state_dict(part, module, state, generation, what, config_what)
    module.load_state_dict(state, strict=True)
    return module


# --------------------------------------------------------------------------------------------------
# The directory
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelDirectory:
    """An opened model directory: its config (inert tree, nothing built yet) and generation."""

    path: Path
    config_path: Path
    config: dict[str, Any]
    generation: str
    _states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def weights_path(self, part: str) -> Path:
        if part not in PARTS:
            raise ModelDirError(f"unknown part {part!r}; parts are {', '.join(PARTS)}")
        return self.path / f"{part}.pt"

    def state_dict(self, part: str) -> dict[str, torch.Tensor]:
        """The part's weights as upstream would load them (cached)."""
        if part not in self._states:
            path = self.weights_path(part)
            if not path.is_file():
                needed = ", ".join(p + ".pt" for p in PARTS)
                raise ModelDirError(f"{path}: not found; a CosyVoice model directory needs {needed}")
            self._states[part] = clean_part_state_dict(part, load_weights_file(path), str(path))
        return self._states[part]

    def build(self, parts: Iterable[str] = PARTS, device: Any = None) -> dict[str, nn.Module]:
        """Instantiate ``parts`` from the config with cosytrain classes (random weights)."""
        parts = list(parts)
        try:
            return build_parts(self.config, parts, device=device, source_name=str(self.config_path))
        except UpstreamConfigError as exc:
            raise ModelDirError(str(exc)) from None

    def check(self, parts: Iterable[str] = PARTS) -> None:
        """Shape-check the weights against the config without building real modules (meta device)."""
        for part, module in self.build(parts, device="meta").items():
            check_part_state_dict(part, module, self.state_dict(part), self.generation,
                                  str(self.weights_path(part)), str(self.config_path))

    def load(self, parts: Iterable[str] = PARTS, device: Any = "cpu") -> dict[str, nn.Module]:
        """Build ``parts`` and load their weights strictly; modules are returned in eval mode."""
        parts = list(parts)
        for part in parts:  # a missing/unreadable file is reported before anything is built
            self.state_dict(part)
        modules = self.build(parts)
        for part, module in modules.items():
            load_part(part, module, self.state_dict(part), self.generation, str(self.weights_path(part)),
                      str(self.config_path))
            module.to(device).eval()
        return modules


def open_model_dir(model_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> ModelDirectory:
    """Find and safely read the config of ``model_dir``; weights are read lazily."""
    model_dir = Path(model_dir)
    config_path = find_config(model_dir)
    try:
        config = load_model_dir_config(model_dir, overrides)
    except UpstreamConfigError as exc:
        raise ModelDirError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{config_path}: cannot be read ({exc})") from None
    return ModelDirectory(model_dir, config_path, config, _config_generation(config, config_path))


def load_model_dir(model_dir: str | Path, parts: Iterable[str] = PARTS, device: Any = "cpu",
                   overrides: Mapping[str, Any] | None = None) -> tuple[ModelDirectory, dict[str, nn.Module]]:
    """Open ``model_dir`` and return it with its strictly loaded parts."""
    directory = open_model_dir(model_dir, overrides)
    return directory, directory.load(parts, device)
