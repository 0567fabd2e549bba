"""Speaker similarity: 1 for the same audio, higher for the same voice than for another one, and the
rebuilt resemblyzer encoder gives the library's own embeddings."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cosytrain.evaluation.speaker_similarity import (
    CampplusEncoder,
    ResemblyzerEncoder,
    SpeakerEncoderError,
    cosine,
    load_speaker_encoder,
    to_16k,
)
from tests.evaluation._speech import make_speech

SR = 22050


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    pytest.importorskip("espeakng_loader")
    return {k: to_16k(v, SR) for k, v in make_speech(tmp_path_factory.mktemp("speech")).items()}


@pytest.fixture(scope="module")
def encoder():
    return ResemblyzerEncoder()


def test_same_audio_is_one_and_another_speaker_is_lower(speech, encoder):
    emb = {k: encoder.embed(v) for k, v in speech.items()}
    assert cosine(emb["ref"], emb["ref"]) == pytest.approx(1.0, abs=1e-6)
    same_voice = [cosine(emb["ref"], emb[k]) for k in ("other_text", "other_text2", "fast")]
    other_voice = [cosine(emb["ref"], emb["female"]), cosine(emb["other_text"], emb["female_other"])]
    assert min(same_voice) > max(other_voice) + 0.1, (same_voice, other_voice)


def test_embeddings_equal_resemblyzers_own(speech, encoder, monkeypatch):
    # resemblyzer's import chain needs pkg_resources (webrtcvad 2.0.10); a stand-in makes it importable here
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.get_distribution = lambda name: types.SimpleNamespace(version="0")
        monkeypatch.setitem(sys.modules, "pkg_resources", shim)
    from resemblyzer import VoiceEncoder
    from resemblyzer.audio import normalize_volume

    library = VoiceEncoder("cpu", verbose=False)
    for name in ("ref", "female"):
        ours = encoder.embed(speech[name])
        theirs = library.embed_utterance(normalize_volume(speech[name], -30, increase_only=True))
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_campplus_onnx_is_used_when_the_model_directory_has_it(tmp_path, speech):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    spec = importlib.util.spec_from_file_location("make_stub_onnx", Path(__file__).parents[2] / "tools" / "make_stub_onnx.py")
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    assert isinstance(load_speaker_encoder("auto", tmp_path), ResemblyzerEncoder)  # no campplus.onnx yet
    with pytest.raises(SpeakerEncoderError, match="no campplus.onnx"):
        load_speaker_encoder("campplus", tmp_path)
    stub.export_campplus(tmp_path / "campplus.onnx")
    enc = load_speaker_encoder("auto", tmp_path)
    assert isinstance(enc, CampplusEncoder)
    emb = enc.embed(speech["ref"])
    assert emb.shape == (192,) and cosine(emb, enc.embed(speech["ref"])) == pytest.approx(1.0)
    assert cosine(emb, enc.embed(speech["female"])) < 0.999
    with pytest.raises(SpeakerEncoderError, match="use 'auto'"):
        load_speaker_encoder("xvector")
