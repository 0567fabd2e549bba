"""The no-training vocoder: Griffin-Lim over the inverse CosyVoice mel gives back audible, measurable speech."""

from __future__ import annotations

import pytest
import torch

from cosytrain.data.pipeline import FeatureConfig
from cosytrain.evaluation.speaker_similarity import ResemblyzerEncoder, cosine, to_16k
from cosytrain.evaluation.speech_metrics import speech_distances
from cosytrain.inference.griffin_lim import GriffinLimVocoder


def test_resynthesis_is_close_to_the_recording(tmp_path):
    pytest.importorskip("espeakng_loader")
    from tests.evaluation._speech import make_speech

    speech = make_speech(tmp_path)
    wav, other = speech["ref"], speech["other_text"]
    feat = FeatureConfig()  # the demo's v1 mel: 22.05 kHz, 1024/256, 80 bands to 8 kHz
    mel = feat.mel(wav.unsqueeze(0))
    vocoder = GriffinLimVocoder.from_feat_config(feat)
    out, source = vocoder.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0))
    assert out.shape == (1, mel.shape[-1] * 256) and source.shape[-1] == 0 and out.abs().max() <= 0.99
    near = speech_distances(wav, out[0], 22050)
    far = speech_distances(wav, other, 22050)
    assert near["mcd"] < 10 < far["mcd"] and near["duration_ratio"] == pytest.approx(1.0, abs=0.02)
    encoder = ResemblyzerEncoder()
    assert cosine(encoder.embed(to_16k(wav, 22050)), encoder.embed(to_16k(out[0], 22050))) > 0.9
