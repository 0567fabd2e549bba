"""Token samplers for LLM inference, same names and arguments as ``cosyvoice.utils.common``.

Upstream sorts probabilities with ``sort(descending=True, stable=True)`` and then samples with
``torch.multinomial``; we do the same so seeded runs draw the same tokens.
"""

from __future__ import annotations

from typing import List

import torch


def nucleus_sampling(weighted_scores: torch.Tensor, top_p: float = 0.8, top_k: int = 25) -> torch.Tensor:
    """Sample from the smallest top-probability set reaching ``top_p`` (at most ``top_k``).

    ``weighted_scores`` is a 1-D vector of logits or log-probabilities. Returns a 1-element
    long tensor holding the token id.
    """
    sorted_value, sorted_idx = weighted_scores.softmax(dim=0).sort(descending=True, stable=True)
    # Count kept entries exactly like upstream's loop: keep adding while the running sum
    # (accumulated in the scores' dtype) is below top_p and fewer than top_k are kept.
    prob, indices = [], []
    cum_prob = 0.0
    for i in range(len(sorted_idx)):
        if cum_prob < top_p and len(prob) < top_k:
            cum_prob += sorted_value[i]
            prob.append(sorted_value[i])
            indices.append(sorted_idx[i])
        else:
            break
    prob_t = torch.tensor(prob).to(weighted_scores)
    indices_t = torch.tensor(indices, dtype=torch.long).to(weighted_scores.device)
    return indices_t[prob_t.multinomial(1, replacement=True)]


def random_sampling(weighted_scores: torch.Tensor, decoded_tokens: List[int], sampling: int) -> torch.Tensor:
    """Sample from the full softmax of ``weighted_scores`` (the other arguments are unused)."""
    return weighted_scores.softmax(dim=0).multinomial(1, replacement=True)


def ras_sampling(
    weighted_scores: torch.Tensor,
    decoded_tokens: List[int],
    sampling: int,
    top_p: float = 0.8,
    top_k: int = 25,
    win_size: int = 10,
    tau_r: float = 0.1,
) -> torch.Tensor:
    """Repetition Aware Sampling (VALL-E 2): nucleus sampling, but if the pick already occurs
    at least ``win_size * tau_r`` times in the last ``win_size`` tokens, resample from the full
    distribution."""
    top_ids = nucleus_sampling(weighted_scores, top_p=top_p, top_k=top_k)
    recent = torch.tensor(decoded_tokens[-win_size:], dtype=torch.long).to(weighted_scores.device)
    rep_num = (recent == top_ids).sum().item()
    if rep_num >= win_size * tau_r:
        top_ids = random_sampling(weighted_scores, decoded_tokens, sampling)
    return top_ids


def greedy_sampling(weighted_scores: torch.Tensor, decoded_tokens: List[int], sampling: int) -> torch.Tensor:
    """The most likely token, every step (ours; upstream has no greedy sampler by that name).

    For speech tokens that repeat by design (the demo's phone x half tokens) it reads best: upstream's
    RAS resamples from the whole distribution whenever the pick repeats, i.e. inside every phone
    (README, "What the demo sounds like"). Exported as :data:`UPSTREAM_EQUIVALENT`: upstream's
    ``ras_sampling`` with ``top_k: 1`` (nucleus keeps only the most likely token) and ``tau_r: 1.1``
    (a repeat count can never reach 1.1 x the window, so it never resamples), which is this function.
    """
    return weighted_scores.argmax().reshape(1)


# What an upstream config names for a sampler of ours that upstream lacks: (upstream function, kwargs)
UPSTREAM_EQUIVALENT = {
    "greedy_sampling": ("cosyvoice.utils.common.ras_sampling", {"top_k": 1, "tau_r": 1.1}),
}
