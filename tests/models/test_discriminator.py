"""Vocoder discriminators and GAN losses: upstream key layout, weight-norm name compatibility, loss formulas."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from cosytrain.models.hift.discriminator import (
    DiscriminatorP,
    LegacyWeightNormConv2d,
    MultiPeriodDiscriminator,
    MultipleDiscriminator,
    MultiResSpecDiscriminator,
    SpecDiscriminator,
)
from cosytrain.models.hift.losses import (
    HiFiGanLoss,
    MelConfig,
    discriminator_loss,
    feature_loss,
    generator_loss,
    mel_loss,
    tpr_loss,
)


def upstream_discriminator_layout() -> dict[str, list[int]]:
    """Keys/shapes of upstream's ``hifigan.discriminator`` written out from the source layout.

    matcha ``MultiPeriodDiscriminator``: DiscriminatorP for periods 2,3,5,7,11; ``convs`` = 5 Conv2d
    (1->32->128->512->1024->1024, kernel (5,1)) + ``conv_post`` (1024->1, (3,1)), wrapped in the
    deprecated ``torch.nn.utils.weight_norm`` (``weight_g`` (out,1,1,1), ``weight_v``).
    cosyvoice ``MultiResSpecDiscriminator``: 3 SpecDiscriminators, ``discriminators`` = 5 Conv2d
    (1->32 (3,9), 32->32 (3,9) x3, 32->32 (3,3)) + ``out`` (32->1, 3x3), wrapped in
    ``torch.nn.utils.parametrizations.weight_norm`` (``parametrizations.weight.original0/1``).
    """
    keys: dict[str, list[int]] = {}
    chans = [1, 32, 128, 512, 1024, 1024]
    for i in range(5):
        convs = [(f"convs.{j}", chans[j + 1], chans[j], (5, 1)) for j in range(5)] + [("conv_post", 1, 1024, (3, 1))]
        for name, cout, cin, k in convs:
            base = f"mpd.discriminators.{i}.{name}"
            keys[f"{base}.bias"] = [cout]
            keys[f"{base}.weight_g"] = [cout, 1, 1, 1]
            keys[f"{base}.weight_v"] = [cout, cin, *k]
    for i in range(3):
        convs = [(f"discriminators.{j}", 32, 1 if j == 0 else 32, (3, 9) if j < 4 else (3, 3)) for j in range(5)]
        convs.append(("out", 1, 32, (3, 3)))
        for name, cout, cin, k in convs:
            base = f"mrd.discriminators.{i}.{name}"
            keys[f"{base}.bias"] = [cout]
            keys[f"{base}.parametrizations.weight.original0"] = [cout, 1, 1, 1]
            keys[f"{base}.parametrizations.weight.original1"] = [cout, cin, *k]
    return keys


def test_official_discriminator_keys_and_shapes_match_upstream():
    with torch.device("meta"):
        disc = MultipleDiscriminator(MultiPeriodDiscriminator(), MultiResSpecDiscriminator())
    got = {k: list(v.shape) for k, v in disc.state_dict().items()}
    expected = upstream_discriminator_layout()
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert "mpd.discriminators.0.convs.0.weight_g" in got  # the example named in the issue


def test_registry_builds_upstream_hifigan_discriminator_section():
    from cosytrain.modeldir import Builder, load_upstream_config
    from tests.conftest import reference_dir, require_reference

    path = require_reference(reference_dir() / "configs" / "cosyvoice2.yaml")
    tree = load_upstream_config(path, {"qwen_pretrain_path": "/nonexistent"})
    node = tree["hifigan"].kwargs["discriminator"]
    disc = Builder(str(path), device="meta").build(node, "hifigan.discriminator")
    assert isinstance(disc, MultipleDiscriminator)
    assert {k: list(v.shape) for k, v in disc.state_dict().items()} == upstream_discriminator_layout()


def _small() -> MultipleDiscriminator:
    return MultipleDiscriminator(MultiPeriodDiscriminator(periods=(2, 3), channels=(4, 8, 8, 8, 8)),
                                 MultiResSpecDiscriminator(fft_sizes=(128, 64), hop_sizes=(32, 16),
                                                           win_lengths=(128, 64), channels=4))


def test_legacy_weight_norm_equals_torch_weight_norm_and_loads_both_name_styles():
    torch.manual_seed(3)
    ours = LegacyWeightNormConv2d(3, 5, (5, 1), (3, 1), padding=(2, 0))
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.nn.utils.weight_norm(torch.nn.Conv2d(3, 5, (5, 1), (3, 1), padding=(2, 0)))
    assert list(ours.state_dict()) == list(ref.state_dict())  # bias, weight_g, weight_v
    for k, v in ref.state_dict().items():  # same seeded init as the deprecated torch implementation
        assert torch.equal(ours.state_dict()[k], v)
    ref.weight_g.data.mul_(1.5)  # g != ||v|| so a mix-up of g and v would show
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 31, 2)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    # the newer parametrization names (original0 = g, original1 = v) load as well
    fresh = LegacyWeightNormConv2d(3, 5, (5, 1), (3, 1), padding=(2, 0))
    renamed = {"bias": ref.bias.detach(), "parametrizations.weight.original0": ref.weight_g.detach(),
               "parametrizations.weight.original1": ref.weight_v.detach()}
    fresh.load_state_dict(renamed, strict=True)
    torch.testing.assert_close(fresh(x), ref(x), rtol=0, atol=1e-6)


def test_old_style_mrd_names_load_into_parametrized_convs():
    """Upstream's older discriminator.py used the deprecated weight_norm for the MRD too (weight_g/v)."""
    torch.manual_seed(0)
    disc = _small()
    old = {}
    for k, v in disc.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        old[k] = v * 1.1
    other = _small()
    other.load_state_dict(old, strict=True)
    assert torch.equal(other.mrd.discriminators[0].out.parametrizations.weight.original1,
                          disc.mrd.discriminators[0].out.parametrizations.weight.original1 * 1.1)


