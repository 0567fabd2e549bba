"""An opened upstream-layout CosyVoice model directory: :class:`ModelDirectory`.

A model directory (``llm.pt``, ``flow.pt``, ``hift.pt`` plus ``cosyvoice.yaml`` /
``cosyvoice2.yaml`` / ``cosyvoice3.yaml``) is usually downloaded, so reading one must never run
code from it: the yaml goes through the inert HyperPyYAML reader (:mod:`cosytrain.modeldir.config`,
which maps tags to known classes or refuses the file) and the weights through
``torch.load(weights_only=True)`` (:mod:`cosytrain.modeldir.weights`).

Loading mirrors upstream so that what loads here loads there and vice versa:

* the yaml is picked in upstream ``AutoModel`` order (``cosyvoice.yaml``, then ``cosyvoice2.yaml``,
  then ``cosyvoice3.yaml``); the file name decides the generation, and the classes the config names
  must agree with it (:func:`cosytrain.modeldir.generations.config_generation`);
* every part is loaded with ``strict=True`` after the one-line checks of
  :func:`cosytrain.modeldir.weights.check_state_dict`; hift keys may carry a ``generator.`` prefix,
  which is stripped as ``CosyVoiceModel.load`` does.

Every failure is one :class:`~cosytrain.modeldir.errors.ModelDirError` line naming the file and the
fix: a missing file, a config of another generation, weights of another generation (with a few
telling keys) or a shape mismatch (naming the keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cosytrain.modeldir.builder import build_parts
from cosytrain.modeldir.config import find_config, load_model_dir_config
from cosytrain.modeldir.errors import ModelDirError
from cosytrain.modeldir.generations import config_generation
from cosytrain.modeldir.layout import PARTS
from cosytrain.modeldir.weights import check_state_dict, clean_part_state_dict, load_part_state_dict, load_weights_file

__all__ = ["ModelDirectory", "open_model_dir", "load_model_dir"]


@dataclass
class ModelDirectory:
    """An opened model directory: its config (inert tree, nothing built yet) and generation."""

    path: Path
    config_path: Path
    config: dict[str, Any]
    generation: str
    _states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def built_from(self) -> str:
        """How errors name a module built from this directory's config."""
        return f"the model built from {self.config_path}"

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
        return build_parts(self.config, parts, device=device, source_name=str(self.config_path))

    def check(self, parts: Iterable[str] = PARTS) -> None:
        """Shape-check the weights against the config without building real modules (meta device)."""
        for part, module in self.build(parts, device="meta").items():
            check_state_dict(module, self.state_dict(part), str(self.weights_path(part)), part=part,
                             generation=self.generation, model_what=self.built_from, limit=3)

    def load(self, parts: Iterable[str] = PARTS, device: Any = "cpu") -> dict[str, nn.Module]:
        """Build ``parts`` and load their weights strictly; modules are returned in eval mode."""
        parts = list(parts)
        for part in parts:  # a missing/unreadable file is reported before anything is built
            self.state_dict(part)
        modules = self.build(parts)
        for part, module in modules.items():
            load_part_state_dict(part, module, self.state_dict(part), str(self.weights_path(part)),
                                 generation=self.generation, model_what=self.built_from)
            module.to(device).eval()
        return modules


def open_model_dir(model_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> ModelDirectory:
    """Find and safely read the config of ``model_dir``; weights are read lazily."""
    model_dir = Path(model_dir)
    config_path = find_config(model_dir)
    try:
        config = load_model_dir_config(model_dir, overrides)
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{config_path}: cannot be read ({exc})") from None
    return ModelDirectory(model_dir, config_path, config, config_generation(config, config_path))


def load_model_dir(model_dir: str | Path, parts: Iterable[str] = PARTS, device: Any = "cpu",
                   overrides: Mapping[str, Any] | None = None) -> tuple[ModelDirectory, dict[str, nn.Module]]:
    """Open ``model_dir`` and return it with its strictly loaded parts."""
    directory = open_model_dir(model_dir, overrides)
    return directory, directory.load(parts, device)
