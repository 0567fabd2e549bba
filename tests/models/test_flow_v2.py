"""CosyVoice 2 flow (CausalMaskedDiffWithXvec + UpsampleConformerEncoder + CausalConditionalCFM +
CausalConditionalDecoder) against the upstream ``v2_flow`` fixture.

The generic checks (inference with captured solver inputs, training loss with replayed RNG, FP16)
are plain functions reused by ``test_flow_v3.py``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

from cosytrain.models.flow.flow_matching import CausalConditionalCFM, fixed_noise
from cosytrain.models.flow.pre_lookahead import PreLookaheadLayer
from cosytrain.modeldir import build_from_fixture_config
from cosytrain.models.transformer.upsample_encoder import UpsampleConformerEncoder
from tests.conftest import load_fixture
from tests.models.test_flow_v1 import check_train_loss, close, inference_args

CFM_PARAMS = {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine", "training_cfg_rate": 0.2,
              "inference_cfg_rate": 0.7, "reg_loss_type": "l1"}


def build_loaded(fx: dict) -> Any:
    torch.manual_seed(0)  # another init than the fixture's: every value must come from the state dict
    m = build_from_fixture_config(fx["config"])
    m.load_state_dict(fx["state_dict"], strict=True)
    return m.eval()




_RESULTS: dict = {}


def run_inference(model, inp: dict) -> tuple[torch.Tensor, dict]:
    """model.inference with the solver's inputs captured (as the fixture's ``solve_euler.*``).

    Results are memoised per (model, inputs) so the prefix check reuses the fixture cases' runs.
    """
    key = (id(model), id(inp))
    if key in _RESULTS:
        return _RESULTS[key]
    captured: dict = {}
    solve = model.decoder.solve_euler

    def spy(x, t_span, mu, mask, spks, cond, streaming=False):
        captured.update(x=x.clone(), t_span=t_span.clone(), mu=mu.clone(), spks=spks.clone(), cond=cond.clone(),
                        streaming=streaming)
        return solve(x, t_span, mu, mask, spks, cond, streaming)

    model.decoder.solve_euler = spy
    try:
        torch.manual_seed(inp["torch_seed"])
        feat, cache = model.inference(**inference_args(inp))
    finally:
        del model.decoder.solve_euler
    assert cache is None
    _RESULTS[key] = (feat, captured)
    return feat, captured


def check_inference(model, fx: dict, case: str) -> None:
    inp, ref = fx["inputs"][case], fx["outputs"][case]
    feat, captured = run_inference(model, inp)
    for name in ("t_span", "mu", "spks", "cond"):
        close(captured[name], ref[f"solve_euler.{name}"])
    assert captured["streaming"] is inp["streaming"]
    # the noise is the fixed buffer's prefix, whatever the torch seed
    frames = captured["x"].shape[2]
    assert torch.equal(captured["x"], fx["non_state_buffers"]["decoder.rand_noise[:, :, :N]"][:, :, :frames])
    assert feat.dtype == torch.float32 and feat.shape == ref["feat"].shape
    close(feat, ref["feat"], atol=1e-3, rtol=0)


def check_chunk_is_prefix_of_finalize(model, fx: dict, atol: float) -> None:
    """A non-final streaming chunk re-synthesises exactly the frames the full streaming run gives there."""
    chunk, _ = run_inference(model, fx["inputs"]["inference_stream_chunk"])
    full, _ = run_inference(model, fx["inputs"]["inference_stream_finalize"])
    assert chunk.shape[2] == full.shape[2] - model.token_mel_ratio * model.pre_lookahead_len
    close(chunk, full[:, :, :chunk.shape[2]], atol=atol, rtol=0)


def check_fp16_estimator(model, fx: dict, max_err: float, rms_err: float) -> None:
    for case in ("estimator", "estimator_streaming"):
        inp, ref = fx["inputs"][case], fx["outputs"][case]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            out = model.decoder.estimator(inp["x"], inp["mask"], inp["mu"], inp["t"], inp["spks"], inp["cond"],
                                          streaming=inp["streaming"])
        assert torch.isfinite(out).all(), case
        err = out.float() - ref["out"]
        assert err.abs().max() < max_err, case
        assert err.pow(2).mean().sqrt() < rms_err, case


def short_inference_inputs(fx: dict, n_prompt: int = 4, n_tokens: int = 8) -> dict:
    """A shortened ``inference_stream_chunk`` case (CPU FP16 kernels are slow)."""
    inp = dict(fx["inputs"]["inference_stream_chunk"])
    ratio = fx["config"]["token_mel_ratio"]
    inp.update(token=inp["token"][:, :n_tokens], token_len=torch.tensor([n_tokens], dtype=torch.int32),
               prompt_token=inp["prompt_token"][:, :n_prompt],
               prompt_token_len=torch.tensor([n_prompt], dtype=torch.int32),
               prompt_feat=inp["prompt_feat"][:, :n_prompt * ratio],
               prompt_feat_len=torch.tensor([n_prompt * ratio], dtype=torch.int32))
    return inference_args(inp)


def check_fp16_inference(model, fx: dict, max_err: float, rms_err: float) -> None:
    """FP16-autocast streaming-chunk inference against the same model in FP32."""
    args = short_inference_inputs(fx)
    ref, _ = model.inference(**args)
    with torch.autocast("cpu", dtype=torch.float16):
        feat, _ = model.inference(**args)
    assert feat.dtype == torch.float32 and torch.isfinite(feat).all()
    err = feat - ref
    assert err.abs().max() < max_err
    assert err.pow(2).mean().sqrt() < rms_err


def short_batch(fx: dict, n_tokens: int = 8) -> dict:
    batch = dict(fx["inputs"]["train_loss"]["batch"])
    ratio = fx["config"]["token_mel_ratio"]
    batch["speech_token"] = batch["speech_token"][:, :n_tokens]
    batch["speech_token_len"] = batch["speech_token_len"].clamp(max=n_tokens)
    batch["speech_feat"] = batch["speech_feat"][:, :n_tokens * ratio]
    batch["speech_feat_len"] = batch["speech_feat_len"].clamp(max=n_tokens * ratio)
    return batch


def check_fp16_train_loss_and_grads(m, fx: dict, rel_err: float) -> None:
    """FP16-autocast training loss (shortened batch) against FP32 with the same RNG replay; finite grads."""
    batch, seed = short_batch(fx), fx["inputs"]["train_loss"]["seed"]
    losses = []
    m.train()
    try:
        for enabled in (False, True):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            with torch.autocast("cpu", dtype=torch.float16, enabled=enabled):
                losses.append(m(batch, torch.device("cpu"))["loss"])
        ref, loss = losses
        assert loss.dtype == torch.float32
        assert abs(loss.item() - ref.item()) <= rel_err * ref.item()
        loss.backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    finally:
        m.zero_grad(set_to_none=True)
        m.eval()


def check_streaming_estimator_is_chunk_causal(estimator, chunk: int, length: int = 100) -> None:
    """With streaming=True, frames of the first chunk ignore everything after it; without, they do not."""
    g = torch.Generator().manual_seed(3)
    x, mu, cond = (torch.randn(1, 80, length, generator=g) for _ in range(3))
    spks, mask, t = torch.randn(1, 80, generator=g), torch.ones(1, 1, length), torch.tensor([0.4])
    x2 = x.clone()
    x2[:, :, chunk:] += 1.0
    with torch.no_grad():
        a = estimator(x, mask, mu, t, spks, cond, streaming=True)
        b = estimator(x2, mask, mu, t, spks, cond, streaming=True)
        c = estimator(x2, mask, mu, t, spks, cond, streaming=False)
    close(a[:, :, :chunk], b[:, :, :chunk], atol=1e-5, rtol=0)
    assert (a[:, :, :chunk] - c[:, :, :chunk]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# v2 fixture
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fx() -> dict:
    return load_fixture("v2_flow")


@pytest.fixture(scope="module")
def model(fx):
    return build_loaded(fx)


def test_state_dict_keys_and_shapes_match_fixture(model, fx):
    sd = model.state_dict()
    assert list(sd) == list(fx["state_dict"])
    for key, value in fx["state_dict"].items():
        assert sd[key].shape == value.shape, key
    assert not any("rand_noise" in k for k in sd)


@pytest.mark.parametrize("case", ["encoder", "encoder_streaming"])
def test_encoder(model, fx, case):
    inp, ref = fx["inputs"][case], fx["outputs"][case]
    with torch.no_grad():
        embedded = model.embed_tokens(inp["token"], inp["token_len"])
        out, mask = model.encoder(embedded, inp["token_len"], streaming=inp["streaming"])
    close(out, ref["encoder_out"])
    assert torch.equal(mask, ref["encoder_mask"])
    close(model.encoder_proj(out), ref["encoder_proj_out"])


def test_encoder_streaming_changes_the_output(fx):
    a, b = fx["outputs"]["encoder"]["encoder_out"], fx["outputs"]["encoder_streaming"]["encoder_out"]
    assert (a - b).abs().max() > 1e-3  # so the two encoder cases above test different masks


@pytest.mark.parametrize("case", ["estimator", "estimator_streaming"])
def test_estimator(model, fx, case):
    inp, ref = fx["inputs"][case], fx["outputs"][case]
    with torch.no_grad():
        out = model.decoder.estimator(inp["x"], inp["mask"], inp["mu"], inp["t"], inp["spks"], inp["cond"],
                                      streaming=inp["streaming"])
    close(out, ref["out"])
    assert torch.all(out[1, :, inp["mask"][1, 0] == 0] == 0)


def test_estimator_streaming_is_chunk_causal(model):
    check_streaming_estimator_is_chunk_causal(model.decoder.estimator, model.decoder.estimator.static_chunk_size)


@pytest.mark.parametrize("case", ["inference_offline", "inference_stream_finalize", "inference_stream_chunk"])
def test_inference(model, fx, case):
    check_inference(model, fx, case)


def test_stream_chunk_matches_finalized_prefix(model, fx):
    check_chunk_is_prefix_of_finalize(model, fx, atol=1e-4)


@pytest.mark.parametrize("case", ["train_loss", "train_loss_b"])
def test_train_loss(model, fx, case):
    check_train_loss(model, fx, case)


def test_train_loss_rejects_feats_not_matching_tokens(model, fx):
    batch = dict(fx["inputs"]["train_loss"]["batch"])
    batch["speech_feat"] = batch["speech_feat"][:, :-2]
    with pytest.raises(ValueError, match="token_mel_ratio"):
        model(batch, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# fixed noise and construction side effects
# ---------------------------------------------------------------------------------------------

def test_fixed_noise_is_upstream_seed0_draw_and_construction_leaves_global_rng_alone(fx):
    random.seed(11)
    torch.manual_seed(11)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    cfm = CausalConditionalCFM(240, CFM_PARAMS, spk_emb_dim=80)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert cfm.rand_noise.shape == (1, 80, 15000)
    used = fx["non_state_buffers"]["decoder.rand_noise[:, :, :N]"]
    assert torch.equal(cfm.rand_noise[:, :, :used.shape[2]], used)
    torch.manual_seed(0)
    assert torch.equal(fixed_noise(), torch.randn(1, 80, 15000))


def test_fixed_noise_survives_meta_device_build():
    with torch.device("meta"):
        cfm = CausalConditionalCFM(240, CFM_PARAMS, spk_emb_dim=80)
    assert cfm.rand_noise.device.type == "cpu"
    assert torch.isfinite(cfm.rand_noise).all()


def test_too_long_input_is_refused():
    cfm = CausalConditionalCFM(240, CFM_PARAMS, spk_emb_dim=80)
    with pytest.raises(ValueError, match="300 s"):
        cfm.initial_noise(torch.zeros(1, 80, 15001))


# ---------------------------------------------------------------------------------------------
# look-ahead and encoder argument checks
# ---------------------------------------------------------------------------------------------

def test_pre_lookahead_context_equals_real_next_frames():
    """Passing the next frames as context gives what the layer computes on the longer sequence."""
    torch.manual_seed(0)
    layer = PreLookaheadLayer(8, 16, 3).eval()
    x = torch.randn(2, 12, 8)
    with torch.no_grad():
        full = layer(x)
        chunk = layer(x[:, :9], context=x[:, 9:])
    close(chunk, full[:, :9], atol=1e-6, rtol=0)
    assert (layer(x[:, :9]) - full[:, :9]).abs().max() > 1e-4  # zero look-ahead differs at the end
    with pytest.raises(ValueError, match="pre_lookahead_len"):
        layer(x[:, :9], context=x[:, 9:11])
    with pytest.raises(RuntimeError, match="eval"):
        layer.train()(x[:, :9], context=x[:, 9:])


def test_upsample_encoder_requires_upstream_width():
    with pytest.raises(ValueError, match="512"):
        UpsampleConformerEncoder(input_size=256, output_size=256, input_layer="linear")


# ---------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------

def test_fp16_autocast_estimator_close_to_fp32(model, fx):
    """Measured: max |fp16 - fp32| 9.4e-3, RMS 1.4e-3 on outputs up to 3.8. Bound: 5e-2 max, 1e-2 RMS."""
    check_fp16_estimator(model, fx, max_err=5e-2, rms_err=1e-2)


def test_fp16_autocast_inference_close_to_fp32(model, fx):
    """Measured (short streaming chunk): max |fp16 - fp32| 6.5e-3, RMS 1.5e-3 on mels up to 5.6, the Euler
    state staying FP32. Bound: 5e-2 max, 1e-2 RMS."""
    check_fp16_inference(model, fx, max_err=5e-2, rms_err=1e-2)


def test_fp16_autocast_train_loss_and_grads(model, fx):
    """Measured 2e-5 relative loss error against FP32 (8-token batch); every parameter gets a finite gradient."""
    check_fp16_train_loss_and_grads(model, fx, rel_err=1e-3)


def test_causal_block_layer_norm_stays_fp32_under_autocast(model):
    block = model.decoder.estimator.final_block
    x = torch.randn(1, block.block[0].in_channels, 10)
    with torch.autocast("cpu", dtype=torch.float16):
        normed = block.block[2](block.block[0](x).transpose(1, 2))
    assert normed.dtype == torch.float32
