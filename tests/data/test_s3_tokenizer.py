"""Batched speech tokenization on the REAL tokenizer architectures (s3tokenizer's v1/v2/v3 models, random
weights): padding in a batch leaves every utterance's tokens equal to one-at-a-time extraction, through
the PyTorch model, through an ONNX export of it in cosytrain's ONNX path, and through the device path.

The width is cut to 256 (2 layers) to keep CI cheap; the structure (masked convolutions, attention
bias, FSMN memory, rotary tables, VQ / FSQ quantisers, strides) is the official one. The same
comparison at the official sizes is in ``bench/tokenizer_padding.py`` (figures in ``bench/README.md``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cosytrain.data import prepare as P
from cosytrain.data import shards as S
from cosytrain.data.speech_tokenizer import OnnxSpeechTokenizer, S3TorchSpeechTokenizer, whisper_log_mel

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "s3tokenizer_random.py"
_spec = importlib.util.spec_from_file_location("s3tokenizer_random", _TOOL)
_s3r = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_s3r)  # type: ignore[union-attr]
VERSIONS, ExportableS3, build_s3, export_onnx = _s3r.VERSIONS, _s3r.ExportableS3, _s3r.build_s3, _s3r.export_onnx

RATE = {"v1": 50, "v1_25hz": 25, "v2": 25, "v3": 25}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("s3")
    return {v: (m := build_s3(v), export_onnx(m, out / f"{v}.onnx")) for v in VERSIONS}


def _mels(n: int = 7, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(128, int(t), generator=g) for t in torch.randint(40, 420, (n,), generator=g)]


def _pad(mels: list[torch.Tensor], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest; ``fill`` > 0 puts loud noise (not zeros) into the padding."""
    lens = torch.tensor([m.shape[1] for m in mels], dtype=torch.int32)
    feats = fill * torch.randn(len(mels), 128, int(lens.max()), generator=torch.Generator().manual_seed(9))
    for i, m in enumerate(mels):
        feats[i, :, :m.shape[1]] = m
    return feats, lens


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("version", VERSIONS)
def test_padding_leaves_tokens_equal_on_the_real_architecture(models, version: str) -> None:
    model, _ = models[version]
    mels = _mels()
    single = [model.quantize(m[None], torch.tensor([m.shape[1]]))[0][0].tolist() for m in mels]
    every = sum(single, [])
    assert len(set(every)) >= len(every) // 10  # many distinct tokens: a flip anywhere would show
    for fill in (0.0, 10.0):  # zero padding, and noise in the padding: neither reaches the tokens
        feats, lens = _pad(mels, fill)
        codes, code_len = model.quantize(feats, lens)
        assert [codes[i, :int(code_len[i])].tolist() for i in range(len(mels))] == single
    assert [len(s) for s in single] == [math.ceil(m.shape[1] / (100 // RATE[version])) for m in mels]
    # control: the noisy padding declared as signal changes the shorter utterances' tokens, so the
    # equality above is the masking at work, not an insensitive comparison
    codes, _ = model.quantize(feats, torch.full_like(lens, feats.shape[-1]))
    unmasked = [codes[i, :len(s)].tolist() for i, s in enumerate(single)]
    assert sum(u != s for u, s in zip(unmasked, single)) >= len(mels) // 2
    # the exportable forward is the same function as s3tokenizer's quantize
    with torch.inference_mode():
        exported = ExportableS3(model)(feats, lens)
    assert [exported[i, :len(s)].tolist() for i, s in enumerate(single)] == single


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_onnx_path_batched_equals_one_at_a_time_and_the_torch_model(models, version: str) -> None:
    model, onnx_path = models[version]
    audios = [_audio(s, i) for i, s in enumerate((1.0, 2.37, 0.51, 1.8, 0.77, 1.31))]
    one_by_one = OnnxSpeechTokenizer(onnx_path, batch_size=1)  # upstream's extraction: one utterance per call
    assert one_by_one.token_rate == RATE[version]
    reference = one_by_one.tokenize_batch(audios)
    assert OnnxSpeechTokenizer(onnx_path, batch_size=4).tokenize_batch(audios) == reference
    for a, toks in zip(audios, reference):  # and the ONNX graph computes what the PyTorch model does
        mel = whisper_log_mel(a)
        assert toks == model.quantize(mel[None], torch.tensor([mel.shape[1]]))[0][0].tolist()
    # the device path (here on CPU): s3tokenizer's model, batched
    device_path = S3TorchSpeechTokenizer(model, RATE[version], device="cpu", batch_size=4)
    assert device_path.tokenize_batch(audios) == reference


def test_prepare_tokenizes_on_a_device_like_the_onnx_path(models, tmp_path, monkeypatch) -> None:
    from tests.data.test_prepare import make_kaldi_corpus

    model, onnx_path = models["v2"]
    src = make_kaldi_corpus(tmp_path / "src", with_bad=False)

    def run(out: str, device: str | None) -> dict[str, list[int]]:
        cfg = P.PrepareConfig(src_dir=str(src), des_dir=str(tmp_path / out), speech_tokenizer=str(onnx_path),
                              campplus="builtin", onnx_batch_size=5, speech_tokenizer_device=device, progress=False)
        res = P.prepare(cfg)
        return {r["utt"]: r["speech_token"] for r in S.iter_rows(res.data_list, columns=["utt", "speech_token"])}

    onnx_tokens = run("onnx", None)
    # s3tokenizer converts upstream's own ONNX files (their node names); this test's export is not one,
    # so the device path gets the same random model directly
    monkeypatch.setattr(S3TorchSpeechTokenizer, "from_onnx",
                        classmethod(lambda cls, path, device="cuda", batch_size=32: cls(model, 25, device, batch_size)))
    assert run("device", "cpu") == onnx_tokens and len(onnx_tokens) == 12
