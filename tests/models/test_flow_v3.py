"""CosyVoice 3 flow (CausalMaskedDiffWithDiT + PreLookaheadLayer + CausalConditionalCFM + DiT) against
the upstream ``v3_flow`` fixture. Shared checks live in ``test_flow_v2.py``."""

from __future__ import annotations

import pytest
import torch

from cosytrain.models.flow.dit import DiT, apply_rotary_pos_emb
from cosytrain.modeldir import build_from_fixture_config
from tests.conftest import load_fixture
from tests.models.test_flow_v2 import (
    build_loaded,
    check_chunk_is_prefix_of_finalize,
    check_fp16_estimator,
    check_fp16_inference,
    check_fp16_train_loss_and_grads,
    check_inference,
    check_streaming_estimator_is_chunk_causal,
    check_train_loss,
    close,
)


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_fixture("v3_flow")


@pytest.fixture(scope="module")
def model(fx):
    return build_loaded(fx)


def test_state_dict_keys_and_shapes_match_fixture(model, fx):
    sd = model.state_dict()
    assert list(sd) == list(fx["state_dict"])
    for key, value in fx["state_dict"].items():
        assert sd[key].shape == value.shape, key


def test_rotary_inv_freq_is_a_persistent_buffer_with_x_transformers_values(fx):
    torch.manual_seed(0)
    m = build_from_fixture_config(fx["config"])  # not loaded: the buffer is computed at construction
    inv_freq = m.state_dict()["decoder.estimator.rotary_embed.inv_freq"]
    dim_head = fx["config"]["decoder"]["estimator"]["dim_head"]
    expected = 1.0 / (10000 ** (torch.arange(0, dim_head, 2).float() / dim_head))
    assert torch.equal(inv_freq, expected)
    close(inv_freq, fx["state_dict"]["decoder.estimator.rotary_embed.inv_freq"], atol=0, rtol=0)


def test_encoder_pre_lookahead(model, fx):
    inp, ref = fx["inputs"]["encoder"], fx["outputs"]["encoder"]
    with torch.no_grad():
        embedded = model.embed_tokens(inp["token"], inp["token_len"])
        out = model.pre_lookahead_layer(embedded)
    close(embedded, ref["embedded"])
    close(out, ref["pre_lookahead_out"])
    close(out.repeat_interleave(model.token_mel_ratio, dim=1), ref["repeated"])


@pytest.mark.parametrize("case", ["estimator", "estimator_streaming"])
def test_estimator(model, fx, case):
    inp, ref = fx["inputs"][case], fx["outputs"][case]
    with torch.no_grad():
        out = model.decoder.estimator(inp["x"], inp["mask"], inp["mu"], inp["t"], inp["spks"], inp["cond"],
                                      streaming=inp["streaming"])
    close(out, ref["out"])


def test_estimator_streaming_is_chunk_causal(model):
    check_streaming_estimator_is_chunk_causal(model.decoder.estimator, model.decoder.estimator.static_chunk_size)


@pytest.mark.parametrize("case", ["inference_offline", "inference_stream_finalize", "inference_stream_chunk"])
def test_inference(model, fx, case):
    check_inference(model, fx, case)


def test_stream_chunk_matches_finalized_prefix(model, fx):
    # the fixture notes these frames are bit-identical upstream
    check_chunk_is_prefix_of_finalize(model, fx, atol=1e-5)


@pytest.mark.parametrize("case", ["train_loss", "train_loss_b"])
def test_train_loss(model, fx, case):
    check_train_loss(model, fx, case)


# ---------------------------------------------------------------------------------------------
# DiT details kept from upstream
# ---------------------------------------------------------------------------------------------

def test_rotary_only_touches_the_first_head():
    """Rotary runs on the un-split (B, T, heads*dim_head) projections: channels past dim_head pass through."""
    t = torch.randn(2, 5, 12)
    f = torch.rand(1, 5, 2) * 3
    freqs = torch.stack((f, f), dim=-1).reshape(1, 5, 4)  # as RotaryEmbedding lays them out
    out = apply_rotary_pos_emb(t, freqs)
    assert torch.equal(out[..., 4:], t[..., 4:])
    # interleaved pairs: (x0, x1) rotates by freqs[..., 0] (= freqs[..., 1])
    c, s = freqs[..., 0].cos(), freqs[..., 0].sin()
    close(out[..., 0], t[..., 0] * c - t[..., 1] * s, atol=1e-6, rtol=0)
    close(out[..., 1], t[..., 1] * c + t[..., 0] * s, atol=1e-6, rtol=0)


def test_dit_defaults_and_argument_checks():
    dit = DiT(dim=32, depth=1, heads=2, dim_head=16, mel_dim=80, mu_dim=80, spk_dim=80)
    assert dit.transformer_blocks[0].attn.to_out[1].p == 0.1  # upstream default; the v3 yaml keeps it
    assert dit.transformer_blocks[0].ff.ff[1].p == 0.1
    with pytest.raises(ValueError, match="multiple of 16"):
        DiT(dim=40, depth=1, heads=2, dim_head=20)
    x = torch.zeros(1, 80, 6)
    with pytest.raises(ValueError, match="cond"):
        dit(x, torch.ones(1, 1, 6), x, torch.tensor([0.5]), torch.zeros(1, 80), None)


def test_padded_frames_do_not_change_valid_outputs(model):
    """Padding is masked out of attention and the conv position embedding is causal."""
    g = torch.Generator().manual_seed(4)
    x, mu, cond = (torch.randn(1, 80, 30, generator=g) for _ in range(3))
    spks, t = torch.randn(1, 80, generator=g), torch.tensor([0.6])
    est = model.decoder.estimator
    with torch.no_grad():
        short = est(x[:, :, :20], torch.ones(1, 1, 20), mu[:, :, :20], t, spks, cond[:, :, :20])
        mask = torch.ones(1, 1, 30)
        mask[:, :, 20:] = 0
        padded = est(x, mask, mu, t, spks, cond)
    close(padded[:, :, :20], short, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------

def test_fp16_autocast_estimator_close_to_fp32(model, fx):
    """Measured: max |fp16 - fp32| 1.5e-3, RMS 3.6e-4 on outputs up to 2.4 (FP32 residual stream,
    norms and rotary). Bound: 1e-2 max, 2e-3 RMS."""
    check_fp16_estimator(model, fx, max_err=1e-2, rms_err=2e-3)


def test_fp16_autocast_inference_close_to_fp32(model, fx):
    """Measured (short streaming chunk): max 9.8e-4, RMS 3.1e-4 on mels up to 4.1. Bound: 1e-2 max, 2e-3 RMS."""
    check_fp16_inference(model, fx, max_err=1e-2, rms_err=2e-3)


def test_fp16_autocast_train_loss_and_grads(model, fx):
    """Measured 6e-8 relative loss error against FP32; every parameter gets a finite gradient."""
    check_fp16_train_loss_and_grads(model, fx, rel_err=1e-4)


def test_residual_stream_is_fp32_under_autocast(model):
    seen = []
    handle = model.decoder.estimator.transformer_blocks[0].register_forward_hook(
        lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    x = torch.randn(1, 80, 8)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            model.decoder.estimator(x, torch.ones(1, 1, 8), x, torch.tensor([0.2]), torch.zeros(1, 80), x)
    finally:
        handle.remove()
    assert seen == [(torch.float32, torch.float32)]
