"""The byte-bounded row reader and the numpy epoch plan against upstream's stage semantics."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosytrain.data import pipeline as P
from cosytrain.data.plan import batch_bounds, window_shuffle, window_sort
from cosytrain.data.row_reader import RowReader, row_nbytes
from tests.data.test_pipeline import make_row, write_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[int, tuple[list[str], list[list[dict]]]]:
    """The same 3 shards (40, 25, 33 rows of 0.1-0.5 s) written with 1000-row and with 8-row groups."""
    root = tmp_path_factory.mktemp("reader")
    rows = [[make_row(f"s{s}r{r}", seconds=0.1 + 0.1 * ((r * 7 + s) % 5), seed=r + 100 * s) for r in range(n)]
            for s, n in enumerate([40, 25, 33])]
    out = {}
    for group in (1000, 8):
        paths = [write_shard(root / f"g{group}_{s}.parquet", rs, row_group_size=group) for s, rs in enumerate(rows)]
        out[group] = (paths, rows)
    return out


def _reader(paths: list[str], demand: list[list[tuple[int, int]]], budget: int, stream: bool = False) -> RowReader:
    starts = []
    for p in paths:
        md = pq.ParquetFile(p).metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        starts.append(np.cumsum([0] + sizes)[:-1])
    rows = np.asarray([pq.ParquetFile(p).metadata.num_rows for p in paths])
    flat = [(s, r, pos) for pos, refs in enumerate(demand) for s, r in refs]
    arrays = tuple(np.asarray([f[k] for f in flat]) for k in range(3))
    reader = RowReader(paths, starts, rows, arrays, budget)  # type: ignore[arg-type]
    if stream:  # stream every group's audio page by page (parquet_pages), however small
        reader.stream_min_bytes = 0
    return reader


def _demand(rows: list[list[dict]], seed: int) -> list[list[tuple[int, int]]]:
    refs = [(s, r) for s, rs in enumerate(rows) for r in range(len(rs))]
    rng = random.Random(seed)
    rng.shuffle(refs)
    refs += refs[:10]  # padded batches reuse rows later in the epoch
    return [refs[i:i + 6] for i in range(0, len(refs), 6)]


@pytest.mark.parametrize("stream", [False, True], ids=["arrow", "pages"])
@pytest.mark.parametrize("group", [1000, 8])
@pytest.mark.parametrize("budget_rows", [1, 12, 1000])
def test_rows_are_exact_and_memory_stays_in_budget(shards, group: int, budget_rows: int, stream: bool) -> None:
    paths, rows = shards[group]
    biggest = max(row_nbytes({k: v for k, v in r.items()}) for rs in rows for r in rs)
    budget = budget_rows * biggest
    demand = _demand(rows, seed=group + budget_rows)
    reader = _reader(paths, demand, budget, stream)
    for pos, refs in enumerate(demand):
        got = reader.get_batch(refs, pos)
        for (s, r), row in zip(refs, got):
            want = rows[s][r]
            assert row["utt"] == want["utt"] and row["audio_data"] == want["audio_data"] and row["text"] == want["text"]
            assert row["speech_token"].tolist() == want["speech_token"]
            np.testing.assert_array_equal(row["utt_embedding"], want["utt_embedding"])
            assert "wav" not in row and "spk" not in row  # only the columns training reads
        assert reader.bytes <= max(budget, 2 * biggest)
    assert reader.peak_bytes <= max(budget, 2 * biggest) and reader.bytes == 0  # nothing left after the epoch
    assert (reader.page_streams == reader.group_reads) if stream else reader.page_streams == 0
    if budget_rows == 1000:  # enough room: every row group is read once
        n_groups = sum(-(-len(rs) // group) for rs in rows)
        assert reader.group_reads == n_groups


def test_a_small_budget_only_costs_rereads(shards) -> None:
    paths, rows = shards[1000]
    demand = _demand(rows, seed=3)
    big, small = _reader(paths, demand, 1 << 30), _reader(paths, demand, 8 * 12_000)
    for pos, refs in enumerate(demand):
        assert [r["utt"] for r in big.get_batch(refs, pos)] == [r["utt"] for r in small.get_batch(refs, pos)]
    assert small.group_reads > big.group_reads == 3
    assert small.peak_bytes < big.peak_bytes / 4


def test_unreadable_row_is_returned_as_its_error(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "a.parquet", [make_row("a"), make_row("b")])
    reader = _reader([path], [[(0, 0), (0, 5)]], 1 << 20)  # row 5 does not exist (the shard changed)
    got = reader.get_batch([(0, 0), (0, 5)], 0)
    assert got[0]["utt"] == "a" and isinstance(got[1], Exception)


@pytest.mark.parametrize("seed", range(4))
def test_batch_bounds_equal_upstream_batching(seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = rng.integers(1, 400, size=int(rng.integers(1, 300)))
    for budget in (1, 300, 2000):
        bounds = batch_bounds(frames, "dynamic", 0, budget)
        want = list(P.dynamic_batch(list(frames), budget, key=lambda f: int(f)))
        assert [list(frames[a:b]) for a, b in zip(bounds[:-1], bounds[1:])] == want
    bounds = batch_bounds(frames, "static", 7, 0)
    assert [list(frames[a:b]) for a, b in zip(bounds[:-1], bounds[1:])] == list(P.static_batch(list(frames), 7))


def test_window_shuffle_and_sort_keep_upstreams_windows() -> None:
    items = np.arange(103)
    shuffled = window_shuffle(items, 10, seed=7)
    assert np.array_equal(shuffled, window_shuffle(items, 10, seed=7)) and not np.array_equal(shuffled, items)
    for w in range(0, 103, 10):  # each window is a permutation of itself
        assert sorted(shuffled[w:w + 10].tolist()) == list(range(w, min(w + 10, 103)))
    frames = np.random.default_rng(1).integers(0, 5, 103)  # many ties: the sort must be stable
    sorted_items = window_sort(items, frames, 20)
    want = list(P.sort(list(items), 20, key=lambda i: int(frames[i])))
    assert sorted_items.tolist() == want


def test_shard_block_order_equals_sorting_every_row() -> None:
    from collections import Counter

    from cosytrain.data.index import ShardIndex
    from cosytrain.data.plan import shard_order_positions

    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 7, 12)  # empty shards included
    shard_of = np.repeat(np.arange(12, dtype=np.int32), sizes)
    row_of = np.concatenate([np.sort(rng.choice(20, n, replace=False)) for n in sizes]).astype(np.int32)
    index = ShardIndex([f"s{i}" for i in range(12)], shard_of, row_of, np.ones_like(row_of), [], Counter())
    order = [int(x) for x in rng.permutation(12)]
    shard_pos = np.empty(12, np.int64)
    shard_pos[order] = np.arange(12)
    assert shard_order_positions(index, order).tolist() == np.lexsort((row_of, shard_pos[shard_of])).tolist()


_PEAK = r"""
import json, sys
import numpy as np, pyarrow.compute, pyarrow.parquet as pq
from cosytrain.data.row_reader import RowReader
def peak_mb():  # VmHWM restarts at exec (ru_maxrss would carry pytest's own peak over)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
path, stream = sys.argv[1], sys.argv[2] == "pages"
md = pq.ParquetFile(path).metadata
demand = (np.array([0, 0]), np.array([3, 250]), np.array([0, 1]))
reader = RowReader([path], [np.array([0])], np.array([md.num_rows]), demand, budget=1 << 20)
reader.stream_min_bytes = 0 if stream else 1 << 40
before = peak_mb()
rows = reader.get_batch([(0, 3)], 0) + reader.get_batch([(0, 250)], 1)
print(json.dumps({"added_mb": peak_mb() - before, "sizes": [len(r["audio_data"]) for r in rows],
                  "streams": reader.page_streams}))
