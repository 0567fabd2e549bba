"""``python -m cosytrain synthesize``: modes, the written file, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf

from cosytrain.inference.synthesize import main
from tests.inference.test_auto import SPEAKER, shared_v1_dir, write_prompt


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_v1_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def prompt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompt(tmp_path_factory.mktemp("synth-prompt") / "p.wav", sr=22050)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_sft_writes_a_readable_wav(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "hello.wav"
    assert main(["--model_dir", str(model_dir), "--text", "Hello there.", "--speaker", SPEAKER, "--out", str(out),
                 "--seed", "1"]) == 0
    audio, sr = sf.read(str(out), dtype="float32")
    info = sf.info(str(out))
    assert sr == 22050 and info.subtype == "PCM_16" and info.channels == 1
    assert audio.ndim == 1 and 0.05 * sr < len(audio) < 30 * sr and abs(audio).max() > 0
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["hello.wav"]  # no temporary file left behind
    # the same seed gives the same audio
    again = tmp_path / "again.wav"
    assert main(["--model_dir", str(model_dir), "--text", "Hello there.", "--speaker", SPEAKER, "--out", str(again),
                 "--seed", "1"]) == 0
    assert (sf.read(str(again), dtype="float32")[0] == audio).all()


@pytest.mark.parametrize("extra", [
    ["--prompt_text", "A prompt.", "--fp16"],  # zero-shot (fp16 on a CPU: a warning, then FP32)
    [],  # cross-lingual
])
@pytest.mark.filterwarnings("ignore:fp16=True on a CPU")
def test_prompt_modes_and_streaming(model_dir: Path, prompt: Path, tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "p.flac"
    assert main(["--model_dir", str(model_dir), "--text", "Cloned voice.", "--prompt_wav", str(prompt), *extra,
                 "--stream", "--out", str(out), "--seed", "2"]) == 0
    audio, sr = sf.read(str(out), dtype="float32")
    assert sr == 22050 and len(audio) > 0.05 * sr


def test_one_line_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.wav"
    base = ["--model_dir", str(model_dir), "--text", "Hi.", "--out", str(out)]
    assert main(["--model_dir", str(tmp_path / "missing"), "--text", "Hi.", "--speaker", SPEAKER,
                 "--out", str(out)]) == 2
    assert "missing" in _error_line(capsys)
    assert main([*base, "--speaker", "ghost"]) == 2
    err = _error_line(capsys)
    assert "ghost" in err and SPEAKER in err
    assert main([*base, "--prompt_wav", str(tmp_path / "nope.wav")]) == 2
    assert "nope.wav" in _error_line(capsys)
    assert main([*base]) == 2
    assert "--speaker" in _error_line(capsys)
    assert main([*base, "--prompt_wav", str(model_dir / "llm.pt"), "--instruct", "x"]) == 2
    assert "CosyVoice 2/3" in _error_line(capsys)
    not_audio = tmp_path / "bad.wav"
    not_audio.write_bytes(b"definitely not audio")
    assert main([*base, "--prompt_wav", str(not_audio)]) == 2
    assert "bad.wav" in _error_line(capsys)
    assert main(["--model_dir", str(model_dir), "--text", "Hi.", "--speaker", SPEAKER, "--out",
                 str(tmp_path / "x.xyz")]) == 2
    assert ".xyz" in _error_line(capsys)
    assert not out.exists()


def test_list_speakers(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model_dir", str(model_dir), "--list_speakers"]) == 0
    assert capsys.readouterr().out.split() == [SPEAKER]


SYNTHESIZE_COMMAND = ("cosytrain.inference.synthesize:main", "synthesise text with a model directory to a wav file")


def test_runs_through_the_cosytrain_cli(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m cosytrain synthesize`` dispatches here (the entry is added when the CLI lists it)."""
    from cosytrain import cli

    if "synthesize" in cli.COMMANDS:
        assert cli.COMMANDS["synthesize"][0] == SYNTHESIZE_COMMAND[0]
    else:
        monkeypatch.setitem(cli.COMMANDS, "synthesize", SYNTHESIZE_COMMAND)
    out = tmp_path / "cli.wav"
    assert cli.main(["synthesize", "--model_dir", str(model_dir), "--text", "Hi.", "--speaker", SPEAKER,
                     "--out", str(out), "--seed", "0"]) == 0
    assert sf.info(str(out)).samplerate == 22050
    assert cli.main(["synthesize", "--model_dir", str(model_dir), "--list_speakers"]) == 0
    assert capsys.readouterr().out.split()[-1] == SPEAKER
