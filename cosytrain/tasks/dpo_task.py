"""``DPOTask``: preference training of the LLM, upstream's ``--dpo`` in Lightning.

Upstream (``cosyvoice/bin/train.py --dpo``) trains the LLM with ``forward_dpo`` against a frozen
reference model (a deep copy loaded from ``--ref_model``) and logs ``sft_loss``, ``dpo_loss``,
``dpo_acc`` (share of pairs whose chosen reward beats the rejected one), ``chosen_reward`` and
``reject_reward``; the loss is ``dpo_loss + sft_loss``. Here the maths are
:mod:`cosytrain.models.llm.dpo` (upstream's ``DPOLoss``; see there for the log-probability mask
upstream gets wrong) and the logged names are upstream's, under ``train/`` and ``val/``.

The reference model:

* with LoRA on the llm (``lora: {llm: {...}}``) it is the base itself: the same module with its
  adapters switched off (peft's ``disable_adapter()``), so there is no second copy in memory;
* otherwise a frozen copy of the llm loaded from ``reference_from`` (default ``init_from``, what
  upstream's recipes pass as ``--ref_model``). It is not saved in checkpoints (it is the file it was
  loaded from, read again on resume) and it stays in eval mode.

The reference runs in eval mode (no dropout) and sees the same uni/bistream layouts as the policy
(python's ``random`` is replayed for it); upstream runs its copy in train mode with fresh draws, which
makes the DPO logits noisy by dropout and layout. Both choices are deliberate and noted here.
"""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from cosytrain.models.llm.dpo import dpo_loss, sequence_logps
from cosytrain.tasks.speech_task import SpeechTask, _batch_size, load_part_weights

__all__ = ["DPOTask"]

_STATE_KEYS = ("state_dict", "current_model_state")
_REFERENCE = "reference."


class DPOTask(SpeechTask):
    """DPO on the llm (see the module docstring).

    Args:
        llm, train_conf, freeze, init_from, step_seed, lora: as :class:`~cosytrain.tasks.speech_task.SpeechTask`.
        beta: DPO temperature (upstream 0.01).
        label_smoothing: conservative-DPO smoothing (upstream 0).
        ipo: the IPO loss instead of the sigmoid one (upstream False).
        sft_weight: weight of the chosen half's SFT loss in the total (upstream 1).
        reference_from: model directory of the reference llm; default ``init_from``. Not with LoRA (the
            reference is then the base the adapters sit on).
    """

    def __init__(self, llm: nn.Module, train_conf: dict[str, Any] | None = None, freeze: list[str] | None = None,
                 init_from: str | None = None, step_seed: int | None = 1986,
                 lora: dict[str, dict[str, Any]] | None = None, beta: float = 0.01, label_smoothing: float = 0.0,
                 ipo: bool = False, sft_weight: float = 1.0, reference_from: str | None = None) -> None:
        super().__init__(llm=llm, train_conf=train_conf, freeze=freeze, init_from=init_from, step_seed=step_seed,
                         lora=lora)
        if float(beta) <= 0 or not 0.0 <= float(label_smoothing) < 0.5:
            raise ValueError(f"DPO: beta must be > 0 and 0 <= label_smoothing < 0.5 (got {beta}, {label_smoothing})")
        self.beta, self.label_smoothing, self.ipo, self.sft_weight = float(beta), float(label_smoothing), bool(ipo), \
            float(sft_weight)
        self.reference: nn.Module | None = None
        if self.adapters is not None and "llm" in self.adapters.specs:
            if reference_from not in (None, init_from):
                raise ValueError("DPO with LoRA: the reference is the base the adapters sit on (init_from);"
                                 " leave reference_from unset")
            return
        source = reference_from or init_from
        if not source:
            raise ValueError("DPO needs a reference model: set init_from (the model being tuned, also the reference)"
                             " or reference_from (a model directory holding llm.pt)")
        reference = copy.deepcopy(self.llm)
        load_part_weights("llm", reference, source)
        self.reference = reference.requires_grad_(False).eval()

    # ------------------------------------------------------------------ the reference model
    def train(self, mode: bool = True) -> "DPOTask":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The frozen reference, in eval mode: the copy, or the llm with its adapters off."""
        if self.reference is not None:
            yield self.reference
            return
        was_training = self.llm.training
        self.llm.eval()
        try:
            assert self.adapters is not None
            with self.adapters.disabled("llm"):
                yield self.llm
        finally:
            self.llm.train(was_training)

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        before = random.getstate()  # v2/v3 draw each row's layout from python's random
        policy = sequence_logps(self.llm, batch, self.device)
        after = random.getstate()
        random.setstate(before)  # the reference sees the layouts the policy saw
        with torch.no_grad(), self.reference_model() as reference:
            ref = sequence_logps(reference, batch, self.device)
        random.setstate(after)
        preference, chosen_reward, reject_reward = dpo_loss(
            policy["chosen_logps"], policy["rejected_logps"], ref["chosen_logps"], ref["rejected_logps"],
            beta=self.beta, label_smoothing=self.label_smoothing, ipo=self.ipo)
        loss = preference + self.sft_weight * policy["loss"]
        figures = {"loss": loss, "sft_loss": policy["loss"], "dpo_loss": preference, "acc": policy["acc"],
                   "dpo_acc": (chosen_reward > reject_reward).float().mean(), "chosen_reward": chosen_reward.mean(),
                   "reject_reward": reject_reward.mean(), "chosen_logps": policy["chosen_logps"].mean(),
                   "rejected_logps": policy["rejected_logps"].mean()}
        batch_size = _batch_size(batch)
        for key, value in figures.items():
            self.log(f"{stage}/{key}", value.detach().float(), batch_size=batch_size, prog_bar=key == "loss",
                     sync_dist=stage != "train")
        return loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        for key in _STATE_KEYS:  # the reference is its model directory's file, read again on resume
            state = checkpoint.get(key)
            if isinstance(state, Mapping):
                checkpoint[key] = {k: v for k, v in state.items() if not k.startswith(_REFERENCE)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:
            live = {f"{_REFERENCE}{k}": v for k, v in self.reference.state_dict().items()}
            for key in _STATE_KEYS:
                state = checkpoint.get(key)
                if isinstance(state, Mapping):
                    checkpoint[key] = {**live, **{k: v for k, v in state.items() if not k.startswith(_REFERENCE)}}
        super().on_load_checkpoint(checkpoint)
