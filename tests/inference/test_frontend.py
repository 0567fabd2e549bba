"""The inference front end: text normalisation, tokenizer choice, prompt features, spk2info, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosytrain.data.text_tokenizer import ByteTokenizer
from cosytrain.inference.frontend import (
    CosyVoiceFrontEnd,
    FrontEndError,
    feat_params,
    load_spk2info,
    load_wav,
    text_tokenizer_spec,
)
from cosytrain.inference.text_normalizer import number_to_words, spell_out_numbers, split_paragraph, text_normalize
from cosytrain.modeldir import open_model_dir
from tests.inference.test_auto import SPEAKER, shared_v1_dir, synthetic_voice, write_prompt

BYTES = ByteTokenizer().encode


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_v1_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def frontend(v1_dir: Path) -> CosyVoiceFrontEnd:
    d = open_model_dir(v1_dir)
    return CosyVoiceFrontEnd(d.path, d.config, d.generation, text_token_limit=257, speech_token_limit=40)


# ----------------------------------------------------------------------------- text
@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (21, "twenty-one"), (100, "one hundred"),
    (105, "one hundred and five"), (1000, "one thousand"), (1005, "one thousand and five"),
    (2024, "two thousand and twenty-four"), (1_000_001, "one million and one"),
    (123_456, "one hundred and twenty-three thousand four hundred and fifty-six"),
])
def test_number_to_words(n: int, words: str) -> None:
    assert number_to_words(n) == words


def test_spell_out_numbers() -> None:
    assert spell_out_numbers("I have 3 cats and 1,200 fish.") == "I have three cats and one thousand two hundred fish."
    assert spell_out_numbers("pi is 3.14") == "pi is three point one four"
    assert spell_out_numbers("no digits") == "no digits"


def test_split_paragraph_merges_to_the_token_window() -> None:
    sentences = [f"Sentence number {w} is here and it is long enough to count." for w in
                 ("one", "two", "three", "four", "five", "six")]
    pieces = split_paragraph(" ".join(sentences), BYTES, "en", token_max_n=120, token_min_n=80, merge_len=20)
    assert "".join(p.replace(" ", "") for p in pieces) == "".join(s.replace(" ", "") for s in sentences)
    assert len(pieces) > 1
    # a piece is closed only once it holds more than token_min_n tokens and the next sentence would
    # pass token_max_n; so every piece but the last has 2 of these ~60-token sentences
    assert len(pieces) == 3 and all(80 < len(BYTES(p)) < 130 for p in pieces)
    assert len(split_paragraph(" ".join(sentences), BYTES, "en", token_max_n=1000, token_min_n=900)) == 1
    # a short tail joins the piece before it
    tail = split_paragraph(" ".join(sentences[:3]) + " Ok.", BYTES, "en", token_max_n=120, token_min_n=80)
    assert tail[-1].endswith("Ok.") and not any(p == "Ok." for p in tail)


def test_split_keeps_decimals_and_adds_final_punctuation() -> None:
    assert split_paragraph("Version 2.5 is out", BYTES) == ["Version 2.5 is out."]
    assert split_paragraph("你好世界", BYTES, "zh") == ["你好世界。"]


def test_text_normalize() -> None:
    assert text_normalize("  Hello   world  ", BYTES, split=False) == "Hello world"
    assert text_normalize("I am 21.", BYTES) == ["I am twenty-one."]
    # tagged text is passed through untouched, as upstream
    tagged = "Hello <|endofprompt|> 42 [laughter]"
    assert text_normalize(tagged, BYTES) == [tagged]
    assert text_normalize("Hello 42", BYTES, text_frontend=False) == ["Hello 42"]
    # punctuation-only pieces are dropped
    assert text_normalize("... !", BYTES) == [] and text_normalize("。", BYTES) == []
    zh = text_normalize("你好 世界（测试）, ", BYTES, split=False)
    assert zh == "你好世界测试。"


# ----------------------------------------------------------------------------- directory files
def test_text_tokenizer_spec(tmp_path: Path) -> None:
    assert text_tokenizer_spec(tmp_path, "v1") == ("whisper", None)
    assert text_tokenizer_spec(tmp_path, "v2") == ("qwen", str(tmp_path / "CosyVoice-BlankEN"))
    assert text_tokenizer_spec(tmp_path, "v3") == ("qwen3", str(tmp_path / "CosyVoice-BlankEN"))
    (tmp_path / "cosytrain.json").write_text(json.dumps({"run_text_tokenizer": "byte"}))  # the exporter's key
    assert text_tokenizer_spec(tmp_path, "v1") == ("byte", None)
    (tmp_path / "cosytrain.json").write_text("{not json")
    with pytest.raises(FrontEndError, match="cosytrain.json"):
        text_tokenizer_spec(tmp_path, "v1")


def test_feat_params_from_config_or_defaults(frontend: CosyVoiceFrontEnd) -> None:
    assert frontend.feat_kwargs == dict(n_fft=1024, num_mels=80, sampling_rate=22050, hop_size=256, win_size=1024,
                                        fmin=0, fmax=8000, center=False)
    v2 = feat_params({"sample_rate": 24000}, "v2")
    assert (v2["n_fft"], v2["hop_size"], v2["sampling_rate"]) == (1920, 480, 24000)


def test_load_wav_paths_and_tensors(tmp_path: Path) -> None:
    stereo = np.stack([synthetic_voice(0.5, 22050, 150, 0), np.zeros(11025, np.float32)], axis=1)
    path = tmp_path / "s.wav"
    sf.write(str(path), stereo, 22050, subtype="FLOAT")
    speech = load_wav(path, 16000)
    assert speech.shape == (1, 8000)  # channels averaged, resampled
    assert torch.allclose(load_wav(path, 22050)[0], torch.from_numpy(stereo.mean(1)), atol=1e-6)
    assert load_wav(torch.ones(1600), 16000).shape == (1, 1600)
    with pytest.raises(FrontEndError, match="not found"):
        load_wav(tmp_path / "missing.wav", 16000)
    with pytest.raises(FrontEndError, match="NaN"):
        load_wav(torch.tensor([0.0, float("nan")]), 16000)


def test_spk2info(tmp_path: Path) -> None:
    assert load_spk2info(tmp_path / "none.pt") == {}
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(FrontEndError, match="speaker id"):
        load_spk2info(tmp_path / "list.pt")


# ----------------------------------------------------------------------------- model inputs
def test_sft_and_instruct_inputs(frontend: CosyVoiceFrontEnd) -> None:
    sft = frontend.frontend_sft("Hi.", SPEAKER)
    assert sft["text"].dtype == torch.int32 and sft["text"].tolist() == [BYTES("Hi.")]
    assert sft["text_len"].tolist() == [3]
    assert sft["llm_embedding"].shape == (1, 192) and sft["flow_embedding"] is sft["llm_embedding"]
    ins = frontend.frontend_instruct("Hi.", SPEAKER, "Calm.<|endofprompt|>")
    assert "llm_embedding" not in ins and ins["prompt_text"].shape[1] == len(BYTES("Calm.<|endofprompt|>"))
    with pytest.raises(FrontEndError, match="unknown speaker 'x'"):
        frontend.frontend_sft("Hi.", "x")


def test_zero_shot_inputs_from_a_prompt(frontend: CosyVoiceFrontEnd, tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "p.wav", seconds=1.0, sr=24000)
    zs = frontend.frontend_zero_shot("Hello.", "Prompt.", str(prompt), 22050)
    tokens, feat = zs["llm_prompt_speech_token"], zs["prompt_speech_feat"]
    assert tokens.shape == (1, 50) and 0 <= int(tokens.min()) and int(tokens.max()) < 40  # 50 Hz, codebook 32
    assert feat.shape == (1, int(22050 / 256), 80) and torch.isfinite(feat).all()  # 22.05 kHz, hop 256
    assert zs["prompt_speech_feat_len"].tolist() == [feat.shape[1]]
    assert zs["flow_embedding"].shape == (1, 192)
    assert zs["prompt_text"].tolist() == [BYTES("Prompt.")]
    cl = frontend.frontend_cross_lingual("Hello.", str(prompt), 22050)
    assert not {"prompt_text", "llm_prompt_speech_token"} & set(cl)
    assert torch.equal(cl["flow_prompt_speech_token"], tokens)
    # different voices give different embeddings; the same voice the same one
    other = write_prompt(tmp_path / "o.wav", seconds=1.0, sr=16000, f0=260.0)
    e1 = frontend._extract_spk_embedding(str(prompt))
    assert torch.allclose(e1, frontend._extract_spk_embedding(str(prompt)))
    assert not torch.allclose(e1, frontend._extract_spk_embedding(str(other)))


def test_v2_prompt_is_trimmed_to_two_frames_per_token(v1_dir: Path, tmp_path: Path) -> None:
    """v2/v3 flows need token_mel_ratio mel frames per prompt token; upstream trims both to fit."""
    from cosytrain.data.speech_tokenizer import BuiltinSpeechTokenizer, builtin_frames

    d = tmp_path / "v2like"
    d.mkdir()
    shutil.copy(v1_dir / "campplus_builtin.npz", d)
    audio = synthetic_voice(2.0, 16000, 140, 3)
    BuiltinSpeechTokenizer.fit(builtin_frames(audio, 25), 25, codebook_size=8, iters=3).save(
        d / "speech_tokenizer_builtin.npz")
    fe = CosyVoiceFrontEnd(d, {"sample_rate": 24000, "token_mel_ratio": 2}, "v2")
    prompt = write_prompt(tmp_path / "p.wav", seconds=1.03, sr=16000)
    fe._tokenizer = ByteTokenizer()  # no Qwen folder here; the text side is not what this test checks
    zs = fe.frontend_zero_shot("Hi.", "P.", str(prompt), 24000)
    n = zs["flow_prompt_speech_token"].shape[1]
    assert zs["prompt_speech_feat"].shape[1] == 2 * n and zs["prompt_speech_feat_len"].tolist() == [2 * n]
    assert zs["flow_prompt_speech_token_len"].tolist() == [n] and 24 <= n <= 26


def test_missing_or_mismatched_front_end_files(v1_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "bare"
    d.mkdir()
    config = open_model_dir(v1_dir).config
    fe = CosyVoiceFrontEnd(d, config, "v1")
    prompt = write_prompt(tmp_path / "p.wav")
    with pytest.raises(FrontEndError, match="speech_tokenizer_v1.onnx or speech_tokenizer_builtin.npz"):
        fe._extract_speech_token(str(prompt))
    with pytest.raises(FrontEndError, match="campplus.onnx or campplus_builtin.npz"):
        fe._extract_spk_embedding(str(prompt))
    # a 25 Hz stand-in in a 50 Hz (v1) directory is refused
    from cosytrain.data.speech_tokenizer import BuiltinSpeechTokenizer, builtin_frames

    BuiltinSpeechTokenizer.fit(builtin_frames(synthetic_voice(1.0, 16000, 120, 1), 25), 25, codebook_size=4,
                               iters=2).save(d / "speech_tokenizer_builtin.npz")
    with pytest.raises(FrontEndError, match="25 Hz tokens but this model needs 50 Hz"):
        CosyVoiceFrontEnd(d, config, "v1")._extract_speech_token(str(prompt))
    # a byte-tokenised directory whose llm has too small a text table
    (d / "cosytrain.json").write_text(json.dumps({"text_tokenizer": "byte"}))
    with pytest.raises(FrontEndError, match="257 ids but the llm embeds 100"):
        CosyVoiceFrontEnd(d, config, "v1", text_token_limit=100)._extract_text_token("hi")
    # the caller's override wins over cosytrain.json
    assert CosyVoiceFrontEnd(d, config, "v1", text_tokenizer="whisper").text_tokenizer_kind == "whisper"
    # no whisper package (simulated) and no vocabulary file: a one-line error naming the extra to install
    (d / "cosytrain.json").unlink()
    import sys

    from cosytrain.data.text_tokenizer import build_text_tokenizer

    build_text_tokenizer.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "whisper", None)
            mp.setitem(sys.modules, "whisper.tokenizer", None)
            with pytest.raises(FrontEndError, match=r"cosytrain\[whisper\]"):
                CosyVoiceFrontEnd(d, config, "v1")._extract_text_token("hi")
    finally:
        build_text_tokenizer.cache_clear()


def test_long_prompt_is_refused(frontend: CosyVoiceFrontEnd) -> None:
    with pytest.raises(FrontEndError, match="at most 30 s"):
        frontend._extract_speech_token(torch.zeros(16000 * 31))
