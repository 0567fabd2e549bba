"""DPO for the speech-token LMs: sequence log-probabilities of chosen/rejected tokens and the loss.

Upstream's formulation (``cosyvoice/llm/llm.py:Qwen2LM.forward_dpo``, ``cosyvoice/utils/losses.py:DPOLoss``,
``cosyvoice/utils/train_utils.py:batch_forward``): each utterance has chosen speech tokens
(``speech_token``) and rejected ones (``reject_speech_token``); both are laid out with the same text
(and speaker embedding / instruction) in ONE forward over a 2B batch, chosen first; the chosen half
gives the usual SFT loss and accuracy; each sequence's log-probability is the mean over its target
positions; :func:`dpo_loss` is ``DPOLoss`` (sigmoid DPO with conservative label smoothing, or IPO);
the total is ``dpo + sft``.

Differences from upstream, on purpose:

* Upstream averages the log-probabilities over the positions whose target IS ``IGNORE_ID``
  (``mask = target == IGNORE_ID``: the text prompt and the padding, scored as token 0), not over the
  speech tokens - a known bug (FunAudioLLM/CosyVoice issue #1449, fix proposed in PR #1855). Here the
  mean runs over the target positions (speech tokens and the end/fill tokens), as DPO intends.
* Upstream's ``forward_dpo`` exists for ``Qwen2LM`` only (``CosyVoice3LM`` inherits it but it reads
  ``llm_embedding``, which v3 does not have, and drops the instruction). Here any LM with
  ``logits_and_target`` works: v1 ``TransformerLM``, v2 ``Qwen2LM`` and v3 ``CosyVoice3LM`` (its
  instruction tokens repeated for the rejected half).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from cosytrain.models.common import IGNORE_ID, th_accuracy

__all__ = ["REJECT_KEY", "pair_batch", "sequence_logps", "dpo_loss"]

REJECT_KEY = "reject_speech_token"  # upstream's column and batch key (cosyvoice/dataset/processor.py)
_REPEATED = ("text_token", "text_token_len", "embedding", "instruct_token", "instruct_token_len")


def pair_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The 2B batch of upstream's ``forward_dpo``: chosen rows, then the same rows with the rejected tokens."""
    for key in (REJECT_KEY, REJECT_KEY + "_len"):
        if key not in batch:
            raise ValueError(f"DPO needs '{key}' in every batch: train on preference shards (python -m cosytrain"
                             " dpo-pairs writes them), whose rows carry a reject_speech_token column")
    chosen = [t[:int(n)] for t, n in zip(batch["speech_token"], batch["speech_token_len"])]
    rejected = [t[:int(n)] for t, n in zip(batch[REJECT_KEY], batch[REJECT_KEY + "_len"])]
    paired: dict[str, Any] = {"speech_token": pad_sequence(chosen + rejected, batch_first=True, padding_value=0),
                              "speech_token_len": torch.cat([torch.as_tensor(batch["speech_token_len"]),
                                                             torch.as_tensor(batch[REJECT_KEY + "_len"])])}
    for key in _REPEATED:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            paired[key] = torch.cat([value, value], dim=0)
    return paired


def sequence_logps(llm: nn.Module, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """``loss``/``acc`` of the chosen half (SFT) and the mean log-probability of every chosen/rejected sequence."""
    n = int(batch["speech_token"].shape[0])
    logits, target = llm.logits_and_target(pair_batch(batch), device)
    loss = llm.criterion_ce(logits[:n], target[:n])
    acc = th_accuracy(logits[:n].reshape(-1, logits.shape[-1]), target[:n], ignore_label=IGNORE_ID)
    scored = target != IGNORE_ID
    logp = torch.gather(logits.float().log_softmax(dim=-1), 2, target.masked_fill(~scored, 0).unsqueeze(-1)).squeeze(-1)
    mean = (logp * scored).sum(dim=-1) / scored.sum(dim=-1).clamp_min(1)
    return {"loss": loss, "acc": acc, "chosen_logps": mean[:n], "rejected_logps": mean[n:]}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.01, label_smoothing: float = 0.0, ipo: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream's ``DPOLoss.forward``: (loss, chosen rewards, rejected rewards); rewards are detached.

    ``beta`` 0.01, no smoothing, no IPO are upstream's ``bin/train.py`` settings.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2  # Eq. 17 of arXiv:2310.12036v2
    else:  # conservative DPO (Eq. 3 of cdpo.pdf); label_smoothing 0 is the original DPO (Eq. 7 of arXiv:2305.18290)
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
