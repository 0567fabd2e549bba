"""DPO: cosytrain's loss (cosytrain.models.llm.dpo.dpo_loss) equals upstream's DPOLoss, computed by upstream's
own code in the oracle. tests/tasks/test_dpo.py holds the same numbers against this script's stored output."""

from __future__ import annotations

import json

import pytest
import torch

from cosytrain.models.llm.dpo import dpo_loss
from tests.tasks.test_dpo import DPO_FIXTURE, DPO_REQUEST


def test_dpo_loss_equals_upstream_live(oracle) -> None:
    upstream = oracle.run("dpo_loss", DPO_REQUEST)
    stored = json.loads(DPO_FIXTURE.read_text())
    inputs = [torch.tensor(v, dtype=torch.float32) for v in DPO_REQUEST["inputs"].values()]
    for case, kept in zip(upstream["cases"], stored["cases"]):
        loss, chosen, rejected = dpo_loss(*inputs, beta=case["beta"], label_smoothing=case["label_smoothing"],
                                          ipo=case["ipo"])
        assert loss.item() == pytest.approx(case["loss"], rel=1e-6, abs=1e-7), case
        assert chosen.tolist() == pytest.approx(case["chosen_rewards"], rel=1e-6, abs=1e-7)
        assert rejected.tolist() == pytest.approx(case["rejected_rewards"], rel=1e-6, abs=1e-7)
        assert case == kept  # the stored fixture is still what upstream computes