def test_forward_shapes_feature_maps_and_reflect_padding():
    torch.manual_seed(0)
    disc = _small()
    y, y_hat = torch.randn(2, 1000), torch.randn(2, 1000)
    y_d_rs, y_d_gs, fmap_rs, fmap_gs = disc(y, y_hat)
    assert len(y_d_rs) == len(y_d_gs) == len(fmap_rs) == len(fmap_gs) == 2 + 2
    assert all(len(f) == 6 for f in fmap_rs + fmap_gs)  # 5 convs + post/out
    assert all(t.dim() == 2 and t.shape[0] == 2 for t in y_d_rs + y_d_gs)
    # period 3 does not divide 1000: reflect-padded to 1002 = 334 x 3 before folding
    d3 = disc.mpd.discriminators[1]
    x = y.unsqueeze(1)
    padded = F.pad(x, (0, 2), "reflect").view(2, 1, 334, 3)
    assert torch.equal(d3(x)[1][0], F.leaky_relu(d3.convs[0](padded), 0.1))
    # spectral discriminator: magnitude of a centred hann STFT, (B, 1, frames, bins) into the convs
    sd = disc.mrd.discriminators[0]
    spec = torch.stft(y, 128, 32, 128, torch.hann_window(128), return_complex=True).abs().transpose(2, 1)
    assert torch.equal(sd(y)[1][0], F.leaky_relu(sd.discriminators[0](spec.unsqueeze(1)), 0.1))
    assert "window" not in sd.state_dict()


