"""The FP16-check metrics: zero for identical inputs, the right size for known perturbations."""

from __future__ import annotations

import math

import pytest
import torch

from cosytrain.evaluation import metrics as M


def _logits(seed: int = 0, shape=(2, 7, 41)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def _wav(seed: int = 0, n: int = 8192, rate: int = 22050) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / rate
    tone = sum(0.2 / h * torch.sin(2 * math.pi * 150 * h * t) for h in range(1, 6))
    return tone + 0.01 * torch.randn(n, generator=gen)


def test_identical_inputs_give_perfect_scores() -> None:
    a = _logits()
    assert M.top1_agreement(a, a.clone()) == 1.0
    assert float(M.kl_divergence(a, a.clone()).max()) == 0.0
    mel = _logits(1, (1, 80, 30))
    assert M.mel_l1(mel, mel.clone()) == 0.0
    assert M.cosine_similarity(mel, mel.clone()) == pytest.approx(1.0, abs=1e-12)
    wav = _wav()
    assert M.log_spectral_distance(wav, wav.clone()) == 0.0
    assert M.mel_cepstral_distortion(wav, wav.clone(), 22050) == 0.0
    assert M.count_nonfinite(wav) == 0


def test_kl_is_shift_invariant_and_scales_quadratically() -> None:
    a = _logits()
    assert float(M.kl_divergence(a, a + 5.0).max()) < 1e-12  # softmax ignores a per-position constant
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    small = float(M.kl_divergence(a, a + 1e-3 * noise).mean())
    large = float(M.kl_divergence(a, a + 1e-2 * noise).mean())
    assert 1e-8 < small < 1e-5  # about var(noise) * eps^2 / 2
    assert large / small == pytest.approx(100, rel=0.2)


def test_kl_of_different_distributions_is_order_one_and_mask_selects_positions() -> None:
    a, b = _logits(0), _logits(1)
    assert 0.5 < float(M.kl_divergence(a, b).mean()) < 20
    mask = torch.zeros(a.shape[:-1], dtype=torch.bool)
    mask[0, :3] = True
    assert M.kl_divergence(a, b, mask).shape == (3,)
    b_masked = b.clone()
    b_masked[~mask] = a[~mask]  # identical outside the mask
    assert M.top1_agreement(a, b_masked, ~mask) == 1.0


def test_top1_agreement_counts_flips() -> None:
    a = torch.zeros(1, 4, 3)
    a[0, :, 0] = 1.0
    b = a.clone()
    b[0, 1, 2] = 5.0  # one of four positions changes its argmax
    assert M.top1_agreement(a, b) == 0.75


def test_non_finite_values_are_counted_and_fail_the_distances() -> None:
    a = _logits()
    b = a.clone()
    b[0, 0, 0] = float("inf")
    b[1, 2, 3] = float("nan")
    assert M.count_nonfinite(b) == 2
    assert not math.isfinite(float(M.kl_divergence(a, b).max()))
    wav = _wav()
    bad = wav.clone()
    bad[100] = float("nan")
    assert math.isnan(M.log_spectral_distance(wav, bad))
    assert M.count_nonfinite(torch.tensor([1, 2])) == 0  # integer tensors have none


def test_mel_l1_and_cosine_on_known_offsets() -> None:
    mel = _logits(2, (1, 80, 50))
    assert M.mel_l1(mel, mel + 0.1) == pytest.approx(0.1)
    assert M.cosine_similarity(mel, mel + 3.0) == pytest.approx(1.0)  # centred: offsets do not count
    assert M.cosine_similarity(mel, -mel) == pytest.approx(-1.0)
    # without centring, a shared large floor hides unrelated content
    other = _logits(3, (1, 80, 50))
    assert M.cosine_similarity(mel - 10, other - 10, center=False) > 0.9
    assert abs(M.cosine_similarity(mel - 10, other - 10)) < 0.1
    mask = torch.zeros(1, 1, 50, dtype=torch.bool)
    mask[..., :10] = True
    shifted = mel.clone()
    shifted[..., 10:] += 1.0
    assert M.mel_l1(mel, shifted, mask) == 0.0


def test_waveform_distances_grow_with_the_error() -> None:
    wav = _wav()
    noise = torch.randn(wav.shape, generator=torch.Generator().manual_seed(7))
    lsd = [M.log_spectral_distance(wav, wav + eps * noise) for eps in (1e-5, 1e-3, 1e-1)]
    mcd = [M.mel_cepstral_distortion(wav, wav + eps * noise, 22050) for eps in (1e-5, 1e-3, 1e-1)]
    assert lsd[0] < 0.1 < lsd[1] < lsd[2]
    assert mcd[0] < 0.05 and mcd[0] < mcd[1] < mcd[2]
    assert lsd[2] > 3.0  # white noise at about the signal level is a big spectral change
    # a pure gain change of 2x moves every bin above the floor by 20 log10 2 = 6.02 dB
    assert M.log_spectral_distance(wav, 2 * wav) == pytest.approx(20 * math.log10(2), rel=1e-3)
    # and MCD ignores gain (c0 is dropped)
    assert M.mel_cepstral_distortion(wav, 2 * wav, 22050) == pytest.approx(0.0, abs=1e-6)


def test_dct_matrix_is_orthonormal() -> None:
    d = M.dct_matrix(80)
    assert torch.allclose(d @ d.t(), torch.eye(80, dtype=torch.float64), atol=1e-12)


def test_shape_mismatch_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        M.mel_l1(torch.zeros(1, 80, 10), torch.zeros(1, 80, 11))
