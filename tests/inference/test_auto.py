"""AutoModel / CosyVoice / CosyVoice2 / CosyVoice3 end to end on tiny random-weight model directories.

``make_v1_dir`` (also used by test_frontend.py and test_synthesize.py) writes an upstream-layout
CosyVoice 1 directory: the reference fixtures' shrunk configs (the LLM's text table sized for the
byte tokenizer) rendered as ``cosyvoice.yaml``, seeded random weights, built-in speech tokenizer and
speaker embedding fitted on synthetic voiced audio, an ``spk2info.pt`` with one speaker and a
``cosytrain.json`` naming the byte text tokenizer.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import load_fixture

SR_V1 = 22050
SPEAKER = "spk-a"


# ----------------------------------------------------------------------------- building directories
def synthetic_voice(seconds: float, sr: int, f0: float, seed: int) -> np.ndarray:
    """A vowel-like buzz (harmonics of a wobbling f0 with a formant tilt) plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    wave = sum(np.sin(k * phase) / k ** 1.2 for k in range(1, 12))
    wave *= 0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t) ** 2  # syllable-like envelope
    wave = wave / np.abs(wave).max() * 0.5 + 0.01 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


def _tiny_configs(text_token_size: int = 257) -> dict[str, Any]:
    llm = copy.deepcopy(load_fixture("v1_llm")["config"])
    llm["text_token_size"] = text_token_size  # the byte tokenizer's ids (256 + offset 1)
    return {"llm": llm, "flow": load_fixture("v1_flow")["config"], "hift": load_fixture("hift_v1")["config"]}


def v1_yaml(configs: dict[str, Any]) -> str:
    from cosytrain.modeldir import Name, dump_upstream_yaml, fixture_config_to_tree

    tree: dict[str, Any] = {"sample_rate": SR_V1}
    tree.update({part: fixture_config_to_tree(configs[part]) for part in ("llm", "flow", "hift")})
    tree["get_tokenizer"] = Name("whisper.tokenizer.get_tokenizer", [], {
        "multilingual": True, "num_languages": 100, "language": "en", "task": "transcribe"})
    tree["allowed_special"] = "all"
    tree["feat_extractor"] = Name("matcha.utils.audio.mel_spectrogram", [], {
        "n_fft": 1024, "num_mels": 80, "sampling_rate": SR_V1, "hop_size": 256, "win_size": 1024, "fmin": 0,
        "fmax": 8000, "center": False})
    return dump_upstream_yaml(tree)


def _front_end_files(path: Path, token_rate: int, codebook_size: int) -> torch.Tensor:
    """Fit the built-in tokenizer/embedding on synthetic voices; returns one speaker embedding (1, 192)."""
    from cosytrain.data.speaker_embedding import BuiltinSpeakerEmbedding, fbank_stats
    from cosytrain.data.speech_tokenizer import BuiltinSpeechTokenizer, builtin_frames

    audios = [synthetic_voice(1.5, 16000, f0, seed) for seed, f0 in enumerate((110, 140, 180, 220))]
    frames = torch.cat([builtin_frames(a, token_rate) for a in audios])
    BuiltinSpeechTokenizer.fit(frames, token_rate, codebook_size=codebook_size, iters=5).save(
        path / "speech_tokenizer_builtin.npz")
    embedder = BuiltinSpeakerEmbedding.fit(torch.stack([fbank_stats(a) for a in audios]))
    embedder.save(path / "campplus_builtin.npz")
    return torch.tensor([embedder.embed_batch([audios[0]])[0]])


def make_v1_dir(path: Path, seed: int = 0) -> Path:
    """A complete tiny CosyVoice 1 model directory at ``path``."""
    from cosytrain.modeldir import build_from_fixture_config

    path.mkdir(parents=True, exist_ok=True)
    configs = _tiny_configs()
    (path / "cosyvoice.yaml").write_text(v1_yaml(configs), encoding="utf-8")
    torch.manual_seed(seed)
    for part in ("llm", "flow", "hift"):
        module = build_from_fixture_config(configs[part])
        torch.save(module.state_dict(), path / f"{part}.pt")
    speech_token_size = configs["llm"]["speech_token_size"]
    embedding = _front_end_files(path, 50, codebook_size=min(32, speech_token_size))
    torch.save({SPEAKER: {"embedding": embedding}}, path / "spk2info.pt")
    (path / "cosytrain.json").write_text(json.dumps({"generation": "v1", "text_tokenizer": "byte"}))
    return path


