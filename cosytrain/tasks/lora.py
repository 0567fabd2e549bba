"""LoRA fine-tuning inside a task: adapters on the parts, checkpoints that hold only what trains.

A task built with ``lora: {llm: {r: 16, alpha: 32, ...}}`` (see :class:`cosytrain.models.lora.LoRASpec`)
loads its base weights from ``init_from`` FIRST and attaches peft's adapters right after
(:func:`cosytrain.models.lora.attach_lora`), so step 0 computes exactly what the base computes. The
base is read on every start, resume included: a LoRA checkpoint holds the adapters, the modules
the recipe trains in full (``train``), the buffers and the training state, and not the frozen base weights
(megabytes instead of gigabytes). Without the base the adapters mean nothing, so a missing base is a
one-line error, and a base whose file changed since the adapters were trained (its sha256 is kept in
the checkpoint) is refused.

How the checkpoint is kept small and still restores strictly: ``strip`` drops the frozen keys of the
adapted parts from ``state_dict`` (and from the raw weights an EMA callback moves to
``current_model_state``) when Lightning saves; ``fill`` puts the live module's frozen values back
before Lightning loads, after checking every trainable key is there and the base is the same.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from torch import nn

from cosytrain.models.lora import LoRASpec, attach_lora
from cosytrain.utils.hashing import file_sha256

__all__ = ["Adapters", "CHECKPOINT_KEY"]

# checkpoint["cosytrain"][CHECKPOINT_KEY] = {part: {"config": spec, "base_sha256": ..., "init_from": ...}}
CHECKPOINT_KEY = "lora"
_STATE_KEYS = ("state_dict", "current_model_state")  # the EMA callback keeps the raw weights in the latter


class Adapters:
    """The LoRA adapters of one task's parts (``specs``: part name -> settings)."""

    def __init__(self, specs: Mapping[str, LoRASpec], init_from: str) -> None:
        self.specs = dict(specs)
        self.init_from = str(init_from)
        self.peft: dict[str, Any] = {}  # part -> peft's PeftModel around it (not a registered submodule)
        self.base_sha256: dict[str, str] = {}
        self.frozen_keys: set[str] = set()  # task state-dict keys that come from the base, never saved

    @classmethod
    def from_config(cls, lora: Optional[Mapping[str, Any]], part_names: list[str],
                    init_from: Optional[str]) -> Optional["Adapters"]:
        """``lora`` as the recipe gives it: ``{part: {r, alpha, ...}}``; None or empty: no adapters."""
        if not lora:
            return None
        if not isinstance(lora, Mapping):
            raise ValueError(f"lora: expected {{part: {{r: 16, alpha: 32, ...}}}} with part one of"
                             f" {', '.join(part_names)}; got {lora!r}")
        unknown = [p for p in lora if p not in part_names]
        if unknown:
            raise ValueError(f"lora: {', '.join(map(str, unknown))} is not a part of this task"
                             f" (parts: {', '.join(part_names)}); key the settings by part, e.g. lora: {{llm: {{r: 16}}}}")
        if not init_from:
            raise ValueError("lora: adapters train on top of a base model, so init_from must name the model"
                             " directory whose weights they adapt")
        specs = {part: LoRASpec.from_dict(value or {}, f"lora.{part}") for part, value in lora.items()}
        return cls(specs, init_from)

    # ------------------------------------------------------------------ construction
    def check_base(self) -> None:
        """One line when a base part file is missing (on a first run and on every resume)."""
        for part in self.specs:
            path = Path(self.init_from) / f"{part}.pt"
            if not path.is_file():
                raise FileNotFoundError(
                    f"lora: the base {path} is not there; LoRA checkpoints hold only the adapters and the base"
                    " weights are read from init_from on every start, resume included: put the model directory"
                    " back or point --model.init_args.init_from at it")

    def attach(self, task: nn.Module) -> None:
        """Attach the adapters to the task's parts; call right after the base weights are loaded."""
        for part, spec in self.specs.items():
            self.base_sha256[part] = file_sha256(Path(self.init_from) / f"{part}.pt")
            self.peft[part] = attach_lora(getattr(task, part), spec, f"lora.{part}")
        for key, value in task.state_dict(keep_vars=True).items():
            if key.partition(".")[0] in self.specs and isinstance(value, nn.Parameter) and not value.requires_grad:
                self.frozen_keys.add(key)

    def record(self) -> dict[str, Any]:
        """What export and resume need to know (kept in ``checkpoint['cosytrain']['lora']``)."""
        return {part: {"config": spec.to_dict(), "init_from": self.init_from, "base_sha256": self.base_sha256[part]}
                for part, spec in self.specs.items()}

    # ------------------------------------------------------------------ checkpoints
    def strip(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen base weights from a checkpoint being saved; record the adapters' settings."""
        for key in _STATE_KEYS:
            state = checkpoint.get(key)
            if isinstance(state, Mapping):
                checkpoint[key] = {k: v for k, v in state.items() if k not in self.frozen_keys}
        checkpoint.setdefault("cosytrain", {})[CHECKPOINT_KEY] = self.record()

    def fill(self, checkpoint: dict[str, Any], task: nn.Module) -> None:
        """Before Lightning loads: same base, every trainable key present, frozen keys from the live base."""
        saved = (checkpoint.get("cosytrain") or {}).get(CHECKPOINT_KEY)
        if not isinstance(saved, Mapping):
            raise ValueError("ckpt_path: the checkpoint was not trained with LoRA adapters but the recipe sets lora;"
                             " resume it with the recipe it was trained with (or drop ckpt_path to start fresh)")
        for part in self.specs:
            record = saved.get(part)
            if not isinstance(record, Mapping):
                raise ValueError(f"ckpt_path: the checkpoint holds no LoRA adapters for {part}; use the lora settings"
                                 " it was trained with")
            if record.get("base_sha256") != self.base_sha256[part]:
                raise ValueError(f"init_from {Path(self.init_from) / (part + '.pt')} is not the base these adapters were"
                                 f" trained on (sha256 differs from the checkpoint's, trained on {record.get('init_from')});"
                                 " point init_from at the original base model directory")
        live = task.state_dict()
        for key in _STATE_KEYS:
            state = checkpoint.get(key)
            if not isinstance(state, Mapping):
                continue
            missing = [k for k in live if k not in self.frozen_keys and k not in state
                       and k.partition(".")[0] in self.specs]
            if missing:
                raise ValueError(f"ckpt_path: {len(missing)} trainable LoRA entries are missing from the checkpoint's"
                                 f" {key} ({', '.join(missing[:3])}); the lora settings differ from the training run's")
            checkpoint[key] = {**{k: live[k] for k in self.frozen_keys}, **state}

    # ------------------------------------------------------------------ the base alone
    @contextmanager
    def disabled(self, part: str) -> Iterator[None]:
        """The part computes as its base (peft's ``disable_adapter()``, which also switches the ``train``
        modules back to their originals): DPO's reference model, without a second copy."""
        with self.peft[part].disable_adapter():
            yield
