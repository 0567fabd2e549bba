"""The shard index: facts without audio, vectorised checks equal to the scalar ones, cache, shared work."""

from __future__ import annotations

import io
import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from cosytrain.data import index_build as B
from cosytrain.data import pipeline as P
from cosytrain.data import shard_facts as F
from cosytrain.data import shards as S
from cosytrain.data.dataset import StreamOptions, read_data_list
from cosytrain.data.index import REASONS, ShardIndex, check_reasons, planned_frames
from cosytrain.data.pipeline import FeatureConfig, FilterConfig
from tests.data.test_pipeline import SR, make_row, wav_bytes, write_corpus, write_shard

OPTS = StreamOptions(feat=FeatureConfig(), filt=FilterConfig(speech_token_size=4096), shuffle_size=8, sort_size=4,
                     max_frames_in_batch=250, seed=5)


def _flac(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * SR), np.float32) + 0.1, SR, format="FLAC")
    return buf.getvalue()


NAN = np.full(SR // 2, np.nan, dtype=np.float32)
VARIED_ROWS = [
    make_row("ok"), make_row("long", seconds=1.3), make_row("garbage", audio_data=b"not a wav"),
    make_row("truncated", audio_data=wav_bytes(0.5)[:30]), make_row("half", audio_data=wav_bytes(0.8)[:9000]),
    make_row("header_only", audio_data=wav_bytes(0.5)[:44]),
    make_row("nan", audio_data=wav_bytes(0.5, samples=NAN, subtype="FLOAT")),
    make_row("float_ok", audio_data=wav_bytes(0.4, subtype="FLOAT")), make_row("flac", audio_data=_flac(0.6)),
    make_row("stereo", audio_data=wav_bytes(0.5, channels=2)), make_row("blank", text="  "),
    make_row("range", speech_token=[1, 2, 4096]), make_row("negative", speech_token=[1, -3, 2]),
    make_row("no_tokens", speech_token=[]), make_row("short_emb", emb_dim=191),
    make_row("nan_emb", utt_embedding=[float("nan")] * 192), make_row("inf_spk", spk_embedding=[float("inf")] * 192),
    make_row("low_rate", sr=8000), make_row("rate_24k", sr=24000, seconds=0.7), make_row("tiny", seconds=0.02),
    make_row("chatty", text="x" * 300), make_row("unicode", text="héllo wörld ✓"),
]


def _scalar_facts(rows: list[dict]) -> list[dict]:
    return [P.row_facts(r) for r in rows]


@pytest.mark.parametrize("audio", ["arrow", "pages"])
def test_scanned_facts_equal_row_facts(tmp_path: Path, monkeypatch, audio: str) -> None:
    path = write_shard(tmp_path / "s.parquet", VARIED_ROWS, row_group_size=5)
    streamed = []
    if audio == "pages":  # every group's audio streamed page by page (data/parquet_pages), however small
        monkeypatch.setattr(F, "STREAM_MIN_BYTES", 0)
        real = F.stream_values
        monkeypatch.setattr(F, "stream_values", lambda *a: streamed.append(a[2]) or real(*a))
    got = B.read_shard_facts(path, batch_rows=7)
    assert streamed == ([0, 1, 2, 3, 4] if audio == "pages" else [])
    assert got.error is None and not got.from_columns and list(got.row_groups) == [5, 5, 5, 5, 2]
    for rec, want, text in zip(got.facts, _scalar_facts(VARIED_ROWS), got.texts):
        for key in ("num_samples", "sample_rate", "speech_token_len", "speech_token_min", "speech_token_max",
                    "utt_embedding_dim", "utt_embedding_finite", "spk_embedding_dim", "spk_embedding_finite"):
            assert rec[key] == want[key], (want["utt"], key)
        assert F.AUDIO_ERRORS[rec["audio_error"]] == want["audio_error"], want["utt"]
        assert text == want["text"] and bool(rec["text_blank"]) == (not want["text"].strip())


def test_unusual_column_types_take_the_per_row_path(tmp_path: Path) -> None:
    rows = [make_row("a", speech_token=[3, 4, 5]), make_row("b", speech_token=[7, 8])]
    schema = pa.schema([("utt", pa.string()), ("audio_data", pa.binary()), ("text", pa.string()),
                        ("utt_embedding", pa.list_(pa.float32())), ("spk_embedding", pa.list_(pa.float64())),
                        ("speech_token", pa.list_(pa.int32()))])
    table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    pq.write_table(table, tmp_path / "odd.parquet")
    rows[0]["speech_token"] = [1, None, 2]  # a null inside a list: row_facts says bad_speech_token
    table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    pq.write_table(table, tmp_path / "nulls.parquet")
    odd = B.read_shard_facts(str(tmp_path / "odd.parquet"))
    assert list(odd.facts["speech_token_len"]) == [3, 2] and list(odd.facts["utt_embedding_dim"]) == [192, 192]
    nulls = B.read_shard_facts(str(tmp_path / "nulls.parquet"))
    assert list(nulls.facts["speech_token_len"]) == [-1, 2]
    assert P.row_facts(rows[0])["speech_token_len"] == -1


FEATS = [FeatureConfig(), FeatureConfig(sample_rate=24000, n_fft=1920, hop_size=480, win_size=1920, num_frames=960,
                                        token_mel_ratio=2),
         FeatureConfig(vocoder=True, truncate_length=256 * 20), FeatureConfig(center=True, min_sample_rate=8000)]
FILTS = [FilterConfig(speech_token_size=4096), FilterConfig(min_length=30, max_length=80, token_max_length=50),
         FilterConfig(speech_token_size=10, min_output_input_ratio=0.2, max_output_input_ratio=0.5, embedding_dim=191)]


@pytest.mark.parametrize("feat", FEATS)
@pytest.mark.parametrize("filt", FILTS)
def test_vectorised_checks_equal_check_facts(feat: FeatureConfig, filt: FilterConfig) -> None:
    scalar = _scalar_facts(VARIED_ROWS)
    rng = np.random.default_rng(0)
    for _ in range(60):  # random lengths, rates and token lists around every threshold
        n = int(rng.integers(0, 3 * 22050))
        toks = rng.integers(-2, 5000, size=int(rng.integers(0, 40))).tolist()
        scalar.append({"utt": "r", "audio_error": None, "num_samples": n,
                       "sample_rate": int(rng.choice([8000, 16000, 22050, 24000, 44100])),
                       "text": "x" * int(rng.integers(0, 80)), "speech_token_len": len(toks),
                       "speech_token_min": min(toks, default=0), "speech_token_max": max(toks, default=0),
                       "utt_embedding_dim": 192, "utt_embedding_finite": True, "spk_embedding_dim": 192,
                       "spk_embedding_finite": True})
    facts = np.zeros(len(scalar), F.FACT_DTYPE)
    for rec, d in zip(facts, scalar):
        for key in F.FACT_DTYPE.names:
            if key == "audio_error":
                rec[key] = F.AUDIO_ERRORS.index(d["audio_error"])
            elif key == "text_blank":
                rec[key] = not d["text"].strip()
            else:
                rec[key] = d[key]
    text_len = np.asarray([len(d["text"].encode()) for d in scalar])
    codes = check_reasons(facts, text_len, filt, feat)
    frames = planned_frames(facts, feat)
    for d, code, fr, tl in zip(scalar, codes, frames, text_len):
        want = P.check_facts(d, int(tl), filt, feat)
        assert REASONS[code] == want, d
        if want is None:
            assert fr == P.expected_feat_frames(d, feat)
    assert len(set(codes.tolist())) > 4  # the grid reaches many reasons, not just "usable"


def test_prepare_shards_are_indexed_from_columns_without_audio(tmp_path: Path, monkeypatch) -> None:
    rows = [make_row(f"u{i}", seconds=0.3 + 0.1 * i) for i in range(6)]
    for r in rows:
        wav, sr = sf.read(io.BytesIO(r["audio_data"]))
        r.update(num_samples=len(wav), sample_rate=sr)
    with_cols = tmp_path / "prepared.tar"
    S.write_shard(with_cols, rows)
    schema = pq.read_schema(with_cols)
    # upstream's columns and types unchanged; the additions are scalar columns under one prefix
    assert schema.names[:len(S.SHARD_COLUMNS)] == list(S.SHARD_COLUMNS)
    extra = [f for f in schema if f.name not in S.SHARD_COLUMNS]
    assert [f.name for f in extra] == list(F.FACT_COLUMNS)
    assert all(not pa.types.is_nested(f.type) for f in extra)
    plain = write_shard(tmp_path / "plain.parquet", rows)  # the same rows without the columns (upstream's tools)
    scanned = ShardIndex.build([plain], OPTS)
    monkeypatch.setattr(F, "audio_facts", lambda data: pytest.fail("audio was read to plan batches"))
    from_cols = ShardIndex.build([str(with_cols)], OPTS)
    assert B.read_shard_facts(str(with_cols)).from_columns
    assert np.array_equal(from_cols.frames_of, scanned.frames_of) and np.array_equal(from_cols.row_of, scanned.row_of)


def test_second_launch_reads_only_the_cache_and_a_new_tokenizer_only_the_texts(tmp_path: Path, monkeypatch) -> None:
    data_list, _ = write_corpus(tmp_path / "c", sizes=[3, 2])
    shards = read_data_list(data_list)
    cache = tmp_path / "cache"
    first = ShardIndex.build(shards, OPTS, cache_dir=str(cache))
    assert len(list(cache.glob("*.facts.npz"))) == 2 and len(list(cache.glob("*.text-*.npy"))) == 2
    assert not list(cache.glob("*.claim")) and sorted(first.stats.indexed) == [0, 1]
    real_read = B.read_shard_facts
    monkeypatch.setattr(B, "read_shard_facts", lambda path, **kw: pytest.fail(f"{path} read again"))
    monkeypatch.setattr(B, "_read_texts", lambda path: pytest.fail(f"{path} texts read again"))
    real_load = B.load_cached
    monkeypatch.setattr(B, "load_cached", lambda *a: pytest.fail("per-shard files read: the whole index is cached"))
    second = ShardIndex.build(shards, OPTS, cache_dir=str(cache))
    assert second.fingerprint() == first.fingerprint() and second.stats.loaded == 2 and not second.stats.indexed
    assert second.skipped == first.skipped and second.total_rows == first.total_rows
    assert [list(a) for a in second.row_group_starts] == [list(a) for a in first.row_group_starts]
    monkeypatch.setattr(B, "load_cached", real_load)
    # other options (here the frame budget's mel hop): the per-shard facts are reused, no shard is read
    import dataclasses

    other = dataclasses.replace(OPTS, feat=FeatureConfig(hop_size=240))
    assert not ShardIndex.build(shards, other, cache_dir=str(cache)).stats.indexed
    # another tokenizer identity: the facts come from the cache, only the texts are read and counted
    monkeypatch.setattr(B, "_read_texts", lambda path: [t for t in real_read(path).texts])
    monkeypatch.setattr(B, "tokenizer_identity", lambda kind, path: "another-vocab")
    third = ShardIndex.build(shards, OPTS, cache_dir=str(cache))
    assert third.fingerprint() == first.fingerprint() and len(list(cache.glob("*.text-*.npy"))) == 4
    # a shard rewritten in place gets a new key: it is indexed again
    write_shard(Path(shards[1]), [make_row("new", seconds=0.9)])
    monkeypatch.setattr(B, "read_shard_facts", real_read)
    fourth = ShardIndex.build(shards, OPTS, cache_dir=str(cache))
    assert fourth.stats.indexed == [1] and len(fourth) == 4


def test_tokenizer_identity_follows_the_vocabulary_files(tmp_path: Path) -> None:
    folder = tmp_path / "blanken"
    folder.mkdir()
    (folder / "vocab.json").write_text('{"a": 0}')
    (folder / "model.safetensors").write_bytes(b"weights are not part of it")
    first = B.tokenizer_identity("qwen", str(folder))
    (folder / "model.safetensors").write_bytes(b"changed")
    assert B.tokenizer_identity("qwen", str(folder)) == first
    (folder / "vocab.json").write_text('{"a": 1}')
    assert B.tokenizer_identity("qwen", str(folder)) != first
    assert B.tokenizer_identity("qwen3", str(folder)) != B.tokenizer_identity("qwen", str(folder))
    assert B.text_token_lengths("byte", None, ["ab", "", "é"]).tolist() == [2, 0, 2]


def test_tokenizer_identity_follows_a_revision_of_the_output_in_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from cosytrain.data import text_tokenizer

    before = {kind: B.tokenizer_identity(kind, None) for kind in ("byte", "phone")}
    monkeypatch.setitem(text_tokenizer.OUTPUT_REVISIONS, "byte", "|v2")
    assert B.tokenizer_identity("byte", None) != before["byte"]  # cached lengths of the old output are not reused
    assert B.tokenizer_identity("phone", None) == before["phone"]  # the other kinds keep theirs


def test_two_ranks_share_the_first_launch_without_duplicates(tmp_path: Path) -> None:
    data_list, _ = write_corpus(tmp_path / "c", sizes=[3, 2, 4, 1, 2, 3, 2])
    shards = read_data_list(data_list)
    cache = str(tmp_path / "cache")
    results: dict[int, ShardIndex] = {}
    start = threading.Barrier(2)

    def rank(r: int) -> None:
        start.wait()
        results[r] = ShardIndex.build(shards, OPTS, cache_dir=cache, rank=r, world_size=2)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [set(results[r].stats.indexed) for r in range(2)]
    assert not done[0] & done[1] and done[0] | done[1] == set(range(len(shards)))
    assert {0, 2, 4, 6} & done[0] and {1, 3, 5} & done[1]  # each rank starts with its own shards
    assert results[0].fingerprint() == results[1].fingerprint() == ShardIndex.build(shards, OPTS).fingerprint()


def test_a_dead_ranks_claim_is_taken_over(tmp_path: Path) -> None:
    data_list, _ = write_corpus(tmp_path / "c", sizes=[2, 2])
    shards = read_data_list(data_list)
    cache = tmp_path / "cache"
    cache.mkdir()
    tok_id = B.tokenizer_identity("byte", None)
    import socket

    pid = 2 ** 22 + 12345  # above the default pid_max: never alive
    claim = B._claim_file(cache, B.shard_key(shards[1]), tok_id)
    claim.write_text(f"{socket.gethostname()} {pid}\n")
    index = ShardIndex.build(shards, OPTS, cache_dir=str(cache), rank=0, world_size=2)
    assert index.stats.taken_over == 1 and sorted(index.stats.indexed) == [0, 1] and not claim.exists()


def test_parallel_processes_give_the_same_index(tmp_path: Path) -> None:
    data_list, _ = write_corpus(tmp_path / "c", sizes=[3, 2, 4, 1, 2])
    shards = read_data_list(data_list)
    serial = ShardIndex.build(shards, OPTS, cache_dir=str(tmp_path / "serial"))
    parallel = ShardIndex.build(shards, OPTS, cache_dir=str(tmp_path / "parallel"), workers=2)
    assert parallel.fingerprint() == serial.fingerprint() and sorted(parallel.stats.indexed) == list(range(5))


def test_index_arrays_are_compact(tmp_path: Path) -> None:
    data_list, utts = write_corpus(tmp_path / "c", sizes=[5, 6])
    index = ShardIndex.build(read_data_list(data_list), OPTS)
    assert len(index) == len(utts)
    assert index.shard_of.dtype == index.row_of.dtype == index.frames_of.dtype == np.int32
    assert index.nbytes() <= 12 * len(index) + 16 * len(index.shards) + 64
    assert list(index.rows_per_shard()) == [5, 6]


def test_missing_shard_is_counted_not_cached(tmp_path: Path) -> None:
    good = write_shard(tmp_path / "a.parquet", [make_row("a")])
    index = ShardIndex.build([good, str(tmp_path / "gone.parquet")], OPTS, cache_dir=str(tmp_path / "cache"))
    assert index.skipped == Counter({"corrupt_shard": 1}) and len(index) == 1
    assert len(list((tmp_path / "cache").glob("*.facts.npz"))) == 1
    assert os.listdir(tmp_path / "cache")


def test_batched_text_lengths_equal_encode_for_every_tokenizer_kind(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cosytrain.data.text_tokenizer import ByteTokenizer, QwenTokenizer

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ,.!?'<>|[]_")}
    vocab.update({"th": len(vocab), "he": len(vocab) + 1, "<unk>": len(vocab) + 2})
    bpe = Tokenizer(models.BPE(vocab, [("t", "h"), ("h", "e")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(tmp_path / "blanken")
    texts = ["the theme", "", "hello, world!", "[breath] then <|endofprompt|> more", "x" * 300, "é"]
    for tok in (ByteTokenizer(), QwenTokenizer(str(tmp_path / "blanken")),
                QwenTokenizer(str(tmp_path / "blanken"), version="cosyvoice3")):
        assert tok.encode_lengths(texts) == [len(tok.encode(t)) for t in texts]
    assert B.text_token_lengths("qwen", str(tmp_path / "blanken"), texts).tolist() == (
        [len(QwenTokenizer(str(tmp_path / "blanken")).encode(t)) if t else 0 for t in texts])


def test_a_reused_pid_does_not_keep_a_claim_alive(tmp_path: Path) -> None:
    import socket

    claim = tmp_path / "x.claim"
    assert B._try_claim(claim) and not B._claim_is_stale(claim)  # ours: alive
    claim.write_text(f"{socket.gethostname()} {os.getpid()} 1\n")  # our pid, but another start time
    assert B._claim_is_stale(claim)
    claim.write_text(f"another-host {os.getpid()} 1\n")  # another host: only its age counts
    assert not B._claim_is_stale(claim)
    os.utime(claim, (0, 0))
    assert B._claim_is_stale(claim)
