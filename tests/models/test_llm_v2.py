"""CosyVoice 2 Qwen2LM (+ Qwen2Encoder) against the upstream reference fixture, plus inference behaviour.

Helpers here (``build_fixture_model``, ``run_case``, ``ScriptedSampler``, ``FeedRecorder``) are
shared with ``test_llm_v3.py``.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from cosytrain.models.common import IGNORE_ID
from cosytrain.models.llm import Qwen2Encoder, Qwen2LM
from cosytrain.modeldir import build_from_fixture_config
from tests.conftest import load_fixture


# ----------------------------------------------------------------------------- shared helpers
def make_qwen_dir(folder: Path, qwen2_config: dict, weights: bool) -> str:
    """A HF Qwen2 folder as the fixture generator made it (seed 1234), or with config.json only."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(1234)
        Qwen2ForCausalLM(Qwen2Config(**qwen2_config)).save_pretrained(str(folder))
    else:
        (folder / "config.json").write_text(json.dumps(qwen2_config))
    return str(folder)


def build_fixture_model(fx: dict, qwen_dir: str):
    """Build ``fx['config']`` with ``${QWEN_DIR}`` filled in, strict-load the fixture weights, eval()."""
    cfg = copy.deepcopy(fx["config"])
    assert cfg["llm"]["pretrain_path"] == "${QWEN_DIR}"
    cfg["llm"]["pretrain_path"] = qwen_dir
    model = build_from_fixture_config(cfg)
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def run_case(model, fx: dict, case: str, autocast: bool = False) -> dict:
    """Replay a fixture call (seeds as the generator set them) and capture intermediates with hooks."""
    cap: dict = {}
    hooks = [
        model.llm.register_forward_hook(lambda m, a, o: cap.update(lm_input=a[0], lm_input_len=a[1], lm_output=o[0])),
        model.llm_decoder.register_forward_hook(lambda m, a, o: cap.update(logits=o)),
        model.criterion_ce.register_forward_hook(lambda m, a, o: cap.update(lm_target=a[1])),
    ]
    seed = fx["inputs"][case]["python_seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            res = model(fx["inputs"][case]["batch"], torch.device("cpu"))
        cap["next_random"] = random.random()  # shows how many python draws the forward consumed
    finally:
        for h in hooks:
            h.remove()
    cap.update(res)
    return cap


def check_case(got: dict, ref: dict, seed: int) -> None:
    for name in ["lm_input", "lm_output", "logits"]:
        if name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-4, msg=name)
    assert torch.equal(got["lm_input_len"], ref["lm_input_len"])
    assert torch.equal(got["lm_target"], ref["lm_target"])
    assert abs(got["loss"].item() - ref["loss"].item()) <= 1e-5 * abs(ref["loss"].item())
    assert got["acc"].item() == ref["acc"].item()
    # exactly one python draw per sample, in batch order, with upstream's values
    draws = ref["python_random_draws"]
    rng = random.Random(seed)
    assert [rng.random() for _ in draws] == [d[1] for d in draws]
    assert got["next_random"] == rng.random()


class ScriptedSampler:
    """Deterministic stand-in for ras_sampling: plays ``script`` (ids), then ``tail`` forever."""

    def __init__(self, script: List[int], tail: int):
        self.script, self.tail, self.calls = list(script), tail, 0

    def __call__(self, scores, decoded, sampling):
        self.calls += 1
        tok = self.script[self.calls - 1] if self.calls <= len(self.script) else self.tail
        return torch.tensor([tok])


class FeedRecorder:
    """Wraps ``llm.forward_one_step`` to record every embedding fed to the LM (in order)."""

    def __init__(self, model):
        self.fed: List[torch.Tensor] = []
        self._inner = model.llm.forward_one_step  # install with monkeypatch.setattr(model.llm, ...)

    def __call__(self, xs, masks, cache=None):
        assert masks.shape[-1] == xs.size(1) + (0 if cache is None else cache.get_seq_length())
        self.fed.append(xs.detach().clone())
        return self._inner(xs, masks, cache)

    @property
    def sequence(self) -> torch.Tensor:
        return torch.cat(self.fed, dim=1)[0]


