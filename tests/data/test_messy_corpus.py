"""A corpus scraped from the web and hand-edited: every kind of bad row is skipped and counted with a
reason naming the file and line (or kept and flagged), the rest is prepared; whole-file readers fail in
one line naming file, line and fix. docs/reliability.md (section 4) lists each kind with its test."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosytrain.data import prepare as P
from cosytrain.data import shards as S
from cosytrain.data.audio_checks import check_audio, declared_wav_frames
from cosytrain.data.sources import read_corpus
from tests.data.test_prepare import SR, _voice

CRLF = "\r\n"


def _wav(path: Path, seconds: float = 0.6, seed: int = 0, sr: int = SR, channels: int = 1, gain: float = 1.0,
         fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = gain * _voice(140 + 10 * seed, 0.6, seconds, seed)
    if channels == 2:
        x = np.stack([x, 0.5 * x], axis=1)
    sf.write(path, x, sr, format=fmt, subtype=None if fmt else "PCM_16")
    return path


def _truncated_wav(path: Path) -> Path:
    """A WAV whose header still promises 0.8 s but whose file was cut after 0.4 s (an interrupted copy)."""
    full = _wav(path.with_suffix(".full.wav"), 0.8, seed=9).read_bytes()
    path.write_bytes(full[:44 + 2 * int(0.4 * SR)])
    return path


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    spaced = root / "my wavs"  # a folder name with a space
    good = {f"good{i}": _wav(spaced / f"good {i}.wav", 0.6 + 0.1 * i, seed=i) for i in range(4)}
    _wav(root / "clip.wav", 0.6, seed=5, gain=4.0)  # clipped: kept, flagged
    _wav(root / "stereo.wav", 0.6, seed=6, channels=2)  # kept, flagged
    _wav(root / "flac.wav", 0.6, seed=7, fmt="FLAC")  # a FLAC named .wav: kept, flagged
    _truncated_wav(root / "trunc.wav")
    sf.write(root / "silent.wav", np.zeros(SR // 2, dtype=np.float32), SR, subtype="PCM_16")
    _wav(root / "rate8k.wav", 0.6, seed=8, sr=8000)
    sf.write(root / "rate1.wav", 0.3 * np.sin(np.arange(100)), 1)  # a header that says 1 Hz
    for name in ("bad_text_enc", "dup_same", "dup_conflict", "no_spk", "no_text", "bad_instruct", "no_path",
                 "bad_path_enc"):
        _wav(root / f"{name}.wav", 0.6, seed=3)
    scp = [f"{u} {p.relative_to(root)}  " for u, p in good.items()]  # relative paths with spaces + trailing blanks
    scp += ["clip " + str(root / "clip.wav"), "stereo stereo.wav", "flac flac.wav", "trunc trunc.wav",
            "silent silent.wav", "rate8k rate8k.wav", "rate1 rate1.wav",
            *[f"{n} {n}.wav" for n in ("bad_text_enc", "dup_same", "dup_conflict", "no_spk", "no_text",
                                       "bad_instruct")],
            "no_path", "dup_same dup_same.wav", "piped sox x.wav -t wav - |", "ark foo.ark:1234"]
    wav_scp = (CRLF.join(scp) + CRLF).encode("utf-8") + b"bad_path_enc caf\xe9.wav\r\n"
    (root / "wav.scp").write_bytes(wav_scp)
    texts = [f"{u}\tsentence {u} here \t" for u in list(good) + ["clip", "stereo", "flac", "trunc", "silent",
                                                                   "rate8k", "rate1", "no_spk", "bad_instruct",
                                                                   "dup_same", "dup_same", "dup_conflict", "piped",
                                                                   "ark", "bad_path_enc"]]
    texts += ["", "dup_conflict another text", "only_in_text some words"]
    text = codecs_bom() + (CRLF.join(texts) + CRLF).encode("utf-8") + b"bad_text_enc caf\xe9 au lait\r\n"
    (root / "text").write_bytes(text)
    spk_ids = [u for u in list(good) + ["clip", "stereo", "flac", "trunc", "silent", "rate8k", "rate1", "no_text",
                                        "bad_text_enc", "dup_same", "dup_conflict", "bad_instruct", "piped", "ark",
                                        "bad_path_enc", "no_path"]]
    # utt2spk saved by Notepad as "Unicode": UTF-16 LE with a BOM
    (root / "utt2spk").write_bytes("\r\n".join(f"{u} spk{i % 2}" for i, u in enumerate(spk_ids)).encode("utf-16"))
    (root / "instruct").write_bytes(b"good0 speak slowly\nbad_instruct \xff\xfe oops\n")
    return root


def codecs_bom() -> bytes:
    return b"\xef\xbb\xbf"


def test_reader_skips_each_bad_row_with_file_and_line(messy: Path) -> None:
    corpus = read_corpus(messy)
    got = {u.utt: u for u in corpus.utts}
    skipped = dict(corpus.skipped)
    # the BOM did not glue itself to the first id, CRLF and trailing tabs/spaces are gone, paths with spaces resolve
    assert got["good0"].text == "sentence good0 here" and got["good0"].instruct == "speak slowly"
    assert got["good1"].instruct == "" and Path(got["good2"].wav).is_file() and " " in got["good2"].wav
    assert got["dup_same"].text == "sentence dup_same here"  # the same line twice: kept once
    assert skipped["bad_text_enc"].startswith("text:") and "not UTF-8 (byte 0xe9 at column 17)" in \
        skipped["bad_text_enc"] and "iconv" in skipped["bad_text_enc"]
    line = skipped["bad_text_enc"].split(":")[1]
    assert (messy / "text").read_bytes().splitlines()[int(line) - 1].startswith(b"bad_text_enc")
    assert skipped["bad_path_enc"].startswith("wav.scp:") and "0xe9" in skipped["bad_path_enc"]
    assert skipped["bad_instruct"].startswith("instruct:2:") and "0xff" in skipped["bad_instruct"]
    assert "lines" in skipped["dup_conflict"] and "different values" in skipped["dup_conflict"]
    assert skipped["no_spk"] == "no line in utt2spk" and skipped["no_text"] == "no line in text"
    assert skipped["no_path"].startswith("wav.scp:") and "nothing after the id" in skipped["no_path"]
    assert "piped" in skipped["piped"] and "archive" in skipped["ark"]
    assert skipped["only_in_text"] == "listed in text but not in wav.scp (no audio)"
    assert set(got) | set(skipped) >= {"good0", "clip", "rate1"}


def test_prepare_a_messy_kaldi_folder(messy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the first non-UTF-8 byte aborted the whole job ('utf-8' codec can't decode ...), nothing prepared."""
    des = tmp_path / "out"
    assert P.main(["--src_dir", str(messy), "--des_dir", str(des), "--codebook_size", "8", "--no_progress"]) == 0
    summary = capsys.readouterr().out.strip()
    rows = {r["utt"]: r for r in S.iter_rows(des / "data.list")}
    assert set(rows) == {"good0", "good1", "good2", "good3", "clip", "stereo", "flac", "dup_same"}
    assert rows["good0"]["instruct"] == "speak slowly" and rows["good0"]["text"] == "sentence good0 here"
    skipped = dict(ln.split("\t") for ln in (des / "skipped.tsv").read_text(encoding="utf-8").splitlines()[1:])
    assert "truncated audio: the header declares 17640 frames" in skipped["trunc"]
    assert skipped["silent"] == "silent audio (all samples are zero)"
    assert "8000 Hz is below --min_sample_rate 16000" in skipped["rate8k"]
    assert "rate1" in skipped and "sample rate 1 Hz" in skipped["rate1"]
    assert skipped["bad_text_enc"].startswith("text:")
    flagged = {}
    for ln in (des / "flagged.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        utt, note = ln.split("\t")
        flagged.setdefault(utt, []).append(note)
    assert any(n.startswith("clipped:") for n in flagged["clip"])
    assert flagged["stereo"] == ["2 channels averaged to mono"] and flagged["flac"] == ["the file is FLAC but named .wav"]
    assert "good0" not in flagged
    assert f"{len(skipped)} skipped" in summary and f"{sum(map(len, flagged.values()))} flagged" in summary


def test_ljspeech_metadata_with_bad_rows(tmp_path: Path) -> None:
    src = tmp_path / "lj"
    for i in range(3):
        _wav(src / "wavs" / f"LJ{i}.wav", 0.5, seed=i)
    meta = (b"\xef\xbb\xbfLJ0|Raw 0|Norm 0\r\n"
            b"LJ1|Caf\xe9 latin-1|\r\n"  # not UTF-8
            b"LJ2\r\n"  # one field
            b"LJ0|Other text|\r\n"  # LJ0 again with another text
            b"\r\n")
    (src / "metadata.csv").write_bytes(meta)
    corpus = read_corpus(src)
    skipped = dict(corpus.skipped)
    assert corpus.utts == [] and set(skipped) == {"LJ0", "LJ1", "LJ2"}
    assert skipped["LJ1"].startswith("metadata.csv:2: not UTF-8") and "metadata.csv:3" in skipped["LJ2"]
    assert "lines 1 and 4" in skipped["LJ0"]
    # the same folder read as latin-1 (--encoding): LJ1 is usable, with its accent
    assert [(u.utt, u.text) for u in read_corpus(src, encoding="latin-1").utts] == [("LJ1", "Café latin-1")]


def test_prepare_with_nothing_usable_names_the_first_reason(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "wav.scp").write_bytes(b"u1 \xe9.wav\n")
    (src / "text").write_text("u1 hi\n")
    (src / "utt2spk").write_text("u1 s\n")
    assert P.main(["--src_dir", str(src), "--des_dir", str(tmp_path / "o"), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable utterances" in err[0] and "wav.scp:1: not UTF-8" in err[0]


def test_audio_checks_unit(tmp_path: Path) -> None:
    ok = _wav(tmp_path / "ok.wav", 0.5).read_bytes()
    assert declared_wav_frames(ok) == int(0.5 * SR)
    checked = check_audio(ok, "ok.wav")
    assert not isinstance(checked, str) and checked.notes == [] and checked.sample_rate == SR
    # a header that claims more than the file holds (data size patched up): libsndfile reads it quietly
    patched = bytearray(ok)
    at = patched.find(b"data")
    patched[at + 4:at + 8] = struct.pack("<I", 4 * int(0.5 * SR))
    assert "truncated audio" in check_audio(bytes(patched), "x.wav")
    # a streamed WAV (data size unset) is not "truncated"
    patched[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFFF)
    assert declared_wav_frames(bytes(patched)) is None
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, 1e-4 * np.sin(np.arange(SR // 2) / 5), SR, subtype="FLOAT")
    assert check_audio(quiet.read_bytes(), "quiet.wav") == "silent audio (peak -80 dBFS < -60 dBFS)"
    assert check_audio(b"RIFF\x00\x00garbage" * 3, "c.wav").startswith("undecodable audio")
    # antiphase stereo averages to silence: that is what the model would get
    anti = tmp_path / "anti.wav"
    x = 0.3 * np.sin(np.arange(SR // 2) / 5)
    sf.write(anti, np.stack([x, -x], 1), SR, subtype="FLOAT")
    assert check_audio(anti.read_bytes(), "anti.wav").startswith("silent audio")