def write_prompt(path: Path, seconds: float = 1.0, sr: int = 16000, f0: float = 150.0) -> Path:
    sf.write(str(path), synthetic_voice(seconds, sr, f0, seed=7), sr)
    return path


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_SHARED: dict[str, Path] = {}


def shared_v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny v1 directory per test session (tests that change a directory copy it first)."""
    if "v1" not in _SHARED or not _SHARED["v1"].is_dir():
        _SHARED["v1"] = make_v1_dir(tmp_path_factory.mktemp("v1") / "CosyVoice-tiny")
    return _SHARED["v1"]


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_v1_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def v1(v1_dir: Path):
    from cosytrain.inference.auto import AutoModel

    return AutoModel(model_dir=v1_dir, device="cpu")


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompt(tmp_path_factory.mktemp("prompt") / "prompt.wav")


def _check_audio(outputs: list[dict[str, torch.Tensor]], sample_rate: int, min_s: float = 0.02,
                 max_s: float = 30.0) -> torch.Tensor:
    assert outputs, "no chunk yielded"
    for o in outputs:
        speech = o["tts_speech"]
        assert speech.dim() == 2 and speech.shape[0] == 1 and speech.dtype == torch.float32
        assert torch.isfinite(speech).all()
    speech = torch.cat([o["tts_speech"] for o in outputs], dim=1)
    assert min_s * sample_rate <= speech.shape[1] <= max_s * sample_rate
    assert speech.abs().max() > 0
    return speech


# ----------------------------------------------------------------------------- v1 modes
def test_automodel_picks_cosyvoice_for_v1(v1) -> None:
    from cosytrain.inference.auto import CosyVoice, CosyVoice2

    assert type(v1) is CosyVoice and not isinstance(v1, CosyVoice2)
    assert v1.sample_rate == SR_V1 == v1.model.sample_rate
    assert v1.list_available_spks() == [SPEAKER]
    assert v1.frontend.text_tokenizer_kind == "byte"


def test_sft_length_follows_the_speech_tokens(v1, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token is 256 samples of mel hop at 22.05 kHz over 50 Hz: the audio length is exact."""
    counts: list[int] = []
    real = v1.model.speech_tokens

    def counting(*args: Any, **kwargs: Any):
        n = 0
        for token in real(*args, **kwargs):
            n += 1
            yield token
        counts.append(n)

    monkeypatch.setattr(v1.model, "speech_tokens", counting)
    seed_all(0)
    text = "Hi there."
    outputs = list(v1.inference_sft(text, SPEAKER))
    speech = _check_audio(outputs, v1.sample_rate)
    assert len(outputs) == 1 and len(counts) == 1
    n_text = len(text.encode())
    assert 2 * n_text <= counts[0] <= 20 * n_text  # upstream's min/max token-per-text-token ratios
    assert speech.shape[1] == int(counts[0] / 50 * 22050 / 256) * 256


def test_long_text_is_split_into_sentences(v1) -> None:
    seed_all(1)
    text = ("The quick brown fox jumps over the lazy dog, again and again, until it is tired. "
            "Then it sleeps for a while under the old tree near the river bank. It wakes up.")
    pieces = v1.frontend.text_normalize(text, split=True)
    assert len(pieces) == 2 and pieces[1].endswith("It wakes up.")
    outputs = list(v1.inference_sft(text, SPEAKER, speed=1.0))
    assert len(outputs) == 2  # one chunk per piece without streaming
    _check_audio(outputs, v1.sample_rate)


def test_zero_shot_and_cross_lingual(v1, prompt_wav: Path) -> None:
    seed_all(2)
    out = list(v1.inference_zero_shot("Good morning.", "A prompt.", str(prompt_wav)))
    _check_audio(out, v1.sample_rate)
    seed_all(3)
    prompt_16k = torch.from_numpy(sf.read(str(prompt_wav), dtype="float32")[0])[None]
    out = list(v1.inference_cross_lingual("Bonjour.", prompt_16k))  # the older tensor API works too
    _check_audio(out, v1.sample_rate)


def test_instruct_and_vc(v1, prompt_wav: Path) -> None:
    seed_all(4)
    out = list(v1.inference_instruct("Slowly now.", SPEAKER, "A calm voice.<|endofprompt|>"))
    _check_audio(out, v1.sample_rate)
    out = list(v1.inference_vc(str(prompt_wav), str(prompt_wav)))
    speech = _check_audio(out, v1.sample_rate)
    # no LLM: the source's 1 s of 50 Hz tokens becomes about 1 s of audio
    assert abs(speech.shape[1] / v1.sample_rate - 1.0) < 0.1