def force_bistream(monkeypatch, coin: float = 0.0) -> None:
    """Make every per-sample layout draw pick bistream (0.0) or unistream (0.9)."""
    monkeypatch.setattr(random, "random", lambda: coin)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fx():
    return load_fixture("v2_llm")


@pytest.fixture(scope="module")
def qwen_dir(fx, tmp_path_factory):
    return make_qwen_dir(tmp_path_factory.mktemp("qwen_v2"), fx["qwen2_config"], weights=True)


@pytest.fixture(scope="module")
def model(fx, qwen_dir) -> Qwen2LM:
    return build_fixture_model(fx, qwen_dir)


# ----------------------------------------------------------------------------- construction
def test_builds_from_config_only_folder_and_on_meta(fx, tmp_path):
    cfg_dir = make_qwen_dir(tmp_path / "cfg_only", fx["qwen2_config"], weights=False)
    enc = Qwen2Encoder(cfg_dir)
    assert enc.hidden_size == 896 and enc.model.config.num_hidden_layers == 2
    keys = set(enc.state_dict())
    assert "model.model.embed_tokens.weight" in keys and "model.lm_head.weight" in keys
    assert enc.model.lm_head.weight is enc.model.model.embed_tokens.weight  # tied, as upstream
    with torch.device("meta"):
        meta = Qwen2Encoder(cfg_dir)
    assert all(t.is_meta for t in meta.state_dict().values()) and set(meta.state_dict()) == keys
    with pytest.raises(FileNotFoundError, match="qwen_pretrain_path"):
        Qwen2Encoder(str(tmp_path / "missing"))


def test_pretrained_weights_are_loaded_when_present(fx, qwen_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1234)
    ref = Qwen2ForCausalLM(Qwen2Config(**fx["qwen2_config"]))
    torch.manual_seed(99)  # a random init would differ
    enc = Qwen2Encoder(qwen_dir)
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.model.state_dict()[k], v), k


def test_state_dict_matches_fixture_keys(model, fx):
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in fx["state_dict"].items()}
    assert model.llm.model.lm_head.weight is model.llm.model.model.embed_tokens.weight
    assert (model.sos, model.task_id, model.eos_token, model.fill_token) == (0, 1, 60, 62)


# ----------------------------------------------------------------------------- teacher forcing
@pytest.mark.parametrize("case", ["forward_unistream", "forward_mixed"])
def test_forward_matches_upstream(model, fx, case):
    check_case(run_case(model, fx, case), fx["outputs"][case], fx["inputs"][case]["python_seed"])


def test_mixed_case_layout_is_bistream_for_sample_0_only(model, fx):
    """Sample 0 (draw < 0.5, ratio > 3) interleaves; sample 1 (draw >= 0.5) and 2 (ratio <= 3) do not."""
    got = run_case(model, fx, "forward_mixed")
    target = got["lm_target"]
    assert (target[0] == model.fill_token).sum() == 2 and (target[0] == model.eos_token).sum() == 1
    assert not (target[1:] == model.fill_token).any()
    # unistream sample 1: [-1]*(1+text_len) + speech + [eos]
    batch = fx["inputs"]["forward_mixed"]["batch"]
    t_len, s_len = int(batch["text_token_len"][1]), int(batch["speech_token_len"][1])
    expect = [IGNORE_ID] * (1 + t_len) + batch["speech_token"][1, :s_len].tolist() + [model.eos_token]
    assert target[1, : len(expect)].tolist() == expect


def test_forward_fp16_autocast_close_to_fp32(model, fx):
    """Measured on CPU: logits max |diff| ~1.7e-3, loss relative diff <= 2.2e-5."""
    for case in ["forward_unistream", "forward_mixed"]:
        ref = run_case(model, fx, case)
        half = run_case(model, fx, case, autocast=True)
        assert half["loss"].dtype == torch.float32 and torch.isfinite(half["loss"])
        assert half["logits"].dtype == torch.float16 and torch.isfinite(half["logits"]).all()
        assert (half["logits"].float() - ref["logits"]).abs().max() < 1e-2
        assert abs(half["loss"].item() - ref["loss"].item()) < 1e-3 * ref["loss"].item()


