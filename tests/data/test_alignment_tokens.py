"""Speech tokens from a phone alignment (CTM): labels per frame, ids, bad files, and ``prepare`` with one."""

from __future__ import annotations

import os

import pytest
import soundfile as sf
import torch

from cosytrain.data import prepare as P
from cosytrain.data import shards as S
from cosytrain.data.alignment_tokens import (SILENCE, AlignmentError, AlignmentSpeechTokenizer, frame_labels,
                                             num_tokens, read_ctm, write_ctm)
from cosytrain.data.speech_tokenizer import BuiltinSpeechTokenizer, load_speech_tokenizer
from tests.data.test_prepare import make_kaldi_corpus


def test_frame_labels_follow_phones_and_halves():
    segments = [(0.0, 0.11, "a"), (0.11, 0.2, "b"), (0.295, 0.375, "c")]  # no edge on a frame centre
    labels = frame_labels(segments, 20, token_rate=50)  # frame centres 0.01, 0.03, ..., 0.39 s
    assert labels[:5] == [("a", 0), ("a", 0), ("a", 0), ("a", 1), ("a", 1)]
    assert labels[5:10] == [("b", 0), ("b", 0), ("b", 0), ("b", 1), ("b", 1)]
    assert labels[10:15] == [(SILENCE, 0)] * 5  # the gap 0.2-0.295 s
    assert labels[15:19] == [("c", 0), ("c", 0), ("c", 1), ("c", 1)]
    assert labels[19:] == [(SILENCE, 0)]  # after the last phone
    assert [p for p, _ in frame_labels(segments, 10, token_rate=25)] == ["a", "a", "a", "b", "b", SILENCE,
                                                                         SILENCE, "c", "c", SILENCE]


def test_ctm_round_trip_ids_and_coverage(tmp_path):
    table = {"u2": [(0.0, 0.05, "z"), (0.05, 0.5, "b")], "u1": [(0.0, 0.095, "a")]}
    write_ctm(tmp_path / "p.ctm", table)
    back = read_ctm(tmp_path / "p.ctm")
    assert {u: [(round(s, 6), round(e, 6), p) for s, e, p in v] for u, v in back.items()} == table
    tok = AlignmentSpeechTokenizer.load(tmp_path / "p.ctm", token_rate=50)
    assert tok.phones == sorted(["a", "b", "z", SILENCE]) and tok.codebook_size == 8
    ids = tok.tokens("u1", 3200)  # 0.2 s at 16 kHz -> 10 tokens: "a" (halves at 0.0475 s), then silence
    a, sil = tok.phones.index("a") * 2, tok.phones.index(SILENCE) * 2
    assert ids == [a, a, a + 1, a + 1, a + 1] + [sil] * 5
    assert len(ids) == num_tokens(3200, 50) == 10
    assert tok.tokens("not_there", 3200) is None
    with pytest.raises(AlignmentError, match="utterance ids"):
        tok.tokenize_batch([])


def test_bad_ctm_files_name_the_line_and_the_fix(tmp_path):
    bad = tmp_path / "bad.ctm"
    bad.write_text(";; a comment\nu1 1 0.0 0.1 a\nu1 1 zero 0.1 b\n")
    with pytest.raises(AlignmentError, match=r"bad.ctm:3: expected 'utt channel start duration phone'"):
        read_ctm(bad)
    bad.write_text("u1 1 0.0 -0.1 a\n")
    with pytest.raises(AlignmentError, match=r"bad.ctm:1: start and duration must be finite"):
        read_ctm(bad)
    bad.write_bytes(b"u1 1 0.0 0.1 \xff\xfe\n")
    with pytest.raises(AlignmentError, match="not UTF-8"):
        read_ctm(bad)
    bad.write_text(";; only comments\n")
    with pytest.raises(AlignmentError, match="no alignment lines"):
        AlignmentSpeechTokenizer.load(bad, 50)
    with pytest.raises(FileNotFoundError, match="missing.ctm"):
        load_speech_tokenizer(tmp_path / "missing.ctm", token_rate=50)
    with pytest.raises(ValueError, match="token rate"):
        load_speech_tokenizer(bad, token_rate=None)


