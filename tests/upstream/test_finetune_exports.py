"""Fine-tuned exports judged by upstream: LoRA SFT and DPO (with LoRA) of the tiny CosyVoice2 recipes,
merged into their base by `cosytrain export`, are built, loaded strictly (llm.pt included) and run by
upstream's own CosyVoice2Model, in the tier's one oracle process (conftest.tiny_verdicts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.upstream._oracle import verdict_ok
from tests.upstream.conftest import TOKENS

pytestmark = pytest.mark.timeout(1800)


@pytest.mark.parametrize("kind", ["lora", "dpo"])
def test_upstream_loads_merged_adapters_strictly_and_speaks(kind: str, tiny_verdicts: dict[str, Any],
                                                            finetune_exports: dict[str, Path],
                                                            tiny_exports: dict[str, dict[str, Path]]) -> None:
    verdict = tiny_verdicts[f"v2_{kind}"]
    verdict_ok(verdict)
    assert verdict["model_type"] == "CosyVoice2Model" and "load" in verdict["passed"]
    offline = verdict["token2wav"]["offline"]
    assert offline["finite"] and offline["samples"] == TOKENS["v2"] * 2 * 480
    merged = torch.load(finetune_exports[kind] / "llm.pt", weights_only=True)
    base = torch.load(tiny_exports["v2"]["run"] / "llm.pt", weights_only=True)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
    assert any(not torch.equal(merged[k], base[k]) for k in merged)
