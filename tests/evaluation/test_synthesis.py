"""Validation by synthesis on the v1, v2 and v3 fixture parts: every condition runs through the inference
classes, is seeded, leaves the caller's RNG and train flags alone, and the vocoder floor scores 0 against a
recording made by the same vocoder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cosytrain.evaluation import fp16_batches as C
from cosytrain.evaluation.synthesis import CONDITIONS, SynthesisItem, average, score, synthesize_items
from tests.conftest import load_fixture
from tests.evaluation.test_fp16_check import _built

MEL = {"v1": dict(sample_rate=22050), "v2": dict(sample_rate=24000, n_fft=1920, hop_size=480, win_size=1920,
                                                  frames_per_token=2), "v3": None}
MEL["v3"] = MEL["v2"]


def _parts(gen: str, tmp_path: Path) -> dict[str, torch.nn.Module]:
    if gen == "v1":
        return {"llm": _built("llm"), "flow": _built("flow"), "hift": _built("hift")}
    from tests.models.test_llm_v2 import build_fixture_model, make_qwen_dir

    fx = load_fixture(f"{gen}_llm")
    llm = build_fixture_model(fx, make_qwen_dir(tmp_path / "qwen", fx["qwen2_config"], weights=False))
    return {"llm": llm, "flow": _built(f"{gen}_flow"), "hift": _built(f"hift_{gen}")}


def _items(batch: dict, hift: torch.nn.Module) -> list[SynthesisItem]:
    items = []
    for i in range(2):
        n_tok, n_feat = int(batch["speech_token_len"][i]), int(batch["speech_feat_len"][i])
        feat = batch["speech_feat"][i:i + 1, :n_feat]
        torch.manual_seed(11 + 1000 * i)  # the seed synthesize_items(seed=11) gives vocoder_gt of utterance i
        recording = hift.inference(speech_feat=feat.transpose(1, 2))[0][0].detach()  # what the vocoder makes of it
        items.append(SynthesisItem(utt=f"u{i}", spk="s", text="a b", text_token=batch["text_token"][i:i + 1,
                                   :int(batch["text_token_len"][i])], speech_token=batch["speech_token"][i:i + 1, :n_tok],
                                   speech_feat=feat, embedding=batch["embedding"][i:i + 1], wav=recording,
                                   sample_rate=int(getattr(hift, "sampling_rate"))))
    items[0].prompt = items[1]
    return items


@pytest.mark.parametrize("gen", ["v1", "v2", "v3"])
def test_every_condition_runs_seeded_and_restores_state(gen: str, tmp_path: Path) -> None:
    parts = _parts(gen, tmp_path)
    batch = C.synthetic_batch(2, text_vocab=100, speech_vocab=40 if gen == "v1" else 60, min_tokens=10,
                              max_tokens=14, seed=3, **MEL[gen])
    items = _items(batch, parts["hift"])
    for module in parts.values():
        module.train()
    random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)

    results = synthesize_items(items[:1], vocoder=parts["hift"], llm=parts["llm"], flow=parts["flow"], seed=11)

    assert (random.random(), torch.rand(1)) == expected  # the caller's RNG streams are untouched
    assert all(m.training for module in parts.values() for m in module.modules())
    result = results[0]
    assert set(result.wavs) == set(CONDITIONS), result.errors
    assert all(w.dim() == 1 and w.numel() > 0 and torch.isfinite(w).all() for w in result.wavs.values())
    again = synthesize_items(items[:1], vocoder=parts["hift"], llm=parts["llm"], flow=parts["flow"], seed=11)[0]
    assert all(torch.equal(result.wavs[c], again.wavs[c]) for c in CONDITIONS)  # fixed seeds

    figures = score(results, speaker_encoder=None)[0]
    floor = figures["vocoder_gt"]
    assert floor["mcd"] == pytest.approx(0.0, abs=1e-6) and floor["duration_ratio"] == pytest.approx(1.0)
    assert figures["full"]["nonfinite"] == 0.0 and np.isfinite(figures["flow_gt"]["mcd"])
    assert average([figures, figures])["vocoder_gt"]["count"] == 2.0


def test_a_missing_part_leaves_its_conditions_out(tmp_path: Path) -> None:
    parts = _parts("v1", tmp_path)
    batch = C.synthetic_batch(2, text_vocab=100, speech_vocab=40, min_tokens=10, max_tokens=12, seed=4)
    items = _items(batch, parts["hift"])
    only_flow = synthesize_items(items[:1], vocoder=parts["hift"], flow=parts["flow"])[0]
    assert set(only_flow.wavs) == {"vocoder_gt", "flow_gt"}
    only_vocoder = synthesize_items(items[:1], vocoder=parts["hift"])[0]
    assert set(only_vocoder.wavs) == {"vocoder_gt"}
    with pytest.raises(ValueError, match="unknown synthesis conditions"):
        synthesize_items(items, vocoder=parts["hift"], conditions=["tts"])
