"""Rewriting upstream-layout shards: same rows, small row groups, fact columns the index reads without audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosytrain.data import reshard as R
from cosytrain.data import shard_facts as F
from cosytrain.data import shards as S
from cosytrain.data.dataset import StreamOptions
from cosytrain.data.index import ShardIndex
from cosytrain.data.pipeline import FeatureConfig, FilterConfig
from tests.data.test_pipeline import make_row, write_shard

OPTS = StreamOptions(feat=FeatureConfig(), filt=FilterConfig(speech_token_size=4096))


def test_reshard_keeps_rows_and_lets_the_index_skip_audio(tmp_path: Path, monkeypatch) -> None:
    rows = [make_row(f"u{i:02d}", seconds=0.3 + 0.05 * (i % 7), seed=i) for i in range(23)]
    rows[5] = make_row("u05", audio_data=b"broken")  # kept, and known bad from its facts
    src = [write_shard(tmp_path / "up0.tar", rows[:13], row_group_size=13),  # upstream: one group per shard
           write_shard(tmp_path / "up1.tar", rows[13:], row_group_size=10)]
    (tmp_path / "garbage.tar").write_bytes(b"not parquet")
    (tmp_path / "data.list").write_text("".join(p + "\n" for p in [*src, str(tmp_path / "garbage.tar")]))
    written, failed = R.reshard(str(tmp_path / "data.list"), str(tmp_path / "out"), group=4)
    assert len(written) == 2 and [Path(p).name for p, _ in failed] == ["garbage.tar"]
    assert S.read_data_list(tmp_path / "out" / "data.list") == written
    for old, new in zip(src, written):
        assert list(S.read_shard_rows(old)) == [{k: r[k] for k in r if not k.startswith(F.COLUMN_PREFIX)}
                                               for r in S.read_shard_rows(new)]
        md = pq.ParquetFile(new).metadata
        assert max(md.row_group(i).num_rows for i in range(md.num_row_groups)) == 4
    before = ShardIndex.build(src, OPTS)
    monkeypatch.setattr(F, "audio_facts", lambda data: pytest.fail("audio read to index a resharded shard"))
    after = ShardIndex.build(written, OPTS)
    assert np.array_equal(after.frames_of, before.frames_of) and np.array_equal(after.row_of, before.row_of)
    assert after.skipped == before.skipped == {"undecodable_audio": 1}


def test_cli_names_a_missing_list(tmp_path: Path, capsys) -> None:
    assert R.main(["--data_list", str(tmp_path / "nope.list"), "--des_dir", str(tmp_path / "o")]) == 2
    assert "nope.list" in capsys.readouterr().err
