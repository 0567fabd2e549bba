"""DTW mel-cepstral distortion, log-F0 RMSE, voicing error and duration ratio on speech whose differences are known."""

from __future__ import annotations

import math

import pytest
import torch

from cosytrain.evaluation import metrics as M
from cosytrain.evaluation.speech_metrics import speech_distances, trimmed_seconds
from tests.evaluation._speech import make_speech

SR = 22050


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    pytest.importorskip("espeakng_loader")
    return make_speech(tmp_path_factory.mktemp("speech"))


def test_identical_audio_scores_zero(speech):
    d = speech_distances(speech["ref"], speech["ref"], SR)
    assert d == {"mcd": 0.0, "lf0_rmse": 0.0, "vde": 0.0, "duration_ratio": 1.0}


def test_a_shift_is_aligned_away_but_not_by_frame_distance(speech):
    ref = speech["ref"]
    shifted = torch.cat([torch.zeros(int(0.3 * SR) + 17), ref])  # not a whole number of frames
    d = speech_distances(ref, shifted, SR)
    frame_mcd = M.mel_cepstral_distortion(torch.nn.functional.pad(ref, (0, shifted.numel() - ref.numel())), shifted,
                                          SR)
    other = speech_distances(ref, speech["other_text"], SR)
    assert d["mcd"] < 2.0 < frame_mcd / 5  # DTW finds the shift; frame by frame it is a different signal
    assert d["mcd"] < other["mcd"] / 5
    # pyworld (upstream's F0, the real backend) frames a shift that is not a whole hop a little differently:
    # ~31 cents on this utterance, a third of a semitone; a pitch change is > 150 (next test)
    assert d["lf0_rmse"] < 50 and d["vde"] < 0.05
    assert d["duration_ratio"] == pytest.approx(1.0, abs=0.01)  # silence is trimmed before timing


def test_a_faster_rate_changes_the_duration_ratio_not_much_the_spectrum(speech):
    ref, fast = speech["ref"], speech["fast"]
    d = speech_distances(ref, fast, SR)
    expected = trimmed_seconds(fast, SR) / trimmed_seconds(ref, SR)
    assert d["duration_ratio"] == pytest.approx(expected) and d["duration_ratio"] < 0.8
    other = speech_distances(ref, speech["other_text"], SR)
    assert d["mcd"] < 0.6 * other["mcd"]  # same words and voice, aligned: far closer than other words


def test_a_higher_pitch_shows_in_log_f0_rmse(speech):
    d = speech_distances(speech["ref"], speech["high"], SR)
    assert d["lf0_rmse"] > 150  # more than a semitone and a half on average
    assert speech_distances(speech["ref"], speech["fast"], SR)["lf0_rmse"] < d["lf0_rmse"] / 2


def test_nonfinite_or_empty_synthesis_gives_nan(speech):
    bad = speech["ref"].clone()
    bad[100] = float("nan")
    assert all(math.isnan(v) for v in speech_distances(speech["ref"], bad, SR).values())
    assert all(math.isnan(v) for v in speech_distances(speech["ref"], torch.zeros(0), SR).values())
    with pytest.raises(ValueError, match="reference"):
        speech_distances(torch.zeros(0), speech["ref"], SR)
