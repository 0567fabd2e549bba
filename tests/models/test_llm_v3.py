"""CosyVoice 3 CosyVoice3LM against the upstream reference fixture, plus inference behaviour."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from cosytrain.models.llm import CosyVoice3LM
from tests.conftest import load_fixture
from tests.models.test_llm_v2 import (
    FeedRecorder,
    ScriptedSampler,
    build_fixture_model,
    check_case,
    force_bistream,
    make_qwen_dir,
    run_case,
)


@pytest.fixture(scope="module")
def fx():
    return load_fixture("v3_llm")


@pytest.fixture(scope="module")
def model(fx, tmp_path_factory) -> CosyVoice3LM:
    return build_fixture_model(fx, make_qwen_dir(tmp_path_factory.mktemp("qwen_v3"), fx["qwen2_config"], weights=True))


@pytest.fixture(scope="module")
def sampling_model(model) -> CosyVoice3LM:
    """The fixture model with the 196 unused special classes' decoder rows zeroed, for real sampling.

    With the random fixture weights about 88% of ras_sampling draws are special classes, so the
    100-redraw guard (eos refused) sometimes trips; with these rows zeroed about 14% are.
    """
    damped = copy.deepcopy(model)
    with torch.no_grad():
        damped.llm_decoder.weight[damped.fill_token + 1:] = 0
    return damped


def test_special_tokens_and_modules(model, fx):
    assert (model.sos, model.eos_token, model.task_id, model.fill_token) == (60, 61, 62, 63)
    assert not hasattr(model, "llm_embedding") and model.llm_decoder.bias is None
    assert model.llm_decoder.out_features == model.speech_embedding.num_embeddings == 260
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in fx["state_dict"].items()}


@pytest.mark.parametrize("case", ["forward_unistream", "forward_mixed"])
def test_forward_matches_upstream(model, fx, case):
    check_case(run_case(model, fx, case), fx["outputs"][case], fx["inputs"][case]["python_seed"])


def test_instruct_follows_sos_with_ignored_targets(model, fx):
    got = run_case(model, fx, "forward_unistream")
    batch = fx["inputs"]["forward_unistream"]["batch"]
    n_ins, n_text = int(batch["instruct_token_len"][2]), int(batch["text_token_len"][2])
    with torch.no_grad():
        ins = model.llm.model.model.embed_tokens(batch["instruct_token"][2, :n_ins])
    torch.testing.assert_close(got["lm_input"][2, 0], model.speech_embedding.weight[model.sos].detach())
    torch.testing.assert_close(got["lm_input"][2, 1:1 + n_ins], ins)
    assert got["lm_target"][2, : 1 + n_ins + n_text].eq(-1).all()


def test_no_instruct_batch_works_at_width_64(model, fx):
    """Upstream's torch.empty(0, 896) would fail here (hidden 64); ours equals zero-length instructions."""
    batch = dict(fx["inputs"]["forward_mixed"]["batch"])
    no_keys = {k: v for k, v in batch.items() if not k.startswith("instruct")}
    zero_len = dict(batch, instruct_token_len=torch.zeros(3, dtype=torch.int32))
    out = []
    for b in (no_keys, zero_len):
        random.seed(fx["inputs"]["forward_mixed"]["python_seed"])
        with torch.no_grad():
            out.append(model(b, torch.device("cpu")))
    assert torch.isfinite(out[0]["loss"])
    assert out[0]["loss"].item() == out[1]["loss"].item() and out[0]["acc"].item() == out[1]["acc"].item()


def test_forward_fp16_autocast_close_to_fp32(model, fx):
    """Measured on CPU: logits max |diff| ~1.5e-3, loss relative diff <= 7.4e-6."""
    for case in ["forward_unistream", "forward_mixed"]:
        ref = run_case(model, fx, case)
        half = run_case(model, fx, case, autocast=True)
        assert half["loss"].dtype == torch.float32 and torch.isfinite(half["loss"])
        assert (half["logits"].float() - ref["logits"]).abs().max() < 1e-2
        assert abs(half["loss"].item() - ref["loss"].item()) < 1e-3 * ref["loss"].item()


def test_incremental_decoding_matches_full_pass(model):
    """The KV-cached steps give the same hidden states as one causal pass over the sequence."""
    torch.manual_seed(0)
    seq = torch.randn(1, 9, 64)
    with torch.no_grad():
        full, mask = model.llm(seq, torch.tensor([9]))
        prefix = 6
        y, cache = model.llm.forward_one_step(seq[:, :prefix], torch.tril(torch.ones(1, prefix, prefix)).bool())
        steps = [y]
        for t in range(prefix, 9):
            y, cache = model.llm.forward_one_step(seq[:, t:t + 1], torch.ones(1, t + 1, t + 1).tril().bool(), cache)
            steps.append(y)
    assert mask.shape == (1, 1, 9) and mask.all()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- inference