def test_alignment_frames_are_the_speech_tokenizers_frames():
    from cosytrain.data import alignment_tokens, speech_tokenizer

    assert alignment_tokens.HOP == speech_tokenizer.HOP  # one token count per utterance, whichever tokenizes it


def test_prepare_takes_tokens_from_an_alignment(tmp_path):
    src = make_kaldi_corpus(tmp_path / "src", with_bad=False)
    utts = [line.split()[0] for line in (src / "wav.scp").read_text().splitlines()]
    lengths = {u: sf.info(str(src / "wavs" / f"{u}.wav")).duration for u in utts}
    # every utterance but the last aligned: two phones, then nothing
    table = {u: [(0.0, 0.2, f"p{i % 3}"), (0.2, 0.5, "q")] for i, u in enumerate(utts[:-1])}
    write_ctm(src / "phones.ctm", table)
    des = tmp_path / "out"
    argv = ["--src_dir", str(src), "--des_dir", str(des), "--speech_tokenizer", str(src / "phones.ctm"),
            "--no_progress"]
    assert P.main(argv) == 0
    tok = AlignmentSpeechTokenizer.load(src / "phones.ctm", 50)
    rows = {r["utt"]: r["speech_token"] for r in S.iter_rows(des / "data.list", columns=["utt", "speech_token"])}
    assert sorted(rows) == sorted(utts[:-1])
    for u, tokens in rows.items():
        assert abs(len(tokens) - 50 * lengths[u]) <= 1
        assert tokens[:10] == [tok.phones.index(table[u][0][2]) * 2 + (k >= 5) for k in range(10)]
        assert set(tokens[25:]) == {tok.phones.index(SILENCE) * 2}
    # beside the shards, a tokenizer for new audio that speaks the alignment's ids (zero-shot prompts)
    fitted = BuiltinSpeechTokenizer.load(des / P.BUILTIN_TOKENIZER_FILE)
    assert fitted.token_rate == 50 and fitted.codebook_size == tok.codebook_size
    skipped = (des / P.SKIPPED).read_text()
    assert f"{utts[-1]}\tnot in the alignment phones.ctm" in skipped
    # the same alignment at 25 Hz into the same folder is a new set of tokens, not a reused shard
    assert P.main(argv + ["--token_rate", "25"]) == 0
    rows25 = {r["utt"]: r["speech_token"] for r in S.iter_rows(des / "data.list", columns=["utt", "speech_token"])}
    assert all(abs(len(rows25[u]) - 25 * lengths[u]) <= 1 for u in rows25)
    assert BuiltinSpeechTokenizer.load(des / P.BUILTIN_TOKENIZER_FILE).token_rate == 25  # refitted for the rate
    # another alignment with an OLDER file time (a copy with its times kept, a checkout) still refits: by digest
    fitted_path = des / P.BUILTIN_TOKENIZER_FILE
    before = fitted_path.read_bytes()
    assert P.main(argv + ["--token_rate", "25"]) == 0
    assert fitted_path.read_bytes() == before  # same alignment and rate: the fit is reused
    table[utts[0]] = [(0.0, 0.4, "p2"), (0.4, 0.5, "q")]
    write_ctm(src / "phones.ctm", table)
    os.utime(src / "phones.ctm", ns=(1, 1))
    assert P.main(argv + ["--token_rate", "25"]) == 0
    assert fitted_path.read_bytes() != before


def test_nearest_class_mean_tokenizer_gives_the_labels_ids():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 128, generator=g) * 3
    frames = torch.cat([centres[0] + 0.1 * torch.randn(50, 128, generator=g),
                        centres[1] + 0.1 * torch.randn(50, 128, generator=g)])
    labels = torch.tensor([3] * 50 + [0] * 50)
    tok = BuiltinSpeechTokenizer.fit_labelled(frames, labels, token_rate=50, codebook_size=6)
    assert tok.codebook_size == 6
    new = torch.cat([centres[1] + 0.1 * torch.randn(5, 128, generator=g),
                     centres[0] + 0.1 * torch.randn(5, 128, generator=g)])
    assert tok.tokenize_frames(new) == [0] * 5 + [3] * 5  # ids 1, 2, 4, 5 were never labelled: never chosen
