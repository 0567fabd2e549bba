"""``prepare``: Kaldi/LJSpeech input, validation with reasons, resumability, parallel == serial."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from cosytrain.data import prepare as P
from cosytrain.data import shards as S

SR = 22050
SPEAKERS = {"spkA": (110.0, 1.0), "spkB": (220.0, 0.6), "spkC": (330.0, 0.3)}


def _voice(f0: float, tilt: float, seconds: float, seed: int) -> np.ndarray:
    """A buzzy harmonic tone with a slow random pitch wobble: cheap speaker-like audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    wobble = 1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
    phase = 2 * np.pi * np.cumsum(f0 * wobble) / SR
    x = sum((tilt ** k) * np.sin(k * phase) for k in range(1, 12))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 4) * t) ** 2)
    return (0.3 * x / np.abs(x).max() + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


def make_kaldi_corpus(root, with_bad: bool = True, instruct: bool = False):
    wavs = root / "wavs"
    wavs.mkdir(parents=True)
    scp, text, u2s, ins = [], [], [], []
    k = 0
    for spk, (f0, tilt) in SPEAKERS.items():
        for j in range(4):
            utt = f"{spk}_{j}"
            path = wavs / f"{utt}.wav"
            sf.write(path, _voice(f0, tilt, 0.8 + 0.3 * j, k), SR, subtype="PCM_16")
            scp.append(f"{utt} {path}")
            text.append(f"{utt} sentence number {k} from {spk}")
            u2s.append(f"{utt} {spk}")
            ins.append(f"{utt} speak like speaker {spk}")
            k += 1
    if with_bad:
        (wavs / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
        sf.write(wavs / "short.wav", _voice(200, 0.5, 0.1, 99), SR)
        nan = _voice(200, 0.5, 1.0, 98)
        nan[100] = np.nan
        sf.write(wavs / "nan.wav", nan, SR, subtype="FLOAT")
        sf.write(wavs / "notext.wav", _voice(200, 0.5, 1.0, 97), SR)
        bad = {"bad_corrupt": "corrupt.wav", "bad_short": "short.wav", "bad_nan": "nan.wav",
               "bad_notext": "notext.wav", "bad_missing": "missing.wav"}
        for utt, name in bad.items():
            scp.append(f"{utt} wavs/{name}")  # relative path: resolved against the folder
            text.append(utt if utt == "bad_notext" else f"{utt} some words")
            u2s.append(f"{utt} spkA")
            ins.append(f"{utt} x")
    (root / "wav.scp").write_text("\n".join(scp) + "\n")
    (root / "text").write_text("\n".join(text) + "\n")
    (root / "utt2spk").write_text("\n".join(u2s) + "\n")
    if instruct:
        (root / "instruct").write_text("\n".join(ins) + "\n")
    return root


def _args(src, des, *extra):
    return ["--src_dir", str(src), "--des_dir", str(des), "--num_utts_per_parquet", "5", "--codebook_size", "16",
            "--no_progress", *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = make_kaldi_corpus(root / "src")
    des = root / "out"
    return src, des


def test_prepare_kaldi_builtin(prepared, capsys):
    src, des = prepared
    assert P.main(_args(src, des)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "12 utterances in 4 shards" in out[0] and "5 skipped" in out[0]

    skipped = dict(line.split("\t") for line in (des / "skipped.tsv").read_text().splitlines()[1:])
    assert set(skipped) == {"bad_corrupt", "bad_short", "bad_nan", "bad_notext", "bad_missing"}
    assert "undecodable" in skipped["bad_corrupt"] and "too short" in skipped["bad_short"]
    assert "NaN" in skipped["bad_nan"] and skipped["bad_notext"] == "empty text"
    assert "not found" in skipped["bad_missing"]

    shard_paths = S.read_data_list(des / "data.list")
    assert [os.path.basename(p) for p in shard_paths] == [S.shard_name(i) for i in range(4)]
    rows = [r for p in shard_paths for r in S.read_shard_rows(p)]
    assert len(rows) == 12 and "instruct" not in rows[0]
    index = {r["utt"]: r for r in S.read_index(des)}
    for r in rows:
        audio, sr = sf.read(r["wav"], dtype="float32")
        assert r["audio_data"] == open(r["wav"], "rb").read()  # original file bytes, as upstream
        assert len(r["utt_embedding"]) == 192 and len(r["spk_embedding"]) == 192
        # Built-in tokenizer at 50 Hz: one token per two whisper frames of the 16 kHz audio.
        n16 = math.ceil(len(audio) * 16000 / sr)
        assert abs(len(r["speech_token"]) - math.ceil((n16 // 160) / 2)) <= 1
        assert all(0 <= t < 16 for t in r["speech_token"])
        assert index[r["utt"]]["duration_s"] == pytest.approx(len(audio) / sr, abs=1e-3)
        assert index[r["utt"]]["num_speech_tokens"] == len(r["speech_token"])
    # spk_embedding is the speaker mean of utterance embeddings (upstream's spk2embedding).
    spk2emb = torch.load(des / "spk2embedding.pt", weights_only=True)
    for spk in SPEAKERS:
        embs = np.array([r["utt_embedding"] for r in rows if r["spk"] == spk])
        np.testing.assert_allclose(spk2emb[spk], embs.mean(0), rtol=1e-6, atol=1e-6)
        for r in rows:
            if r["spk"] == spk:
                np.testing.assert_allclose(r["spk_embedding"], spk2emb[spk])
    # The stand-in embedding separates the three synthetic speakers.
    x = torch.tensor([r["utt_embedding"] for r in rows])
    cent = torch.tensor([spk2emb[s] for s in SPEAKERS])
    pred = torch.cdist(x, cent).argmin(1)
    truth = torch.tensor([list(SPEAKERS).index(r["spk"]) for r in rows])
    assert (pred == truth).float().mean() >= 0.9


def test_resume_skips_finished_shards_and_redoes_broken_one(prepared):
    src, des = prepared
    if not (des / "data.list").exists():
        P.main(_args(src, des))
    shards = S.read_data_list(des / "data.list")
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in shards}
    cfg = P.PrepareConfig(src_dir=str(src), des_dir=str(des), num_utts_per_parquet=5, codebook_size=16,
                          progress=False)
    again = P.prepare(cfg)
    assert again.reused_shards == 4 and again.num_rows == 12 and len(again.skipped) == 5
    assert {p: os.stat(p).st_mtime_ns for p in shards} == {p: v[0] for p, v in before.items()}
    # Truncate one finished shard: only that one is written again, with the same content.
    victim = shards[1]
    with open(victim, "r+b") as f:
        f.truncate(100)
    third = P.prepare(cfg)
    assert third.reused_shards == 3
    assert open(victim, "rb").read() == before[victim][1]
    assert os.stat(shards[0]).st_mtime_ns == before[shards[0]][0]


def test_parallel_workers_match_serial_and_instruct(tmp_path, prepared):
    src, des = prepared
    if not (des / "data.list").exists():
        P.main(_args(src, des))
    src2 = make_kaldi_corpus(tmp_path / "src2", with_bad=False, instruct=True)
    # Reuse the serial run's fitted front-ends so both runs tokenise with the same model.
    extra = ["--speech_tokenizer", str(des / P.BUILTIN_TOKENIZER_FILE),
             "--campplus", str(des / P.BUILTIN_EMBEDDING_FILE)]
    assert P.main(_args(src2, tmp_path / "w1", *extra)) == 0
    assert P.main(_args(src2, tmp_path / "w2", "--num_workers", "2", *extra)) == 0
    rows1 = list(S.iter_rows(tmp_path / "w1" / "data.list"))
    rows2 = list(S.iter_rows(tmp_path / "w2" / "data.list"))
    assert rows1 == rows2 and len(rows1) == 12
    assert rows1[0]["instruct"] == "speak like speaker spkA"
    # Same tokenizer file, same audio: the tokens equal those of the first corpus.
    first = {r["utt"]: r["speech_token"] for r in S.iter_rows(des / "data.list")}
    assert all(first[r["utt"]] == r["speech_token"] for r in rows1)


def test_ljspeech_folder(tmp_path):
    src = tmp_path / "LJSpeechMini"
    (src / "wavs").mkdir(parents=True)
    lines = []
    for i in range(3):
        sf.write(src / "wavs" / f"LJ001-{i:04d}.wav", _voice(150 + 20 * i, 0.5, 0.7, i), SR, subtype="PCM_16")
        norm = "" if i == 1 else f"normalised {i}"
        lines.append(f"LJ001-{i:04d}|Raw text {i}|{norm}")
    (src / "metadata.csv").write_text("\n".join(lines) + "\n")
    cfg = P.PrepareConfig(src_dir=str(src), des_dir=str(tmp_path / "out"), codebook_size=8, progress=False,
                          token_rate=25)
    res = P.prepare(cfg)
    rows = list(S.iter_rows(res.data_list))
    assert [r["text"] for r in rows] == ["normalised 0", "Raw text 1", "normalised 2"]
    assert {r["spk"] for r in rows} == {"LJSpeechMini"}
    for r in rows:  # 25 Hz: one token per four whisper frames
        audio, sr = sf.read(r["wav"])
        assert abs(len(r["speech_token"]) - math.ceil(len(audio) * 16000 / sr / 160 / 4)) <= 1


def test_bad_inputs_give_one_line_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "does_not_exist"
    assert P.main(["--src_dir", str(missing), "--des_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert P.main(["--src_dir", str(empty), "--des_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty / "wav.scp") in err[0]

    (empty / "wav.scp").write_text("u1 /x.wav\n")
    assert P.main(["--src_dir", str(empty), "--des_dir", str(tmp_path / "o"), "--format", "kaldi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty / "text") in err[0]

    src = make_kaldi_corpus(tmp_path / "ok", with_bad=False)
    assert P.main(_args(src, tmp_path / "o", "--speech_tokenizer", str(tmp_path / "nope.onnx"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.onnx" in err[0]