def _inputs(text_len=3, prompt_len=2, prompt_speech=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return dict(
        text=torch.randint(0, 160, (1, text_len), generator=g),
        text_len=torch.tensor([text_len], dtype=torch.int32),
        prompt_text=torch.randint(0, 160, (1, prompt_len), generator=g),
        prompt_text_len=torch.tensor([prompt_len], dtype=torch.int32),
        prompt_speech_token=torch.randint(0, 60, (1, prompt_speech), generator=g),
        prompt_speech_token_len=torch.tensor([prompt_speech], dtype=torch.int32),
        embedding=torch.zeros(0, 192),
    )


def test_inference_tokens_in_range_and_length_bounds(sampling_model):
    torch.manual_seed(0)
    tokens = list(sampling_model.inference(**_inputs(), min_token_text_ratio=2, max_token_text_ratio=8))
    assert 6 <= len(tokens) <= 24 and all(isinstance(t, int) and 0 <= t < 60 for t in tokens)


@pytest.mark.parametrize("stop", [61, 63, 159])  # eos, fill, another special class
def test_inference_refuses_specials_before_min_len_and_stops_at_them_after(model, monkeypatch, stop):
    # odd draws offer the special token, even draws token 3: refused (redrawn) for 6 steps, then taken
    monkeypatch.setattr(model, "sampling", ScriptedSampler([stop, 3] * 6, tail=stop))
    assert list(model.inference(**_inputs(), min_token_text_ratio=2, max_token_text_ratio=10)) == [3] * 6


def test_inference_runs_to_max_len_without_eos(model, monkeypatch):
    monkeypatch.setattr(model, "sampling", ScriptedSampler([], tail=4))
    assert list(model.inference(**_inputs(), min_token_text_ratio=0, max_token_text_ratio=4)) == [4] * 12


def test_inference_instruct_prefix_feeds_the_training_layout(model, monkeypatch):
    """[sos, instruct, prompt_text+text, task_id, prompt_speech, generated] == training unistream input."""
    kw = _inputs(text_len=4)
    instruct = torch.tensor([[11, 22, 33]])
    monkeypatch.setattr(model, "sampling", ScriptedSampler([5, 6], tail=model.eos_token))
    rec = FeedRecorder(model)
    monkeypatch.setattr(model.llm, "forward_one_step", rec)
    assert list(model.inference(**kw, instruct_token=instruct, min_token_text_ratio=0)) == [5, 6]
    force_bistream(monkeypatch, coin=0.9)  # unistream
    text = torch.cat([kw["prompt_text"], kw["text"]], dim=1)
    speech = torch.cat([kw["prompt_speech_token"], torch.tensor([[5, 6]])], dim=1)
    with torch.no_grad():
        _, lm_input, lm_len = model.prepare_lm_input_target(
            model._special_emb(model.sos), text, model._text_emb(text), torch.tensor([6]),
            model._special_emb(model.task_id), speech, model.speech_embedding(speech), torch.tensor([5]),
            instruct, model._text_emb(instruct), torch.tensor([3]))
    torch.testing.assert_close(rec.sequence, lm_input[0, : int(lm_len[0])])


def test_inference_bistream_feeds_the_training_interleaving(model, monkeypatch):
    """Text in pieces of 3: fed inputs follow the 5:15 training layout; fill tokens are forced, never yielded.

    Upstream re-feeds the last speech token before the final text (an upstream bug cosytrain does not
    copy): here the fed sequence is exactly the training input, token for token.
    """
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 160, (1, 12), generator=g)
    instruct = torch.tensor([[9, 8, 7]])
    script = [(7 * k + 1) % 60 for k in range(40)]
    monkeypatch.setattr(model, "sampling", ScriptedSampler(script, tail=model.eos_token))
    rec = FeedRecorder(model)
    monkeypatch.setattr(model.llm, "forward_one_step", rec)
    empty = torch.zeros(1, 0, dtype=torch.long)
    tokens = list(model.inference_bistream(
        (text[:, i:i + 3] for i in range(0, 12, 3)), empty, torch.tensor([0]), empty, torch.tensor([0]),
        torch.zeros(0, 192), instruct_token=instruct, min_token_text_ratio=0))
    assert tokens == script
    fed = rec.sequence

    force_bistream(monkeypatch, coin=0.0)
    speech = torch.tensor([script])
    with torch.no_grad():
        target, lm_input, lm_len = model.prepare_lm_input_target(
            model._special_emb(model.sos), text, model._text_emb(text), torch.tensor([12]),
            model._special_emb(model.task_id), speech, model.speech_embedding(speech), torch.tensor([40]),
            instruct, model._text_emb(instruct), torch.tensor([3]))
    assert int(lm_len[0]) == 57 and (target[0] == model.fill_token).sum() == 2
    torch.testing.assert_close(fed, lm_input[0])


def test_inference_bistream_with_prompt_and_sampling_stays_in_range(sampling_model):
    torch.manual_seed(0)
    kw = _inputs(text_len=11, prompt_len=6, prompt_speech=20)
    text = kw.pop("text")
    kw.pop("text_len")
    tokens = list(sampling_model.inference_bistream((text[:, i:i + 2] for i in range(0, 11, 2)), **kw,
                                                    max_token_text_ratio=6))
    # 10 tokens complete the prompt's second 15-token chunk, then 15 after 5 new text tokens;
    # the final phase stops at 6 speech tokens per new text token in total
    assert 10 + 15 <= len(tokens) <= 6 * 11
    assert all(isinstance(t, int) and 0 <= t < 60 for t in tokens)