def test_streaming_yields_several_chunks(v1, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v1.model, "token_min_hop_len", 25)  # upstream's 100-token hop is too long for a test
    monkeypatch.setattr(v1.model, "token_max_hop_len", 25)
    seed_all(5)
    chunks = list(v1.inference_sft("Streaming works fine here.", SPEAKER, stream=True))
    assert len(chunks) >= 2
    _check_audio(chunks, v1.sample_rate)


def test_zero_shot_speaker_can_be_saved_and_reused(v1, v1_dir: Path, prompt_wav: Path, tmp_path: Path) -> None:
    import shutil

    from cosytrain.inference.auto import AutoModel

    assert v1.add_zero_shot_spk("A prompt.", str(prompt_wav), "my-voice")
    try:
        seed_all(6)
        out = list(v1.inference_zero_shot("Reused.", "", None, zero_shot_spk_id="my-voice"))
        _check_audio(out, v1.sample_rate)
        copy_dir = tmp_path / "copy"
        shutil.copytree(v1_dir, copy_dir)
        v1.model_dir = str(copy_dir)
        v1.save_spkinfo()
        reloaded = AutoModel(copy_dir, device="cpu")
        assert set(reloaded.list_available_spks()) == {SPEAKER, "my-voice"}
        saved = reloaded.frontend.spk2info["my-voice"]["flow_prompt_speech_token"]
        assert torch.equal(saved, v1.frontend.spk2info["my-voice"]["flow_prompt_speech_token"])
    finally:
        v1.frontend.spk2info.pop("my-voice", None)
        v1.model_dir = str(v1_dir)


# ----------------------------------------------------------------------------- errors
def test_unknown_speaker_is_one_line(v1) -> None:
    from cosytrain.inference.frontend import FrontEndError

    with pytest.raises(FrontEndError) as info:
        next(v1.inference_sft("Hello.", "nobody"))
    msg = str(info.value)
    assert "nobody" in msg and SPEAKER in msg and "\n" not in msg


def test_hostile_yaml_is_refused_without_running_it(tmp_path: Path, v1_dir: Path) -> None:
    import shutil

    from cosytrain.inference.auto import AutoModel
    from cosytrain.modeldir import ModelDirError

    bad = tmp_path / "bad"
    shutil.copytree(v1_dir, bad)
    marker = tmp_path / "pwned"
    text = (bad / "cosyvoice.yaml").read_text()
    (bad / "cosyvoice.yaml").write_text(f"boom: !apply:os.system ['touch {marker}']\n" + text)
    with pytest.raises(ModelDirError) as info:
        AutoModel(model_dir=bad)
    assert "os.system" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_pickled_spk2info_is_refused(tmp_path: Path) -> None:
    from fractions import Fraction

    from cosytrain.inference.frontend import FrontEndError, load_spk2info

    bad = tmp_path / "spk2info.pt"
    torch.save({"x": {"embedding": torch.zeros(1, 192), "obj": Fraction(1, 3)}}, bad)  # a pickled object
    with pytest.raises(FrontEndError, match="weights_only"):
        load_spk2info(bad)


def test_missing_dir_and_wrong_class(tmp_path: Path, v1_dir: Path) -> None:
    from cosytrain.inference.auto import AutoModel, CosyVoice2
    from cosytrain.modeldir import ModelDirError

    with pytest.raises(ModelDirError, match="not found"):
        AutoModel(model_dir=tmp_path / "nope")
    with pytest.raises(ModelDirError, match="CosyVoice 1.*AutoModel"):
        CosyVoice2(v1_dir, device="cpu")


def test_automodel_selection_by_yaml_name(tmp_path: Path) -> None:
    """Upstream's order: cosyvoice.yaml, then cosyvoice2.yaml, then cosyvoice3.yaml (by file name only)."""
    from cosytrain.inference.auto import CosyVoice, CosyVoice2, CosyVoice3, model_class_for

    for names, expected in ((["cosyvoice3.yaml"], CosyVoice3), (["cosyvoice2.yaml", "cosyvoice3.yaml"], CosyVoice2),
                            (["cosyvoice3.yaml", "cosyvoice.yaml"], CosyVoice)):
        d = tmp_path / "-".join(names)
        d.mkdir()
        for name in names:
            (d / name).write_text("sample_rate: 24000\n")
        assert model_class_for(d) is expected
    empty = tmp_path / "empty"
    empty.mkdir()
    from cosytrain.modeldir import ModelDirError

    with pytest.raises(ModelDirError, match="no cosyvoice.yaml"):
        model_class_for(empty)


