"""Oracle script: upstream's ``DPOLoss`` (cosyvoice/utils/losses.py) on given inputs.

Request: ``{"inputs": {policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps: [float]}, "cases": [{"beta", "label_smoothing", "ipo"}]}``; result: the
request plus ``loss``, ``chosen_rewards``, ``rejected_rewards`` per case (float32 inputs, as training).
``tests/tasks/fixtures/dpo_loss_upstream.json`` is this script's output, kept for runs without the oracle.
"""

from __future__ import annotations

from typing import Any

from _upstream_env import main


def run(request: dict[str, Any]) -> dict[str, Any]:
    import torch
    from cosyvoice.utils.losses import DPOLoss

    inputs = {k: torch.tensor(v, dtype=torch.float32) for k, v in request["inputs"].items()}
    cases = []
    for case in request["cases"]:
        loss, chosen, rejected = DPOLoss(**case)(**inputs)
        cases.append({**case, "loss": loss.item(), "chosen_rewards": chosen.tolist(),
                      "rejected_rewards": rejected.tolist()})
    return {"upstream": "cosyvoice/utils/losses.py:DPOLoss", "torch": torch.__version__,
            "inputs": request["inputs"], "cases": cases}


if __name__ == "__main__":
    main(run)
