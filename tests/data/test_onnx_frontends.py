"""ONNX front-ends against stand-in models exported here with upstream's input/output interface."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cosytrain.data import prepare as P
from cosytrain.data import shards as S
from cosytrain.data.speaker_embedding import OnnxCampplus, campplus_features, kaldi_fbank
from cosytrain.data.speech_tokenizer import (BuiltinSpeechTokenizer, OnnxSpeechTokenizer, builtin_frames,
                                             whisper_log_mel)
from tests.conftest import require_module

require_module("onnxruntime")  # the test extra: under CI (CI=true) a missing one fails
require_module("onnx")

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_stub_onnx.py"


def _stub_module():
    spec = importlib.util.spec_from_file_location("make_stub_onnx", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    mod = _stub_module()
    return {
        "v1": (out / "tok_v1.onnx", mod.export_speech_tokenizer(out / "tok_v1.onnx", stride=2)),
        "v2": (out / "tok_v2.onnx", mod.export_speech_tokenizer(out / "tok_v2.onnx", stride=4)),
        "campplus": (out / "campplus.onnx", mod.export_campplus(out / "campplus.onnx")),
    }


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def test_whisper_log_mel_shape_range_and_frequency_placement():
    x = _audio(1.234, 0)
    mel = whisper_log_mel(x)
    assert mel.shape == (128, len(x) // 160)
    # log10 clamped to 8 decades below the peak, then (x + 4) / 4: a range of exactly 2 at most.
    assert float(mel.max() - mel.min()) <= 2.0 + 1e-6
    # A pure 1 kHz tone lands in the mel band whose centre is nearest 1 kHz (slaney scale).
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000).astype(np.float32)
    peak = int(whisper_log_mel(tone).mean(1).argmax())
    from cosytrain.data.speech_tokenizer import _mel_filters

    centres = (_mel_filters(128) * torch.linspace(0, 8000, 201)).sum(1) / _mel_filters(128).sum(1)
    assert abs(float(centres[peak]) - 1000) < 40


def test_onnx_tokenizer_matches_torch_model_batched_and_windowed(stubs):
    path, model = stubs["v1"]
    tok = OnnxSpeechTokenizer(path, batch_size=3)
    assert tok.token_rate == 50 and OnnxSpeechTokenizer(stubs["v2"][0]).token_rate == 25
    audios = [_audio(s, i) for i, s in enumerate((1.0, 2.37, 0.51, 1.8))]
    got = tok.tokenize_batch(audios)
    for a, g in zip(audios, got):
        mel = whisper_log_mel(a)
        with torch.no_grad():
            ref = model(mel[None], torch.tensor([mel.shape[1]], dtype=torch.int32))[0].tolist()
        assert g == ref and len(g) == math.ceil(mel.shape[1] / 2)
    assert OnnxSpeechTokenizer(path, batch_size=1).tokenize_batch(audios) == got

    # Over 30 s: 30 s windows tokenised separately and concatenated.
    long = _audio(31.5, 7)
    (toks,) = tok.tokenize_batch([long])
    first = tok.tokenize_batch([long[:480000]])[0]
    rest = tok.tokenize_batch([long[480000:]])[0]
    assert toks == first + rest and len(first) == 1500 and len(rest) == math.ceil((len(long) - 480000) // 160 / 2)


def test_onnx_campplus_matches_upstream_frontend(stubs):
    path, model = stubs["campplus"]
    emb = OnnxCampplus(path, batch_size=4)
    audios = [_audio(1.0, 1), _audio(1.0, 2), _audio(1.7, 3)]  # two of equal length share a batch
    got = emb.embed_batch(audios)
    for a, g in zip(audios, got):
        feat = campplus_features(a)
        # Upstream: kaldi fbank(80, dither 0, 16 kHz) minus its mean over time.
        np.testing.assert_allclose(feat.mean(0).numpy(), 0, atol=1e-4)
        np.testing.assert_allclose((kaldi_fbank(a) - feat).std(0).numpy(), 0, atol=1e-4)
        with torch.no_grad():
            ref = model(feat[None])[0].numpy()
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
        assert len(g) == 192


def test_prepare_with_onnx_models(stubs, tmp_path):
    from tests.data.test_prepare import make_kaldi_corpus

    src = make_kaldi_corpus(tmp_path / "src", with_bad=False)
    cfg = P.PrepareConfig(src_dir=str(src), des_dir=str(tmp_path / "out"), speech_tokenizer=str(stubs["v2"][0]),
                          campplus=str(stubs["campplus"][0]), onnx_batch_size=4, progress=False)
    res = P.prepare(cfg)
    assert res.num_rows == 12 and not res.skipped
    assert not (tmp_path / "out" / P.BUILTIN_TOKENIZER_FILE).exists()
    camp = OnnxCampplus(stubs["campplus"][0])
    for r in S.iter_rows(res.data_list):
        import soundfile as sf

        from cosytrain.data.speech_tokenizer import to_16k

        a, sr = sf.read(r["wav"], dtype="float32")
        a16 = to_16k(a, sr)
        assert len(r["speech_token"]) == math.ceil((len(a16) // 160) / 4)  # v2 stub: 25 Hz
        np.testing.assert_allclose(r["utt_embedding"], camp.embed_batch([a16])[0], rtol=1e-5, atol=1e-6)


def test_builtin_tokenizer_save_load_and_rates(tmp_path):
    audios = [_audio(1.0 + 0.1 * i, i) for i in range(6)]
    frames = torch.cat([builtin_frames(a, 25) for a in audios])
    tok = BuiltinSpeechTokenizer.fit(frames, token_rate=25, codebook_size=8, seed=3)
    tok.save(tmp_path / "t.npz")
    back = BuiltinSpeechTokenizer.load(tmp_path / "t.npz")
    assert back.tokenize_batch(audios) == tok.tokenize_batch(audios)
    assert [len(t) for t in tok.tokenize_batch(audios)] == [math.ceil((len(a) // 160) / 4) for a in audios]
    assert len(set(sum(tok.tokenize_batch(audios), []))) > 1
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a cosytrain built-in tokenizer"):
        BuiltinSpeechTokenizer.load(tmp_path / "other.npz")