def test_train_step_reaches_every_part(model, fx):
    """A backward pass gives gradients to llm_embedding, speech_embedding, Qwen and the decoder."""
    model.train()
    try:
        random.seed(0)
        model.zero_grad()
        model(fx["inputs"]["forward_mixed"]["batch"], torch.device("cpu"))["loss"].backward()
        for name in ["llm_embedding.weight", "speech_embedding.weight", "llm_decoder.weight",
                     "llm.model.model.embed_tokens.weight", "llm.model.model.layers.1.mlp.down_proj.weight"]:
            grad = model.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, name
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


# ----------------------------------------------------------------------------- inference
def _inputs(text_len=4, prompt_len=2, prompt_speech=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(
        text=torch.randint(0, 128, (1, text_len), generator=g),
        text_len=torch.tensor([text_len], dtype=torch.int32),
        prompt_text=torch.randint(0, 128, (1, prompt_len), generator=g),
        prompt_text_len=torch.tensor([prompt_len], dtype=torch.int32),
        prompt_speech_token=torch.randint(0, 60, (1, prompt_speech), generator=g),
        prompt_speech_token_len=torch.tensor([prompt_speech], dtype=torch.int32),
        embedding=torch.zeros(0, 192),
    )


def test_inference_tokens_in_range_and_repeatable(model):
    torch.manual_seed(0)
    kw = _inputs()
    tokens = list(model.inference(**kw, min_token_text_ratio=1, max_token_text_ratio=3))
    assert 4 <= len(tokens) <= 12 and all(isinstance(t, int) and 0 <= t < 60 for t in tokens)
    assert kw["text_len"].item() == 4  # the caller's tensor is not edited in place (upstream's is)
    torch.manual_seed(0)
    assert list(model.inference(**kw, min_token_text_ratio=1, max_token_text_ratio=3)) == tokens


def test_inference_feeds_the_training_layout(model, monkeypatch):
    """Unistream inference sees [sos, prompt_text+text, task_id, prompt_speech, generated...]."""
    kw = _inputs(text_len=3, prompt_len=2, prompt_speech=4)
    monkeypatch.setattr(model, "sampling", ScriptedSampler([7, 8, 9], tail=model.eos_token))
    rec = FeedRecorder(model)
    monkeypatch.setattr(model.llm, "forward_one_step", rec)
    assert list(model.inference(**kw, min_token_text_ratio=0, max_token_text_ratio=5)) == [7, 8, 9]
    force_bistream(monkeypatch, coin=0.9)
    with torch.no_grad():
        speech = torch.cat([kw["prompt_speech_token"], torch.tensor([[7, 8, 9]])], dim=1)
        text = torch.cat([kw["prompt_text"], kw["text"]], dim=1)
        _, lm_input, lm_len = model.prepare_lm_input_target(
            model._special_emb(model.sos), text, model._text_emb(text), torch.tensor([5]),
            model._special_emb(model.task_id), speech, model.speech_embedding(speech), torch.tensor([7]))
    torch.testing.assert_close(rec.sequence, lm_input[0, : int(lm_len[0])])


def test_inference_bistream_produces_tokens_from_text_pieces(model):
    torch.manual_seed(0)
    kw = _inputs(text_len=12, prompt_len=5, prompt_speech=15)
    text = kw.pop("text")
    kw.pop("text_len")
    pieces = (text[:, i:i + 2] for i in range(0, 12, 2))
    tokens = list(model.inference_bistream(pieces, **kw, max_token_text_ratio=5))
    # upstream's schedule: 15 tokens right after [prompt text, prompt speech] (its fill index for a
    # prompt of exactly 15), then 15 after each 5 new text tokens (2 rounds); the final phase stops
    # at 5 per new text token in total
    assert 45 <= len(tokens) <= 60
    assert all(isinstance(t, int) and 0 <= t < 60 for t in tokens)
