"""Rank/worker partitioning with equal batch counts, exact resume, bad shards, clear errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cosytrain.data.dataset import (CosyIterableDataset, CosyLoader, ResumableCosyLoader, ShardIndex, StreamOptions,
                                    plan_epoch, read_data_list)
from cosytrain.data.pipeline import DataError, FeatureConfig, FilterConfig
from cosytrain.data.row_reader import RowReader
from tests.data.test_pipeline import make_row, write_corpus, write_shard

OPTS = StreamOptions(feat=FeatureConfig(), filt=FilterConfig(speech_token_size=4096), shuffle_size=8, sort_size=4,
                     max_frames_in_batch=250, seed=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str], ShardIndex]:
    data_list, utts = write_corpus(tmp_path_factory.mktemp("corpus"), sizes=[5, 11, 2])
    return data_list, utts, ShardIndex.build(read_data_list(data_list), OPTS)


def _utts(batches: list[dict]) -> list[list[str]]:
    return [b["utts"] for b in batches]


def _rank_batches(corpus, rank: int, world: int, workers: int, epoch: int = 0, opts: StreamOptions = OPTS) -> list:
    data_list, _, index = corpus
    ds = CosyIterableDataset([], opts, index=index)
    ds.set_rank(rank, world)
    loader = CosyLoader(ds, num_workers=workers)
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("epoch", [0, "uneven"])
def test_two_ranks_two_workers_equal_counts_and_full_coverage(corpus, epoch) -> None:
    _, utts, index = corpus
    if epoch == "uneven":  # an epoch whose ranks plan different counts: the padding policy is exercised
        epoch = next(e for e in range(50) if len(set(plan_epoch(index, OPTS, e, 2, 0).counts)) > 1)
        assert len(set(plan_epoch(index, OPTS, epoch, 2, 1).counts)) > 1
    per_rank = [_rank_batches(corpus, r, 2, workers=2, epoch=epoch) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 1
    plans = [plan_epoch(index, OPTS, epoch, 2, r) for r in range(2)]
    seen = Counter(u for batches in per_rank for b in batches for u in b["utts"])
    assert set(seen) == set(utts)  # nothing lost
    repeated = Counter()
    for plan, batches in zip(plans, per_rank):
        for b in batches[plan.counts[plan.rank]:]:  # the padding repeats, and only those
            repeated.update(b["utts"])
    assert seen - repeated == Counter(dict.fromkeys(utts, 1))
    # the two ranks hold disjoint halves (balanced to one row) before padding
    own = [set(u for b in bs[:p.counts[p.rank]] for u in b["utts"]) for p, bs in zip(plans, per_rank)]
    assert not own[0] & own[1] and abs(len(own[0]) - len(own[1])) <= 1


def test_worker_count_does_not_change_the_sequence(corpus) -> None:
    for rank in range(2):
        assert _utts(_rank_batches(corpus, rank, 2, workers=0)) == _utts(_rank_batches(corpus, rank, 2, workers=2))


def test_drop_policy_cuts_to_the_fewest(corpus) -> None:
    _, _, index = corpus
    opts = StreamOptions(**{**OPTS.__dict__, "even_batches": "drop", "max_frames_in_batch": 120})
    plans = [plan_epoch(index, opts, 0, 3, r) for r in range(3)]
    assert len({p.num_batches for p in plans}) == 1 and plans[0].num_batches == min(plans[0].counts)


def test_more_ranks_than_rows_still_even(tmp_path: Path) -> None:
    data_list, _ = write_corpus(tmp_path, sizes=[2])
    index = ShardIndex.build(read_data_list(data_list), OPTS)
    plans = [plan_epoch(index, OPTS, 0, 4, r) for r in range(4)]
    assert {p.num_batches for p in plans} == {1}


def test_epoch_seeded_shuffle(corpus) -> None:
    e0 = _utts(_rank_batches(corpus, 0, 1, workers=0, epoch=0))
    e0_again = _utts(_rank_batches(corpus, 0, 1, workers=0, epoch=0))
    e1 = _utts(_rank_batches(corpus, 0, 1, workers=0, epoch=1))
    assert e0 == e0_again and e0 != e1
    assert sorted(u for b in e0 for u in b) == sorted(u for b in e1 for u in b)


def test_length_curriculum_holds_long_rows_back_for_its_epochs(corpus) -> None:
    import dataclasses

    import numpy as np

    _, _, index = corpus
    cap = int(np.median(index.frames_of))
    opts = dataclasses.replace(OPTS, curriculum_epochs=2, curriculum_max_frames=cap)
    long_rows = {(int(s), int(r)) for s, r, f in zip(index.shard_of, index.row_of, index.frames_of) if f > cap}
    assert long_rows and len(long_rows) < len(index)

    def planned(epoch: int) -> set[tuple[int, int]]:
        plan = plan_epoch(index, opts, epoch, 1, 0)
        return {ref for i in range(plan.num_batches) for ref in plan.refs(i)}

    everything = planned(2)
    assert len(everything) == len(index)  # from curriculum_epochs on: every row
    for epoch in (0, 1):
        rows = planned(epoch)
        assert rows == everything - long_rows and plan_epoch(index, opts, epoch, 1, 0).num_batches > 0
    with pytest.raises(DataError, match="curriculum_max_frames"):
        StreamOptions(curriculum_epochs=3)


def test_budget_respected_on_real_batches(corpus) -> None:
    for b in _rank_batches(corpus, 0, 1, workers=0):
        n = len(b["utts"])
        assert n == 1 or b["speech_feat"].shape[1] * n <= OPTS.max_frames_in_batch
        assert b["speech_feat"].shape[1] == int(b["speech_feat_len"].max())


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(corpus, workers: int) -> None:
    _, _, index = corpus

    def loader() -> ResumableCosyLoader:
        ds = CosyIterableDataset([], OPTS, index=index)
        ds.set_rank(1, 2)
        return ResumableCosyLoader(ds, num_workers=workers, lookahead=0)

    full = loader()
    full.set_epoch(1)
    reference = _utts(list(full))
    k = 3
    first = loader()
    first.set_epoch(1)
    it = iter(first)
    got = [next(it)["utts"] for _ in range(k)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == k
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = _utts(list(resumed))
    assert got + rest == reference
    # the finished epoch's state points at the next epoch's start
    after = resumed.state_dict()
    assert after == {**state, "consumed": len(reference)}
    nxt = loader()
    nxt.load_state_dict(after)
    nxt.set_epoch(2)
    assert len(list(nxt)) == nxt.num_batches(2)


def test_resume_with_other_world_size_restarts_epoch(corpus, caplog) -> None:
    _, _, index = corpus
    ds = CosyIterableDataset([], OPTS, index=index)
    ds.set_rank(0, 1)
    loader = ResumableCosyLoader(ds, lookahead=0)
    loader.load_state_dict({"epoch": 0, "consumed": 2, "world_size": 2, "data": index.fingerprint(), "seed": 5})
    assert len(list(loader)) == plan_epoch(index, OPTS, 0, 1, 0).num_batches
    assert "does not match" in caplog.text


def test_corrupt_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    good = write_shard(tmp_path / "a.parquet", [make_row("a"), make_row("b", seconds=0.7)])
    raw = Path(good).read_bytes()
    (tmp_path / "b.parquet").write_bytes(raw[:-40])
    (tmp_path / "c.parquet").write_bytes(b"garbage")
    lst = tmp_path / "data.list"
    lst.write_text("a.parquet\nb.parquet\nc.parquet\nmissing.parquet\n")
    ds = CosyIterableDataset(read_data_list(lst), OPTS)
    assert ds.index.skipped == Counter({"corrupt_shard": 3})
    batches = list(CosyLoader(ds))
    assert sorted(u for b in batches for u in b["utts"]) == ["a", "b"]


def test_bad_rows_counted_in_index_and_never_batched(tmp_path: Path, caplog) -> None:
    rows = [make_row("ok1"), make_row("ok2", seconds=0.6), make_row("bad_audio", audio_data=b"xx"),
            make_row("bad_tok", speech_token=[99999]), make_row("bad_emb", emb_dim=10), make_row("no_text", text="")]
    write_shard(tmp_path / "s.parquet", rows)
    (tmp_path / "data.list").write_text("s.parquet\n")
    ds = CosyIterableDataset(read_data_list(tmp_path / "data.list"), OPTS)
    assert ds.index.skipped == Counter({"undecodable_audio": 1, "speech_token_out_of_range": 1,
                                        "bad_embedding": 1, "empty_text": 1})
    loader = CosyLoader(ds)
    caplog.set_level("WARNING", logger="cosytrain.data.dataset")
    assert sorted(u for b in loader for u in b["utts"]) == ["ok1", "ok2"]
    assert loader.skipped_report() == ds.index.skipped
    epoch_lines = [r.getMessage() for r in caplog.records if "train epoch 0" in r.getMessage()]
    assert len(epoch_lines) == 1 and "speech_token_out_of_range" in epoch_lines[0]


def test_stream_time_failure_keeps_batch_count(tmp_path: Path, monkeypatch) -> None:
    data_list, _ = write_corpus(tmp_path, sizes=[6])
    ds = CosyIterableDataset(read_data_list(data_list), OPTS)
    planned = plan_epoch(ds.index, OPTS, 0, 1, 0).num_batches
    real_get = RowReader.get_batch

    def flaky(self, refs, pos):
        got = real_get(self, refs, pos)
        return [OSError("disk hiccup") if row % 2 == 0 else r for (_, row), r in zip(refs, got)]

    monkeypatch.setattr(RowReader, "get_batch", flaky)
    loader = CosyLoader(ds)
    batches = list(loader)
    assert len(batches) == planned
    assert loader.skipped["corrupt_shard_row"] == 3


def test_missing_list_and_empty_dataset_raise_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere/data.list"):
        read_data_list(tmp_path / "nowhere" / "data.list")
    (tmp_path / "empty.list").write_text("\n")
    with pytest.raises(DataError, match="empty.list"):
        read_data_list(tmp_path / "empty.list")
    write_shard(tmp_path / "s.parquet", [make_row("x", text="")])
    with pytest.raises(DataError, match="no usable utterance"):
        CosyIterableDataset([str(tmp_path / "s.parquet")], OPTS, source=str(tmp_path / "x.list"))