def test_spectral_discriminator_stays_fp32_for_the_stft_under_autocast():
    torch.manual_seed(0)
    sd = SpecDiscriminator(128, 32, 128, channels=4)
    with torch.autocast("cpu", dtype=torch.float16):
        scores, fmap = sd(torch.randn(1, 512))
        p = DiscriminatorP(2, channels=(4, 4, 4, 4, 4))(torch.randn(1, 1, 512))[0]
    assert fmap[0].dtype == torch.float16 and scores.dtype == torch.float16 and p.dtype == torch.float16
    assert torch.isfinite(scores.float()).all()


# ------------------------------------------------------------------------------------------------ losses


def _outs(seed: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 7 + i, generator=g) for i in range(n)]


def test_lsgan_and_feature_matching_formulas():
    real, fake = _outs(0), _outs(1)
    expect_d = sum(((1 - r) ** 2).mean() + (f**2).mean() for r, f in zip(real, fake))
    torch.testing.assert_close(discriminator_loss(real, fake), expect_d)
    torch.testing.assert_close(generator_loss(fake), sum(((1 - f) ** 2).mean() for f in fake))
    fm_r, fm_g = [_outs(2), _outs(3)], [_outs(4), _outs(5)]
    expect_fm = 2 * sum((a - b).abs().mean() for ra, ga in zip(fm_r, fm_g) for a, b in zip(ra, ga))
    torch.testing.assert_close(feature_loss(fm_r, fm_g), expect_fm)


def test_tpr_loss_formula_and_empty_mask_guard():
    real, fake = _outs(6), _outs(7)
    tau = 0.04
    expect = 0.0
    for dr, dg in zip(real, fake):
        m = torch.median(dr - dg)
        sel = ((dr - dg) - m)[dr < dg + m]
        expect += tau - F.relu(tau - (sel**2).mean())
    torch.testing.assert_close(tpr_loss(real, fake, tau), torch.as_tensor(expect))
    # all differences equal: upstream's mean over an empty selection is NaN; ours contributes 0
    same = [torch.ones(2, 4)]
    assert tpr_loss(same, [torch.zeros(2, 4)], tau).item() == 0.0


def test_mel_loss_uses_full_band_gan_transform_and_generator_total_weights():
    torch.manual_seed(0)
    cfg = MelConfig(n_fft=256, hop_size=64, win_size=256, sampling_rate=16000)
    assert cfg.fmax is None
    wav = 0.3 * torch.randn(2, 2048)
    assert mel_loss(wav, wav, [cfg.transform()]).item() == 0.0
    loss = HiFiGanLoss(cfg)
    assert (loss.mel_weight, loss.fm_weight, loss.tpr_weight, loss.tpr_tau) == (45.0, 2.0, 1.0, 0.04)
    gen = wav * 0.5
    f0, pitch = torch.rand(2, 32) * 100, torch.rand(2, 32) * 100
    real_o, fake_o = _outs(8, 2), _outs(9, 2)
    fm_r, fm_g = [_outs(10, 2)], [_outs(11, 2)]
    out = loss.generator(wav, gen, f0, pitch, (real_o, fake_o, fm_r, fm_g))
    expect = (generator_loss(fake_o) + 2.0 * feature_loss(fm_r, fm_g) + 45 * mel_loss(wav, gen, [cfg.transform()])
              + tpr_loss(real_o, fake_o, 0.04) + F.l1_loss(f0, pitch))
    torch.testing.assert_close(out["loss"], expect)
    warm = loss.generator(wav, gen, f0, pitch, None)  # discriminator warm-up: reconstruction only
    torch.testing.assert_close(warm["loss"], 45 * out["loss_mel"] + out["loss_f0"])
    assert "loss_gen" not in warm
    d = loss.discriminator((real_o, fake_o, fm_r, fm_g), f0, pitch)
    torch.testing.assert_close(d["loss"], discriminator_loss(real_o, fake_o) + tpr_loss(real_o, fake_o, 0.04)
                               + F.l1_loss(f0, pitch))
    with pytest.raises(ValueError, match="hop_size"):
        loss.f0_loss(f0, pitch[:, :-1])
    assert math.isfinite(out["loss"].item())
