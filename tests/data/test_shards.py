"""Shard schema, atomic writing and tolerant reading."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosytrain.data import shards as S


def _row(i: int, instruct: str | None = None) -> dict:
    row = {"utt": f"u{i}", "wav": f"/x/u{i}.wav", "audio_data": bytes([i, 1, 2]), "text": f"text {i}",
           "spk": f"s{i % 2}", "utt_embedding": [0.5 * i, 1.0, -2.0], "spk_embedding": [1.0, 2.0, 3.0],
           "speech_token": [i, i + 1, 4095]}
    if instruct is not None:
        row["instruct"] = instruct
    return row


def test_schema_matches_upstream_pandas_types(tmp_path):
    path = tmp_path / S.shard_name(0)
    S.write_shard(path, [_row(0), _row(1)])
    schema = pq.read_schema(path)
    # Upstream make_parquet_list.py: pandas object columns of str/bytes/list[float]/list[int].
    expected = {"utt": pa.string(), "wav": pa.string(), "audio_data": pa.binary(), "text": pa.string(),
                "spk": pa.string(), "utt_embedding": pa.list_(pa.float64()),
                "spk_embedding": pa.list_(pa.float64()), "speech_token": pa.list_(pa.int64())}
    assert schema.names == list(S.SHARD_COLUMNS)
    for name, typ in expected.items():
        assert schema.field(name).type.equals(typ, check_metadata=False), name
    assert "instruct" not in schema.names
    assert path.name == "parquet_000000000.tar"


def test_roundtrip_and_instruct_column(tmp_path):
    path = tmp_path / "p.tar"
    rows = [_row(0, "speak slowly"), _row(1, "speak fast")]
    S.write_shard(path, rows)
    assert pq.read_schema(path).field("instruct").type == pa.string()
    back = list(S.read_shard_rows(path))
    assert back == rows
    only = list(S.read_shard_rows(path, columns=["utt", "speech_token", "not_there"]))
    assert only == [{"utt": "u0", "speech_token": [0, 1, 4095]}, {"utt": "u1", "speech_token": [1, 2, 4095]}]


def test_write_is_atomic_no_temp_left(tmp_path):
    S.write_shard(tmp_path / "a.tar", [_row(0)])
    with pytest.raises(ValueError, match="lacks columns"):
        S.write_shard(tmp_path / "b.tar", [{"utt": "x"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]


def test_truncated_and_corrupt_shards_are_skipped_and_counted(tmp_path):
    good = tmp_path / "good.tar"
    S.write_shard(good, [_row(i) for i in range(5)])
    data = good.read_bytes()
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not parquet at all")
    (tmp_path / "data.list").write_text(f"{good}\n{trunc}\njunk.tar\n\n{tmp_path / 'missing.tar'}\n")
    stats = S.ReadStats()
    rows = list(S.iter_rows(tmp_path / "data.list", stats=stats))
    assert [r["utt"] for r in rows] == [f"u{i}" for i in range(5)]
    assert stats.shards_ok == 1 and stats.rows == 5 and stats.shards_bad == 3
    assert {p.split("/")[-1] for p, _ in stats.bad} == {"trunc.tar", "junk.tar", "missing.tar"}
    assert all(reason and "\n" not in reason for _, reason in stats.bad)
    assert S.check_shard(good) is None and S.check_shard(trunc) is not None


def test_read_data_list_missing_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.list")):
        S.read_data_list(tmp_path / "nope.list")


def test_jsons_lists_and_index(tmp_path):
    rows = [_row(i) for i in range(3)]
    shard = str(tmp_path / S.shard_name(0))
    S.write_shard(shard, rows)
    S.write_shard_jsons(tmp_path, 0, shard, rows)
    S.write_lists(tmp_path, [shard], [0])
    assert json.loads((tmp_path / "utt2parquet_000000000.json").read_text()) == {r["utt"]: shard for r in rows}
    assert json.loads((tmp_path / "spk2parquet_000000000.json").read_text()) == {"s0": shard, "s1": shard}
    assert (tmp_path / "data.list").read_text() == shard + "\n"
    assert (tmp_path / "utt2data.list").read_text().strip().endswith("utt2parquet_000000000.json")
    recs = [S.index_record(r, shard, 1.25 + i, 22050) for i, r in enumerate(rows)]
    S.write_index(tmp_path / S.INDEX_NAME, recs)
    back = S.read_index(tmp_path)
    assert back == recs and set(back[0]) == set(S.INDEX_FIELDS)
    assert back[2]["duration_s"] == 3.25 and back[0]["num_speech_tokens"] == 3 and back[0]["num_text_chars"] == 6
