"""The vocoder task's weights, in and out: ``init_from`` files -> generator (+ discriminator), and a
``HiFTTask`` checkpoint -> upstream's plain ``hift.pt``.

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

__all__ = ["hift_state_dict", "discriminator_state_dict", "read_init_weights"]


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