"""


def test_one_row_of_a_single_page_shard_costs_a_page_of_arrow_but_not_of_pages(tmp_path: Path) -> None:
    """Upstream's layout (one row group, all audio in one page): Arrow holds the page whole to return one row,
    the page streamer a megabyte or so. Peak RSS of a fresh process, so the Arrow figure shows the test can fail."""
    import json
    import os
    import subprocess
    import sys

    import pyarrow as pa

    rng = np.random.default_rng(0)
    audio = [rng.integers(0, 255, 200_000, dtype=np.uint8).tobytes() for _ in range(400)]  # 80 MB, incompressible
    path = tmp_path / "upstream_layout.parquet"
    pq.write_table(pa.table({"utt": [f"u{i}" for i in range(400)], "audio_data": audio, "text": ["t"] * 400}), path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    got = {}
    for mode in ("arrow", "pages"):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(path), mode], capture_output=True, text=True,
                             env=env, check=True)
        got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        assert got[mode]["sizes"] == [len(audio[3]), len(audio[250])]
    assert got["pages"]["streams"] >= 1 and got["arrow"]["streams"] == 0
    assert got["arrow"]["added_mb"] > 100, got  # the whole 80 MB page, more than once
    assert got["pages"]["added_mb"] < 20, got  # a few MB whatever the row group's size
