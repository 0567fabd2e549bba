"""Weights files: reading them without trusting them, and the one strict check before a load.

Every part's weights go through here, whoever loads them (a model directory, ``init_from``, an
export with ``--base``, the vocoder task's ``init_from``, the inference engine's ``load``):

* :func:`load_weights_file` is ``torch.load(weights_only=True)`` with one-line errors (a pickled
  callable is named, never run);
* :func:`clean_part_state_dict` keeps the tensors (upstream's training loop saves ``epoch``/``step``
  beside them) and strips the hift ``generator.`` prefix (a hift saved inside upstream's HiFiGan
  wrapper), as upstream's ``CosyVoiceModel.load`` does;
* :func:`check_state_dict` compares a state dict with a module before ``load_state_dict(strict=True)``
  and raises one :class:`StateDictMismatchError` line: weights of another generation (by their key
  layout, with a few telling keys), or the missing, unexpected and shape-mismatched keys (a first
  dimension alone that differs on a matrix is called out as a vocabulary size).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cosytrain.modeldir.errors import ModelDirError, StateDictMismatchError
from cosytrain.modeldir.generations import GENERATION_NAMES, state_dict_generation
from cosytrain.models.hift.weight_norm import strip_generator_prefix

__all__ = ["load_weights_file", "clean_part_state_dict", "check_state_dict", "load_part_state_dict"]


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
        try:
            tensors = strip_generator_prefix(tensors)
        except ValueError as exc:
            raise ModelDirError(f"{what}: {exc}") from None
    return tensors


def _few(keys: Iterable[str], limit: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} keys)" if len(keys) > limit else "")


def _check_generation(part: str, module: nn.Module, state: Mapping[str, Any], what: str, model_what: str,
                      generation: str | None) -> None:
    guessed, telling = state_dict_generation(part, state)
    if guessed is None:
        return
    # Compare layouts, not labels: a custom v1 config with a 3-stage vocoder looks "v2" on both sides.
    expected = state_dict_generation(part, module.state_dict())[0] or generation
    if expected is not None and guessed != expected:
        raise StateDictMismatchError(
            f"{what}: {part} weights look like {GENERATION_NAMES[guessed]} ({_few(telling)}) but {model_what} is"
            f" {GENERATION_NAMES[generation or expected]}; use a model directory/config of the same generation"
        )


def check_state_dict(
    module: nn.Module,
    state: Mapping[str, Any],
    what: str = "state dict",
    *,
    part: str | None = None,
    generation: str | None = None,
    model_what: str = "the model built from the config",
    fix: str = "check that the config and the checkpoint come from the same model",
    limit: int = 5,
) -> None:
    """Raise one :class:`StateDictMismatchError` line unless ``state`` fits ``module`` exactly.

    ``what`` names the weights (a file), ``model_what`` the module (``the model built from
    cosyvoice.yaml``, ``the recipe's llm``), ``fix`` ends the message. With ``part`` the key layout
    must also be of the module's generation (else ``generation``, the label of its config).
    """
    if part is not None:
        _check_generation(part, module, state, what, model_what, generation)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected if k in given and expected[k] != given[k]]
    if not (missing or unexpected or mismatched):
        return

    def listing(keys: list[str], show: Any = str) -> str:
        more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(show(k) for k in keys[:limit]) + more

    def shapes(k: str) -> str:
        ours, theirs = expected[k], given[k]
        note = ""
        if len(ours) == len(theirs) == 2 and ours[1:] == theirs[1:]:  # an embedding or output layer
            note = f" (vocabulary/first dim {theirs[0]} vs {ours[0]})"
        return f"{k}: model {list(ours)} vs checkpoint {list(theirs)}{note}"

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({listing(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape-mismatched ({listing(mismatched, shapes)})")
    raise StateDictMismatchError(f"{what}: state dict does not fit {model_what}: {'; '.join(problems)}; {fix}")


def load_part_state_dict(part: str, module: nn.Module, state: Mapping[str, torch.Tensor], what: str, *,
                         generation: str | None = None, model_what: str = "the model built from the config",
                         limit: int = 3) -> nn.Module:
    """:func:`check_state_dict` (generation, keys, shapes), then ``load_state_dict(strict=True)``."""
    check_state_dict(module, state, what, part=part, generation=generation, model_what=model_what, limit=limit)
    module.load_state_dict(state, strict=True)
    return module
