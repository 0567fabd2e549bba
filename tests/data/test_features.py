"""Log-mel features against upstream matcha fixtures, and the F0 extractor used for vocoder training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosytrain.data import features
from cosytrain.data.features import compute_f0, f0_backend, mel_spectrogram, slaney_mel_filterbank, yin_f0
from tests.conftest import load_fixture

_FX: dict = {}


def mel_fixture() -> dict:
    if not _FX:
        _FX.update(load_fixture("mel"))
    return _FX


def _case(name: str) -> tuple[torch.Tensor, dict, torch.Tensor]:
    fx = mel_fixture()
    cfg = fx["config"][name]
    return fx["inputs"]["mel"][f"wav_{cfg['sampling_rate']}"], cfg, fx["outputs"]["mel"][name]


@pytest.mark.parametrize("name", ["v1_feat_extractor", "v1_gan_mel", "v2_feat_extractor", "v3_feat_extractor"])
def test_mel_matches_upstream(name):
    wav, cfg, ref = _case(name)
    torch.testing.assert_close(mel_spectrogram(wav, **cfg), ref, atol=1e-4, rtol=1e-4)
    fb = slaney_mel_filterbank(cfg["sampling_rate"], cfg["n_fft"], cfg["num_mels"], cfg["fmin"], cfg["fmax"])
    expected_sum = mel_fixture()["outputs"]["mel"][f"{name}.mel_basis_sum"].item()
    assert fb.dtype == torch.float32 and abs(fb.double().sum().item() - expected_sum) < 1e-6 * abs(expected_sum)


def test_configs_sharing_fmax_do_not_share_cache():
    """matcha keys its cache by fmax+device only; v1 and v2 share fmax=8000 but not n_fft / window."""
    features._MEL_BASIS.clear()
    features._HANN_WINDOW.clear()
    for name in ["v1_feat_extractor", "v2_feat_extractor", "v1_feat_extractor", "v3_feat_extractor", "v1_gan_mel"]:
        wav, cfg, ref = _case(name)
        torch.testing.assert_close(mel_spectrogram(wav, **cfg), ref, atol=1e-4, rtol=1e-4)
    assert len(features._MEL_BASIS) == 4


def test_mel_is_fp32_under_autocast():
    wav, cfg, ref = _case("v2_feat_extractor")
    with torch.autocast("cpu", dtype=torch.float16):
        out = mel_spectrogram(wav, **cfg)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_mel_rejects_bad_shape():
    with pytest.raises(ValueError, match="mel_spectrogram"):
        mel_spectrogram(torch.zeros(1, 1, 2048), 1024, 80, 22050, 256, 1024, 0, 8000)


def _tone(f0_hz: float, sr: int, seconds: float, harmonics: int = 4) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return sum(0.3 / k * np.sin(2 * np.pi * k * f0_hz * t) for k in range(1, harmonics + 1))


@pytest.mark.parametrize("f0_hz,sr,hop", [(120.0, 22050, 256), (215.0, 24000, 480)])
def test_yin_tracks_a_harmonic_tone(f0_hz, sr, hop):
    f0 = yin_f0(_tone(f0_hz, sr, 0.5), sr, hop)
    assert f0.shape == (int(sr * 0.5) // hop + 1,)
    inner = f0[2:-2]  # frames whose window lies fully inside the signal
    assert (inner > 0).all()
    np.testing.assert_allclose(inner, f0_hz, rtol=0.01)


def test_yin_marks_silence_and_noise_unvoiced():
    sr, hop = 22050, 256
    rng = np.random.default_rng(0)
    wav = np.concatenate([_tone(150.0, sr, 0.4), np.zeros(int(0.4 * sr)), 0.3 * rng.standard_normal(int(0.4 * sr))])
    f0 = yin_f0(wav, sr, hop)
    third = len(f0) // 3
    assert (f0[2:third - 2] > 140).all() and (f0[2:third - 2] < 160).all()
    assert (f0[third + 2:2 * third - 2] == 0).all()
    assert (f0[2 * third + 2:-2] == 0).mean() > 0.9


def test_compute_f0_per_mel_frame():
    wav, cfg, ref = _case("v1_feat_extractor")  # 1 s harmonic tone with f0 100-180 Hz plus noise
    num_frames = ref.shape[-1]
    f0 = compute_f0(wav, cfg["sampling_rate"], cfg["hop_size"], num_frames)
    assert f0.shape == (num_frames,) and f0.dtype == torch.float32
    voiced = f0[f0 > 0]
    assert voiced.numel() > 0.8 * num_frames
    assert ((voiced > 90) & (voiced < 200)).float().mean() > 0.9


def test_compute_f0_backend_choice():
    wav = torch.from_numpy(_tone(150.0, 24000, 0.3)).float()[None]
    with pytest.raises(ValueError, match="backend"):
        compute_f0(wav, 24000, 480, 15, backend="crepe")
    with pytest.raises(ValueError, match="one channel"):
        compute_f0(wav.repeat(2, 1), 24000, 480, 15)
    if f0_backend() == "yin":
        with pytest.raises(ImportError):
            compute_f0(wav, 24000, 480, 15, backend="pyworld")
    f0 = compute_f0(wav, 24000, 480, 15, backend="yin")
    assert f0.shape == (15,) and 140 < f0[7].item() < 160


def test_cached_filterbank_made_under_inference_mode_still_trains():
    """Lightning validates under torch.inference_mode; the mel filterbank/window cached there must not be
    inference tensors, or the GAN mel loss of the next training step fails ('Inference tensors cannot be
    saved for backward'), e.g. HiFT `validate` then `fit`, or a sanity check before training."""
    from cosytrain.data import features

    args = (1024, 80, 22050, 256, 1024, 0.0, 7777.0)  # a configuration no other test has cached
    features._MEL_BASIS.clear()
    features._HANN_WINDOW.clear()
    with torch.inference_mode():
        mel_spectrogram(torch.randn(1, 4096), *args)
    wav = torch.randn(1, 4096, requires_grad=True)
    mel_spectrogram(wav, *args).sum().backward()
    assert wav.grad is not None and torch.isfinite(wav.grad).all()
