"""CosyVoice 1 TransformerLM against the upstream reference fixture, plus inference behaviour."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cosytrain.models.common import IGNORE_ID, pad_list, th_accuracy
from cosytrain.models.llm import TransformerLM
from cosytrain.models.sampling import nucleus_sampling, random_sampling, ras_sampling
from cosytrain.models.transformer.label_smoothing_loss import LabelSmoothingLoss
from tests.conftest import load_fixture, load_manifest
from tests.models._v1_builder import build


@pytest.fixture(scope="module")
def fx():
    return load_fixture("v1_llm")


def _model(fx) -> TransformerLM:
    model = build(fx["config"])
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def _run_with_capture(model: TransformerLM, fx, autocast: bool = False):
    """Replay the fixture call and capture intermediates with forward hooks."""
    cap = {}
    hooks = [
        model.text_encoder.register_forward_hook(
            lambda m, a, o: cap.update(text_encoder_out=o[0], text_encoder_mask=o[1])),
        model.text_encoder_affine_layer.register_forward_hook(
            lambda m, a, o: cap.update(text_encoder_affine_out=o)),
        model.llm.register_forward_hook(
            lambda m, a, o: cap.update(lm_input=a[0], lm_input_len=a[1], lm_output=o[0])),
        model.llm_decoder.register_forward_hook(lambda m, a, o: cap.update(logits=o)),
        model.criterion_ce.register_forward_hook(lambda m, a, o: cap.update(lm_target=a[1])),
    ]
    inp = fx["inputs"]["forward"]
    seed = inp["python_seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            res = model(inp["batch"], torch.device("cpu"))
    finally:
        for h in hooks:
            h.remove()
    cap.update(res)
    return cap


def test_forward_matches_upstream(fx):
    got = _run_with_capture(_model(fx), fx)
    ref = fx["outputs"]["forward"]
    for name in ["text_encoder_out", "text_encoder_affine_out", "lm_input", "lm_output", "logits"]:
        torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-4, msg=name)
    assert torch.equal(got["text_encoder_mask"], ref["text_encoder_mask"])
    assert torch.equal(got["lm_input_len"], ref["lm_input_len"])
    assert torch.equal(got["lm_target"], ref["lm_target"])
    assert abs(got["loss"].item() - ref["loss"].item()) <= 1e-5 * abs(ref["loss"].item())
    assert got["acc"].item() == ref["acc"].item()


def test_forward_fp16_autocast_close_to_fp32(fx):
    """Measured on CPU: logits max |diff| ~1.3e-3, loss relative diff ~3e-5."""
    model = _model(fx)
    ref = _run_with_capture(model, fx)
    half = _run_with_capture(model, fx, autocast=True)
    assert half["loss"].dtype == torch.float32 and torch.isfinite(half["loss"])
    assert torch.isfinite(half["logits"]).all()
    assert half["lm_output"].dtype == torch.float32  # residual stream + after_norm in fp32
    assert (half["logits"].float() - ref["logits"]).abs().max() < 1e-2
    assert abs(half["loss"].item() - ref["loss"].item()) < 1e-3 * ref["loss"].item()


def test_state_dict_keys_match_official_manifest():
    manifest = load_manifest("v1_llm")
    cfg = {
        "class": "cosyvoice.llm.llm.TransformerLM", "text_encoder_input_size": 512, "llm_input_size": 1024,
        "llm_output_size": 1024, "text_token_size": 51866, "speech_token_size": 4096,
        "length_normalized_loss": True, "lsm_weight": 0, "spk_embed_dim": 192,
        "text_encoder": {"class": "cosyvoice.transformer.encoder.ConformerEncoder", "input_size": 512,
                         "output_size": 1024, "attention_heads": 16, "linear_units": 4096, "num_blocks": 6,
                         "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.0,
                         "normalize_before": True, "input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
                         "selfattention_layer_type": "rel_selfattn", "use_cnn_module": False,
                         "macaron_style": False, "use_dynamic_chunk": False, "use_dynamic_left_chunk": False,
                         "static_chunk_size": 1},
        "llm": {"class": "cosyvoice.transformer.encoder.TransformerEncoder", "input_size": 1024,
                "output_size": 1024, "attention_heads": 16, "linear_units": 4096, "num_blocks": 14,
                "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.0,
                "input_layer": "linear_legacy", "pos_enc_layer_type": "rel_pos_espnet",
                "selfattention_layer_type": "rel_selfattn", "static_chunk_size": 1},
        "sampling": {"function": "cosyvoice.utils.common.ras_sampling", "top_p": 0.8, "top_k": 25,
                     "win_size": 10, "tau_r": 0.1},
    }
    with torch.device("meta"):
        model = build(cfg)
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in manifest["keys"].items()}


# ----------------------------------------------------------------------------- loss / accuracy
def test_loss_and_accuracy_definitions():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    target = torch.tensor([[1, 2, IGNORE_ID, IGNORE_ID], [0, 4, 4, IGNORE_ID]])
    loss = LabelSmoothingLoss(5, IGNORE_ID, 0.0, normalize_length=True)(logits, target)
    keep = target != IGNORE_ID
    ce = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(loss, ce)
    loss_b = LabelSmoothingLoss(5, IGNORE_ID, 0.0, normalize_length=False)(logits, target)
    torch.testing.assert_close(loss_b, ce * keep.sum() / 2)
    acc = th_accuracy(logits.view(-1, 5), target, IGNORE_ID)
    assert acc.item() == (logits.argmax(-1)[keep] == target[keep]).float().mean().item()


def test_pad_list_pads_to_longest():
    out = pad_list([torch.ones(3, 2), torch.full((1, 2), 2.0)], IGNORE_ID)
    assert out.shape == (2, 3, 2)
    assert out[0].eq(1).all() and out[1, 0].eq(2).all() and out[1, 1:].eq(IGNORE_ID).all()


# ----------------------------------------------------------------------------- sampling
def test_nucleus_sampling_stays_in_top_set():
    torch.manual_seed(0)
    scores = torch.log_softmax(torch.randn(50), dim=0)
    order = scores.argsort(descending=True)
    for _ in range(30):
        assert nucleus_sampling(scores, top_p=0.8, top_k=3).item() in order[:3].tolist()
    assert nucleus_sampling(scores, top_p=1e-6, top_k=25).item() == order[0].item()


def test_ras_falls_back_to_random_sampling_on_repeats():
    scores = torch.log_softmax(torch.tensor([4.0, 1.0, 0.5, 0.1]), dim=0)
    torch.manual_seed(5)
    first = nucleus_sampling(scores, top_p=0.8, top_k=25)
    expected = random_sampling(scores, [], 25)
    torch.manual_seed(5)
    got = ras_sampling(scores, [first.item()] * 3, 25, top_p=0.8, top_k=25, win_size=10, tau_r=0.1)
    assert got.item() == expected.item()
    torch.manual_seed(5)  # no repeats in the window -> the nucleus draw stands
    assert ras_sampling(scores, [], 25).item() == first.item()


def test_greedy_sampling_is_its_exported_upstream_equivalent():
    """greedy_sampling is exported as upstream's ras_sampling with top_k 1, tau_r 1.1: the same picks, also
    on windows full of repeats (where RAS with upstream's defaults would resample)."""
    from cosytrain.models.sampling import UPSTREAM_EQUIVALENT, greedy_sampling

    name, kwargs = UPSTREAM_EQUIVALENT["greedy_sampling"]
    assert name == "cosyvoice.utils.common.ras_sampling"
    torch.manual_seed(0)
    differs = 0
    for i in range(40):
        scores = torch.log_softmax(torch.randn(30) * 2, dim=0)
        best = int(scores.argmax())
        window = [best] * 10 if i % 2 else list(range(10))
        assert greedy_sampling(scores, window, 25).item() == best
        assert ras_sampling(scores, window, 25, **kwargs).item() == best
        differs += ras_sampling(scores, window, 25).item() != best  # upstream's defaults do not always pick it
    assert differs > 5


# ----------------------------------------------------------------------------- inference
def _infer(model, text_len=3, prompt_len=2, seed=0, **kw):
    g = torch.Generator().manual_seed(11)
    text = torch.randint(0, 100, (1, text_len), generator=g, dtype=torch.int32)
    prompt = torch.randint(0, 100, (1, prompt_len), generator=g, dtype=torch.int32)
    prompt_speech = torch.randint(0, 40, (1, 4), generator=g, dtype=torch.int32)
    emb = torch.randn(1, 192, generator=g)
    torch.manual_seed(seed)
    text_len_t = torch.tensor([text_len], dtype=torch.int32)
    tokens = list(model.inference(text, text_len_t, prompt, torch.tensor([prompt_len], dtype=torch.int32),
                                  prompt_speech, torch.tensor([4], dtype=torch.int32), emb, **kw))
    assert text_len_t.item() == text_len  # caller's tensor untouched
    return tokens


def test_inference_tokens_in_range_and_length_bounds(fx):
    model = _model(fx)
    tokens = _infer(model, min_token_text_ratio=2, max_token_text_ratio=6)
    assert 2 * 3 <= len(tokens) <= 6 * 3
    assert all(isinstance(t, int) and 0 <= t < model.speech_token_size for t in tokens)
    assert _infer(model, min_token_text_ratio=2, max_token_text_ratio=6) == tokens  # seeded -> repeatable


class _ScriptedSampler:
    """Offers eos on every other draw and token 3 otherwise (deterministic control flow)."""

    def __init__(self, eos: int, offer_eos: bool = True):
        self.eos, self.offer_eos, self.calls = eos, offer_eos, 0

    def __call__(self, scores, decoded, sampling):
        self.calls += 1
        return torch.tensor([self.eos if self.offer_eos and self.calls % 2 == 1 else 3])


def test_inference_refuses_eos_before_min_len_and_stops_at_it_after(fx):
    model = _model(fx)
    model.sampling = _ScriptedSampler(model.eos_token)
    tokens = _infer(model, min_token_text_ratio=2, max_token_text_ratio=10)
    assert tokens == [3] * (2 * 3)  # eos redrawn for the first 6 steps, taken at step 7


def test_greedy_eos_before_min_len_takes_the_best_speech_token(fx):
    """Greedy picks eos on every redraw when the model is sure it is done: upstream raises after 100
    redraws (the utterance is lost); here the draw after them masks eos and the special ids."""
    from cosytrain.models.sampling import greedy_sampling

    model = _model(fx)
    n = model.speech_token_size
    scores = torch.full((n + 1,), -10.0)
    scores[n], scores[7], scores[3] = 0.0, -1.0, -2.0  # eos first, then token 7
    picks = []

    def greedy(weighted_scores, decoded, sampling):
        picks.append(int(greedy_sampling(weighted_scores, decoded, sampling)))
        return torch.tensor([picks[-1]])

    model.sampling = greedy
    assert int(model.sampling_ids(scores, [], 25, ignore_eos=True)) == 7
    assert picks == [n] * 101 + [7]  # upstream's 100 redraws first: any draw upstream accepts is the same
    assert int(model.sampling_ids(scores, [], 25, ignore_eos=False)) == n  # eos allowed: taken
    assert float(scores[n]) == 0.0  # the caller's scores are not masked in place


def test_inference_runs_to_max_len_without_eos(fx):
    model = _model(fx)
    model.sampling = _ScriptedSampler(model.eos_token, offer_eos=False)
    assert len(_infer(model, min_token_text_ratio=0, max_token_text_ratio=4)) == 4 * 3


def test_incremental_decoding_matches_teacher_forcing(fx):
    """The cached step-by-step LM gives the same next-token distribution as the full pass."""
    model = _model(fx)
    torch.manual_seed(0)
    seq = torch.randn(1, 9, 32)
    with torch.no_grad():
        full, _ = model.llm(seq, torch.tensor([9], dtype=torch.int32))
        prefix = 6
        causal = torch.tril(torch.ones(1, prefix, prefix)).bool()
        y, att, cnn = model.llm.forward_chunk(seq[:, :prefix], 0, -1, att_mask=causal)
        steps = [y]
        for t in range(prefix, 9):
            y, att, cnn = model.llm.forward_chunk(seq[:, t:t + 1], t, -1, att, cnn,
                                                  torch.ones(1, 1, 1, dtype=torch.bool))
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