# ----------------------------------------------------------------------------- v2 / v3
_QWEN_FIXTURES = {"v2": ("v2_llm", "v2_flow", "hift_v2", "cosyvoice2.yaml"),
                  "v3": ("v3_llm", "v3_flow", "hift_v3", "cosyvoice3.yaml")}


def make_qwen_dir(path: Path, generation: str) -> Path:
    """A tiny CosyVoice 2/3 directory: the fixture configs, a random tiny Qwen2 config in CosyVoice-BlankEN
    (no weights: Qwen2Encoder builds it from config.json), the byte text tokenizer."""
    from cosytrain.modeldir import build_from_fixture_config, dump_upstream_yaml, fixture_config_to_tree

    llm_name, flow_name, hift_name, yaml_name = _QWEN_FIXTURES[generation]
    fx_llm = load_fixture(llm_name)
    qwen_cfg = dict(fx_llm["qwen2_config"])
    qwen_cfg.update(vocab_size=260, num_hidden_layers=1, max_position_embeddings=1024)  # byte ids fit
    path.mkdir(parents=True, exist_ok=True)
    qwen_dir = path / "CosyVoice-BlankEN"
    qwen_dir.mkdir()
    (qwen_dir / "config.json").write_text(json.dumps(qwen_cfg))
    llm_cfg = copy.deepcopy(fx_llm["config"])
    llm_cfg["llm"]["pretrain_path"] = "QWEN_PLACEHOLDER"
    configs = {"llm": llm_cfg, "flow": load_fixture(flow_name)["config"], "hift": load_fixture(hift_name)["config"]}
    tree: dict[str, Any] = {"sample_rate": 24000, "qwen_pretrain_path": "", "token_frame_rate": 25,
                            "token_mel_ratio": 2}
    tree.update({p: fixture_config_to_tree(configs[p]) for p in ("llm", "flow", "hift")})
    text = dump_upstream_yaml(tree).replace("QWEN_PLACEHOLDER", "!ref <qwen_pretrain_path>")
    (path / yaml_name).write_text(text, encoding="utf-8")
    configs["llm"] = copy.deepcopy(llm_cfg)
    configs["llm"]["llm"]["pretrain_path"] = str(qwen_dir)
    torch.manual_seed(0)
    for part in ("llm", "flow", "hift"):
        torch.save(build_from_fixture_config(configs[part]).state_dict(), path / f"{part}.pt")
    embedding = _front_end_files(path, 25, codebook_size=32)
    torch.save({SPEAKER: {"embedding": embedding}}, path / "spk2info.pt")
    (path / "cosytrain.json").write_text(json.dumps({"generation": generation, "text_tokenizer": "byte"}))
    return path


@pytest.mark.parametrize("generation", ["v2", "v3"])
def test_qwen_generations_synthesise(tmp_path: Path, prompt_wav: Path, generation: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    from cosytrain.inference.auto import AutoModel, CosyVoice2, CosyVoice3

    model = AutoModel(model_dir=make_qwen_dir(tmp_path / generation, generation), device="cpu")
    assert type(model) is {"v2": CosyVoice2, "v3": CosyVoice3}[generation]
    assert model.sample_rate == 24000
    seed_all(8)
    _check_audio(list(model.inference_sft("Hi.", SPEAKER)), 24000)
    seed_all(9)
    prompt = "You are a helpful assistant.<|endofprompt|>A prompt." if generation == "v3" else "A prompt."
    caplog.clear()
    _check_audio(list(model.inference_zero_shot("Hi there.", prompt, str(prompt_wav))), 24000)
    assert "not found in CosyVoice3" not in caplog.text
    seed_all(10)
    _check_audio(list(model.inference_instruct2("Hi.", "Speak softly.<|endofprompt|>", str(prompt_wav))), 24000)
    with pytest.raises(NotImplementedError, match="inference_instruct2"):
        next(model.inference_instruct("Hi.", SPEAKER, "x"))
    if generation == "v3":  # upstream warns when a CosyVoice 3 prompt lacks <|endofprompt|>
        caplog.clear()
        with caplog.at_level("WARNING"):
            seed_all(11)
            list(model.inference_cross_lingual("Hi.", str(prompt_wav)))
            list(model.inference_zero_shot("Hi.", "no marker", str(prompt_wav)))
        assert "<|endofprompt|> not found" in caplog.text
