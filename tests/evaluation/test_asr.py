"""WER/CER with jiwer, and the ASR plumbing driven by a tiny randomly initialised transformers model
saved to a temporary folder (nothing is downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cosytrain.evaluation.asr import AsrError, error_rates, load_asr, normalize_text


def test_error_rates_after_normalisation():
    assert normalize_text("Hello, World!  It's   FINE.") == "hello world it's fine"
    assert error_rates("Hello, world.", "hello world") == {"wer": 0.0, "cer": 0.0}
    rates = error_rates("the cat sat on the mat", "the cat sat on a hat")
    assert rates["wer"] == pytest.approx(2 / 6) and 0 < rates["cer"] < rates["wer"]
    assert error_rates("one two", "") == {"wer": 1.0, "cer": 1.0}
    assert error_rates("...", "") == {"wer": 0.0, "cer": 0.0} and error_rates("", "words")["wer"] == 1.0


@pytest.fixture(scope="module")
def tiny_ctc(tmp_path_factory):
    """A 2-layer wav2vec2 CTC recogniser with random weights and a character vocabulary, saved locally."""
    import torch
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)

    folder = tmp_path_factory.mktemp("tiny_asr")
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=False)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                            feat_extract_norm="layer", pad_token_id=0)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).eval().save_pretrained(folder)
    return folder


def test_transformers_backend_transcribes_offline_from_a_local_folder(tiny_ctc, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asr = load_asr(f"transformers:{tiny_ctc}")
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    text = asr.transcribe(wav)
    assert isinstance(text, str) and text == asr.transcribe(wav)  # deterministic
    assert text and set(text.replace("<unk>", "")) <= set("abcdefghijklmnopqrstuvwxyz' ")  # its own alphabet
    assert error_rates(text or "x", text or "x")["wer"] == 0.0
    assert "HF_HUB_OFFLINE" not in __import__("os").environ  # the offline switch is put back


def test_bad_specs_fail_in_one_line(tmp_path):
    with pytest.raises(AsrError, match="<kind>:<local path>"):
        load_asr("whisper-large")
    with pytest.raises(AsrError, match="never downloaded"):
        load_asr(f"transformers:{tmp_path / 'absent'}")
    with pytest.raises(AsrError, match="cannot load the transformers model"):
        load_asr(f"transformers:{tmp_path}")  # an empty folder
