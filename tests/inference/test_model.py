"""CosyVoiceModel (v1): token2wav with and without streaming, the LLM path, FP16 policy, cross-fades."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cosytrain.inference.model as model_module
from cosytrain.inference.model import CosyVoiceModel, fade_in_out
from tests.inference import _tiny_v1 as tiny


def _frames(n_tokens: int) -> int:
    """Upstream v1 mel length for n 50 Hz tokens: int(n / 50 * 22050 / 256)."""
    return int(n_tokens / 50 * 22050 / 256)


def _stream_frames(n_tokens: int, hop: int, overlap: int = 20, mel_overlap: int = 34, mel_cache: int = 20) -> list[int]:
    """Mel frames each streamed chunk yields, following upstream's chunking and caches."""
    out, left, first = [], n_tokens, True
    while left >= hop + overlap:
        kept = _frames(hop + overlap) + (0 if first else mel_cache) - mel_overlap  # mel overlap held back
        out.append(kept - mel_cache)  # the hift cache's samples are held back too
        left -= hop
        first = False
    out.append(_frames(left) + (0 if first else mel_cache))
    return out


@pytest.fixture(scope="module")
def model() -> CosyVoiceModel:
    return CosyVoiceModel(tiny.build("llm"), tiny.build("flow"), tiny.build("hift"), device="cpu")


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 40, (1, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def _embedding() -> torch.Tensor:
    return torch.randn(1, 192, generator=torch.Generator().manual_seed(5))


def test_non_streaming_length_and_finite(model: CosyVoiceModel) -> None:
    out = list(model.tts(source_speech_token=_tokens(60), flow_embedding=_embedding()))
    assert len(out) == 1
    speech = out[0]["tts_speech"]
    assert speech.shape == (1, _frames(60) * 256)
    assert torch.isfinite(speech).all() and speech.abs().max() > 0
    assert not model.tts_speech_token_dict and not model.flow_cache_dict  # session cleaned up


def test_streaming_chunks_follow_upstream_caching(model: CosyVoiceModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # a shorter hop than upstream's 100 tokens keeps the test small; the caches are upstream's sizes
    monkeypatch.setattr(model, "token_min_hop_len", 40)
    monkeypatch.setattr(model, "token_max_hop_len", 40)
    tokens, emb = _tokens(110, seed=1), _embedding()
    chunks = [c["tts_speech"] for c in model.tts(source_speech_token=tokens, flow_embedding=emb, stream=True)]
    expected = _stream_frames(110, hop=40)
    assert len(expected) == 3
    assert [c.shape[1] for c in chunks] == [f * 256 for f in expected]
    assert all(torch.isfinite(c).all() for c in chunks)
    whole = next(model.tts(source_speech_token=tokens, flow_embedding=emb))["tts_speech"]
    total = sum(c.shape[1] for c in chunks)
    assert abs(total - whole.shape[1]) <= 256 * len(chunks)  # only the per-chunk int() rounding differs
    # no click at the seams: the sample-to-sample step there is like the rest of the signal
    audio = torch.cat(chunks, dim=1)[0]
    steps = audio.diff().abs()
    seams = np.cumsum([c.shape[1] for c in chunks[:-1]])
    assert max(float(steps[s - 1]) for s in seams) <= float(steps.quantile(0.999)) + 1e-6


def test_llm_path_is_seeded_and_finite(model: CosyVoiceModel) -> None:
    text = torch.tensor([[5, 17, 42, 8, 99, 3]], dtype=torch.int32)
    emb = _embedding()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(next(model.tts(text=text, flow_embedding=emb, llm_embedding=emb))["tts_speech"])
    assert torch.equal(runs[0], runs[1])
    assert torch.isfinite(runs[0]).all()
    n_tokens = runs[0].shape[1] // 256
    assert runs[0].shape[1] % 256 == 0 and n_tokens >= _frames(2 * 6)  # at least min_token_text_ratio tokens


def test_fp16_on_cpu_warns_once_and_runs_fp32(model: CosyVoiceModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "_warned_cpu_fp16", False)
    parts = (model.llm, model.flow, model.hift)
    with pytest.warns(RuntimeWarning, match="running FP32"):
        fp16 = CosyVoiceModel(*parts, fp16=True, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CosyVoiceModel(*parts, fp16=True, device="cpu")  # once only
    assert fp16.amp_dtype is None
    tokens, emb = _tokens(20, seed=3), _embedding()
    torch.manual_seed(0)
    a = next(fp16.tts(source_speech_token=tokens, flow_embedding=emb))["tts_speech"]
    torch.manual_seed(0)
    b = next(model.tts(source_speech_token=tokens, flow_embedding=emb))["tts_speech"]
    assert torch.equal(a, b)


def test_forced_fp16_autocasts_llm_and_flow_not_the_vocoder(model: CosyVoiceModel) -> None:
    forced = CosyVoiceModel(model.llm, model.flow, model.hift, fp16=True, device="cpu", force_fp16=True)
    assert forced.amp_dtype == torch.float16
    seen: dict[str, list[bool]] = {"llm": [], "flow": [], "hift": []}
    hooks = [module.register_forward_pre_hook(lambda *_, name=name: seen[name].append(torch.is_autocast_enabled("cpu")))
             for name, module in (("llm", model.llm.llm_decoder), ("flow", model.flow.encoder_proj),
                                  ("hift", model.hift.conv_pre))]
    try:
        text = torch.tensor([[5, 17, 42]], dtype=torch.int32)
        empty = torch.zeros(1, 0, dtype=torch.int32)
        gen = forced.speech_tokens(text, empty, empty, _embedding())
        tokens = [next(gen) for _ in range(3)]
        assert not torch.is_autocast_enabled("cpu")  # not left on between tokens
        speech = next(forced.tts(source_speech_token=torch.tensor([tokens * 4], dtype=torch.int32),
                                 flow_embedding=_embedding()))["tts_speech"]
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["llm"] and all(seen["llm"])
    assert seen["flow"] and all(seen["flow"])
    assert seen["hift"] and not any(seen["hift"])
    assert torch.isfinite(speech).all()


def test_fade_in_out_blends_only_the_overlap() -> None:
    new, old = torch.ones(1, 1, 6), torch.full((1, 1, 5), 3.0)
    window = torch.from_numpy(np.hamming(4))
    out = fade_in_out(new, old, window)
    expected = torch.ones(1, 1, 6, dtype=torch.float64)
    expected[..., :2] = window[:2] + 3.0 * window[2:]
    torch.testing.assert_close(out, expected.float())
    assert torch.equal(new, torch.ones(1, 1, 6))  # input untouched


def test_from_model_dir(tmp_path: Path) -> None:
    directory = tiny.make_model_dir(tmp_path / "model")
    loaded = CosyVoiceModel.from_model_dir(directory, device="cpu")
    assert torch.equal(loaded.flow.state_dict()["encoder_proj.weight"], tiny.state("flow")["encoder_proj.weight"])
    assert loaded.sample_rate == 22050 and loaded.mel_overlap_len == 34 and loaded.source_cache_len == 20 * 256


def test_load_checks_each_file_against_its_part_in_one_line(tmp_path: Path) -> None:
    """``load(llm, flow, hift)`` (upstream's signature) goes through the model directory's strict check."""
    from cosytrain.modeldir import StateDictMismatchError

    engine = CosyVoiceModel(tiny.build("llm", tiny.perturbed("llm", 1)), tiny.build("flow"), tiny.build("hift"),
                            device="cpu")
    files = {part: tmp_path / f"{part}.pt" for part in ("llm", "flow", "hift")}
    for part, path in files.items():
        torch.save(tiny.state(part), path)
    engine.load(files["llm"], files["flow"], files["hift"])
    assert all(torch.equal(v, tiny.state("llm")[k]) for k, v in engine.llm.state_dict().items())
    wrong = tiny.state("flow")
    wrong["encoder_proj.weight"] = torch.zeros(3, 3)
    torch.save(wrong, files["flow"])
    with pytest.raises(StateDictMismatchError) as err:
        engine.load(files["llm"], files["flow"], files["hift"])
    message = str(err.value)
    assert "\n" not in message and str(files["flow"]) in message and "encoder_proj.weight: model [" in message
