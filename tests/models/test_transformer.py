"""Masks, encoders and attention of cosytrain.models.transformer against upstream semantics."""

from __future__ import annotations

import inspect

import pytest
import torch

from cosytrain.models.transformer import attention as attention_mod
from cosytrain.models.transformer.attention import RelPositionMultiHeadedAttention
from cosytrain.models.transformer.embedding import EspnetRelPositionalEncoding
from cosytrain.models.transformer.encoder import ConformerEncoder, TransformerEncoder
from cosytrain.models.transformer.mask import (
    add_optional_chunk_mask,
    make_pad_mask,
    subsequent_chunk_mask,
    subsequent_mask,
)
from cosytrain.models.transformer.precision import LayerNorm


def _loop_chunk_mask(size: int, chunk: int) -> torch.Tensor:
    """Reference: upstream's original per-row loop with all left chunks visible."""
    ret = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        ret[i, : min((i // chunk + 1) * chunk, size)] = True
    return ret


# ----------------------------------------------------------------------------- masks
def test_make_pad_mask_marks_padding_only():
    lengths = torch.tensor([5, 3, 2, 0])
    mask = make_pad_mask(lengths)
    assert mask.shape == (4, 5) and mask.dtype == torch.bool
    for b, n in enumerate(lengths.tolist()):
        assert not mask[b, :n].any() and mask[b, n:].all()
    assert make_pad_mask(lengths, max_len=7).shape == (4, 7)
    assert make_pad_mask(torch.tensor([2], dtype=torch.int32), 4).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("size,chunk", [(1, 1), (7, 1), (7, 2), (10, 3), (6, 6), (5, 9)])
def test_subsequent_chunk_mask_matches_loop(size, chunk):
    got = subsequent_chunk_mask(size, chunk)
    assert torch.equal(got, _loop_chunk_mask(size, chunk))
    # upstream's vectorised mask ignores num_left_chunks; so do we
    assert torch.equal(subsequent_chunk_mask(size, chunk, num_left_chunks=0), got)


def test_chunk_size_one_is_causal():
    assert torch.equal(subsequent_chunk_mask(6, 1), subsequent_mask(6))
    assert torch.equal(subsequent_mask(6), torch.tril(torch.ones(6, 6, dtype=torch.bool)))


def test_add_optional_chunk_mask_static_and_none():
    xs = torch.zeros(2, 6, 4)
    masks = ~make_pad_mask(torch.tensor([6, 4]), 6).unsqueeze(1)
    static = add_optional_chunk_mask(xs, masks, False, False, 0, 2, -1)
    assert static.shape == (2, 6, 6)
    assert torch.equal(static, masks & _loop_chunk_mask(6, 2).unsqueeze(0))
    assert add_optional_chunk_mask(xs, masks, False, False, 0, 0, -1) is masks
    full = add_optional_chunk_mask(xs, masks, True, False, -1, 0, -1)  # dynamic, decode full
    assert torch.equal(full, masks.expand(2, 6, 6))
    fixed = add_optional_chunk_mask(xs, masks, True, False, 3, 0, -1)  # dynamic, decode chunk 3
    assert torch.equal(fixed, masks & _loop_chunk_mask(6, 3).unsqueeze(0))


def test_add_optional_chunk_mask_dynamic_draws_from_torch_rng():
    xs = torch.zeros(1, 40, 4)
    masks = torch.ones(1, 1, 40, dtype=torch.bool)
    torch.manual_seed(3)
    got = add_optional_chunk_mask(xs, masks, True, False, 0, 0, -1)
    torch.manual_seed(3)
    size = int(torch.randint(1, 40, (1,)).item())
    size = 40 if size > 20 else size % 25 + 1
    assert torch.equal(got[0], _loop_chunk_mask(40, size))


def test_add_optional_chunk_mask_sets_empty_rows_true():
    xs = torch.zeros(2, 3, 4)
    masks = ~make_pad_mask(torch.tensor([3, 0]), 3).unsqueeze(1)
    out = add_optional_chunk_mask(xs, masks, False, False, 0, 0, -1)
    assert out[1].all() and out[0].all()
    assert masks[1].all()  # in place, like upstream


# ----------------------------------------------------------------------------- encoders
UPSTREAM_CONFORMER_ARGS = [
    "input_size", "output_size", "attention_heads", "linear_units", "num_blocks", "dropout_rate",
    "positional_dropout_rate", "attention_dropout_rate", "input_layer", "pos_enc_layer_type",
    "normalize_before", "static_chunk_size", "use_dynamic_chunk", "global_cmvn", "use_dynamic_left_chunk",
    "positionwise_conv_kernel_size", "macaron_style", "selfattention_layer_type", "activation_type",
    "use_cnn_module", "cnn_module_kernel", "causal", "cnn_module_norm", "key_bias", "gradient_checkpointing",
]
UPSTREAM_TRANSFORMER_ARGS = UPSTREAM_CONFORMER_ARGS[:15] + [
    "key_bias", "selfattention_layer_type", "activation_type", "gradient_checkpointing",
]


def test_constructor_signatures_are_upstreams():
    conf = inspect.signature(ConformerEncoder.__init__).parameters
    assert list(conf)[1:] == UPSTREAM_CONFORMER_ARGS
    assert conf["input_layer"].default == "conv2d" and conf["pos_enc_layer_type"].default == "rel_pos"
    assert conf["macaron_style"].default is True and conf["use_cnn_module"].default is True
    assert conf["activation_type"].default == "swish" and conf["cnn_module_kernel"].default == 15
    trans = inspect.signature(TransformerEncoder.__init__).parameters
    assert list(trans)[1:] == UPSTREAM_TRANSFORMER_ARGS
    assert trans["pos_enc_layer_type"].default == "abs_pos" and trans["activation_type"].default == "relu"


def test_unknown_option_names_the_fix():
    with pytest.raises(ValueError, match="input_layer"):
        ConformerEncoder(8, 8, 2, 8, 1, input_layer="nope")


def _conformer(**kw) -> ConformerEncoder:
    torch.manual_seed(0)
    args = dict(input_size=6, output_size=16, attention_heads=2, linear_units=24, num_blocks=2,
                dropout_rate=0.0, positional_dropout_rate=0.0, input_layer="linear",
                pos_enc_layer_type="rel_pos_espnet", cnn_module_kernel=3)
    args.update(kw)
    enc = ConformerEncoder(**args)
    for p in enc.parameters():  # non-trivial norms/biases
        p.data.add_(0.05 * torch.randn_like(p))
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return enc.eval()


def test_conformer_keys_with_cnn_and_macaron():
    enc = _conformer(macaron_style=True, use_cnn_module=True)
    keys = set(enc.state_dict())
    for k in ["encoders.0.feed_forward_macaron.w_1.weight", "encoders.0.norm_ff_macaron.weight",
              "encoders.0.conv_module.pointwise_conv1.weight", "encoders.0.conv_module.depthwise_conv.weight",
              "encoders.0.conv_module.norm.running_var", "encoders.0.norm_conv.bias", "encoders.0.norm_final.weight",
              "encoders.1.self_attn.pos_bias_u", "embed.out.0.weight", "embed.out.1.bias", "after_norm.weight"]:
        assert k in keys, k


def test_padding_does_not_leak_into_valid_frames():
    # Without the conv module: upstream's conv module lets GLU(bias) of padded frames reach the
    # last valid frames through the depthwise conv, and we keep that behaviour.
    enc = _conformer(macaron_style=True, use_cnn_module=False)
    x = torch.randn(2, 9, 6)
    lens = torch.tensor([9, 5])
    with torch.no_grad():
        out, mask = enc(x, lens)
        alone, _ = enc(x[1:, :5], lens[1:])
    assert mask[:, 0].sum(-1).tolist() == [9, 5]
    torch.testing.assert_close(out[1, :5], alone[0], atol=1e-5, rtol=1e-5)


def test_causal_encoder_ignores_the_future():
    enc = _conformer(static_chunk_size=1, use_cnn_module=True, causal=True, macaron_style=False)
    x = torch.randn(1, 8, 6)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 6)
    with torch.no_grad():
        a, _ = enc(x, torch.tensor([8]))
        b, _ = enc(y, torch.tensor([8]))
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunk_by_chunk_with_caches_equals_full_forward(chunk):
    enc = _conformer(static_chunk_size=chunk, use_cnn_module=True, causal=True, macaron_style=True)
    x = torch.randn(1, 10, 6)
    with torch.no_grad():
        full, _ = enc(x, torch.tensor([10]), decoding_chunk_size=chunk)
        streamed, _ = enc.forward_chunk_by_chunk(x, decoding_chunk_size=chunk)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-5)


def test_transformer_encoder_forward_chunk_matches_causal_forward():
    torch.manual_seed(1)
    enc = TransformerEncoder(8, 16, 4, 32, 2, 0.0, 0.0, 0.0, "linear_legacy", "rel_pos_espnet",
                             static_chunk_size=1, selfattention_layer_type="rel_selfattn").eval()
    x = torch.randn(1, 7, 8)
    with torch.no_grad():
        full, _ = enc(x, torch.tensor([7]))
        causal = torch.tril(torch.ones(1, 4, 4, dtype=torch.bool))
        first, att_cache, cnn_cache = enc.forward_chunk(x[:, :4], 0, -1, att_mask=causal)
        outs = [first]
        for t in range(4, 7):
            one = torch.ones(1, 1, 1, dtype=torch.bool)
            y, att_cache, cnn_cache = enc.forward_chunk(x[:, t:t + 1], t, -1, att_cache, cnn_cache, one)
            outs.append(y)
    assert att_cache.shape == (2, 4, 7, 8)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- attention
def test_rel_attention_fully_masked_rows_are_zero_not_nan():
    torch.manual_seed(0)
    attn = RelPositionMultiHeadedAttention(2, 8, 0.0).eval()
    pos = EspnetRelPositionalEncoding(8, 0.0)
    x = torch.randn(1, 3, 8)
    _, pos_emb = pos(x)
    mask = torch.tensor([[[True, False, False], [False, False, False], [True, True, True]]])
    scores = torch.randn(1, 2, 3, 3)
    out = attn.forward_attention(torch.randn(1, 2, 3, 4), scores, mask)
    assert torch.isfinite(out).all()
    # a fully masked query row attends to nothing: only linear_out's bias is left
    torch.testing.assert_close(out[0, 1], attn.linear_out.bias)
    y, cache = attn(x, x, x, mask, pos_emb)
    assert y.shape == (1, 3, 8) and cache.shape == (1, 2, 3, 8)


def test_attention_softmax_and_positional_table_stay_fp32_under_autocast(monkeypatch):
    enc = _conformer(use_cnn_module=True, macaron_style=True, static_chunk_size=2)
    seen = []
    real_softmax = torch.softmax

    def spy(x, *a, **k):
        seen.append(x.dtype)
        return real_softmax(x, *a, **k)

    monkeypatch.setattr(attention_mod.torch, "softmax", spy)
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        ref, _ = enc(x, torch.tensor([7, 4]))
        seen.clear()
        with torch.autocast("cpu", dtype=torch.float16):
            out, _ = enc(x, torch.tensor([7, 4]))
    assert seen and all(d == torch.float32 for d in seen)
    assert enc.embed.pos_enc.pe.dtype == torch.float32
    assert out.dtype == torch.float32  # after_norm normalises in float32 under autocast
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 2e-2


def test_fp32_layernorm_is_plain_layernorm_outside_autocast():
    torch.manual_seed(0)
    ours, ref = LayerNorm(8, eps=1e-5), torch.nn.LayerNorm(8, eps=1e-5)
    ours.load_state_dict({"weight": torch.randn(8), "bias": torch.randn(8)})
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(ours(x), ref(x))
    with torch.autocast("cpu", dtype=torch.float16):
        assert ours(x.half()).dtype == torch.float32


def test_espnet_pe_table_not_degraded_by_half_inputs():
    pos = EspnetRelPositionalEncoding(8, 0.0, max_len=16)
    before = pos.pe.clone()
    _, pe_half = pos(torch.randn(1, 20, 8).half())  # grows the table and follows the input dtype
    assert pe_half.dtype == torch.float16 and pos.pe.dtype == torch.float32
    _, pe32 = pos(torch.randn(1, 16, 8))
    assert pe32.dtype == torch.float32
    centre_old, centre_new = before.size(1) // 2, pos.pe.size(1) // 2
    torch.testing.assert_close(pos.pe[:, centre_new - 15: centre_new + 16], before[:, centre_old - 15: centre_old + 16])


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    x = torch.randn(2, 6, 6)
    for checkpointing in (False, True):
        enc = _conformer(use_cnn_module=True, macaron_style=True, gradient_checkpointing=checkpointing).train()
        for m in enc.modules():  # BatchNorm batch statistics would differ per call otherwise
            if isinstance(m, torch.nn.BatchNorm1d):
                m.eval()
        out, _ = enc(x, torch.tensor([6, 4]))
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
