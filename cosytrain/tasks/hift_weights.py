"""The vocoder task's weights, in and out: ``init_from`` files -> generator (+ discriminator), a
``HiFTTask`` checkpoint -> upstream's plain ``hift.pt``, or -> a ready generator module
(:func:`load_hift_checkpoint`, the ``SynthesisCallback`` vocoder named by a ``.ckpt`` path).

Checkpoint keys are ``hift.*`` (the generator, exported as ``hift.pt`` by a prefix split: see
:func:`hift_state_dict`) and ``discriminator.*`` (upstream's ``MultipleDiscriminator`` names, so an
upstream ``HiFiGan`` checkpoint's ``discriminator.*`` loads). Files are read weights-only
(:func:`cosytrain.modeldir.load_weights_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from cosytrain.errors import ConfigurationError
from cosytrain.modeldir import clean_part_state_dict, load_weights_file
from cosytrain.models.hift.weight_norm import strip_generator_prefix

__all__ = ["hift_state_dict", "discriminator_state_dict", "read_init_weights", "load_hift_checkpoint"]


def _unwrap_state_dict(checkpoint: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_weights_file(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise ConfigurationError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ConfigurationError("checkpoint['state_dict'] is not a mapping")
    return state


def _prefixed(state: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        if key.startswith(prefix) and isinstance(value, torch.Tensor):
            out[key[len(prefix):]] = value
    return out


def hift_state_dict(checkpoint: Mapping[str, Any] | str | Path) -> dict[str, torch.Tensor]:
    """The generator's plain state dict (upstream ``hift.pt`` layout) from a HiFTTask checkpoint.

    Accepts a Lightning checkpoint (dict or path) or its ``state_dict``; keys ``hift.*`` with the
    prefix split off, nothing of the discriminator.
    """
    state = _prefixed(_unwrap_state_dict(checkpoint), "hift.")
    if not state:
        raise ConfigurationError("checkpoint has no 'hift.*' weights; is it a HiFTTask checkpoint?")
    return state


def discriminator_state_dict(checkpoint: Mapping[str, Any] | str | Path) -> dict[str, torch.Tensor]:
    """``discriminator.*`` of a HiFTTask checkpoint, prefix split off (upstream MultipleDiscriminator keys)."""
    return _prefixed(_unwrap_state_dict(checkpoint), "discriminator.")


def read_init_weights(init_from: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """(generator state, discriminator state or {}, what to call the source) from a model directory's
    ``hift.pt``, an upstream ``HiFiGan`` checkpoint, a bare ``hift.pt`` or a ``HiFTTask`` checkpoint."""
    path = Path(init_from)
    if path.is_dir():
        what = str(path / "hift.pt")
        raw = load_weights_file(path / "hift.pt", what)
        tensors = raw if not isinstance(raw, Mapping) else {k: v for k, v in raw.items()}
        # a whole HiFiGan saved as hift.pt also carries discriminator.* keys: take them too
        disc = _prefixed(tensors, "discriminator.") if isinstance(tensors, Mapping) else {}
        if disc:
            tensors = {k: v for k, v in tensors.items() if not str(k).startswith("discriminator.")}
        gen = clean_part_state_dict("hift", tensors, what)
    elif path.is_file():
        state = _unwrap_state_dict(load_weights_file(path))
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if any(k.startswith("hift.") for k in tensors):  # a HiFTTask checkpoint
            gen, disc = _prefixed(tensors, "hift."), _prefixed(tensors, "discriminator.")
        else:  # upstream HiFiGan (generator.* + discriminator.*) or a bare hift.pt
            disc = _prefixed(tensors, "discriminator.")
            gen = strip_generator_prefix({k: v for k, v in tensors.items() if not k.startswith("discriminator.")})
        what = str(path)
    else:
        raise FileNotFoundError(f"init_from: {path} is neither a model directory nor a checkpoint file")
    return gen, disc, what


def _run_config_beside(checkpoint: Path) -> Path:
    """LightningCLI's ``config.yaml`` of the run that wrote ``checkpoint`` (its folder or one up)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ConfigurationError(f"{checkpoint}: no config.yaml beside it or one folder up (LightningCLI writes it in the"
                             " run folder); name a checkpoint inside its run folder, or export it to a model directory")


def load_hift_checkpoint(checkpoint: str | Path) -> torch.nn.Module:
    """The generator of a ``HiFTTask`` checkpoint, built from its run's ``config.yaml``, in eval mode.

    The module is the ``model.init_args.hift`` section of that config (``class_path``/``init_args``, as
    LightningCLI saved it) with the checkpoint's ``hift.*`` weights loaded strictly; nothing else of the
    run is needed. Bad input is one :class:`ConfigurationError` line naming the file.
    """
    import yaml

    from cosytrain.tasks.part_config import instantiate_part

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigurationError(f"HiFT checkpoint {path} not found; train one with recipes/hift_demo.yaml")
    config_path = _run_config_beside(path)
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        section = config["model"]["init_args"]["hift"]
        if not isinstance(section, dict) or "class_path" not in section:
            raise KeyError("hift")
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{config_path}: no model.init_args.hift class_path section ({type(exc).__name__});"
                                 " is it the config of a HiFTTask run?") from None
    state = hift_state_dict(path)
    try:
        module = instantiate_part(section)
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - one line naming both files
        raise ConfigurationError(f"{path}: its hift weights do not build/load with {config_path}'s hift section"
                                 f" ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    return module.eval().requires_grad_(False)
