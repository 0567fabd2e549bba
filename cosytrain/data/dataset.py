"""Streaming dataset over parquet shards: equal batch counts on every rank, exact resume.

Upstream (``cosyvoice/dataset/dataset.py``) hands whole shards to ranks and workers and batches
whatever streams through. With shards of different sizes, ranks then run different numbers of
steps and DDP hangs in the first all-reduce a short rank never joins; and a restarted run cannot
find its place in the stream. Here the batching is *planned* before any audio is processed:

1. **Index** (once per process, ``ShardIndex``): every row of every shard is read once; its audio
   is decoded to learn its exact length and that it is usable, and every check of
   ``pipeline.check_facts`` runs. The facts can be cached per shard (``cache_dir``), keyed by path,
   size and mtime, so later runs only tokenize text. Bad shards and rows are counted by reason.
2. **Plan** (each epoch, ``plan_epoch``, a pure function of index, options, epoch and world size):
   shard order is shuffled with ``seed + epoch``; the usable rows in that order are cut into
   ``world_size`` contiguous runs whose sizes differ by at most one row; each rank's run goes
   through upstream's buffered shuffle (seeded by seed, epoch, rank), buffered sort and static or
   dynamic batching, all on the planned lengths (= the ``speech_feat`` frames the row will have).
   Every rank computes every rank's batch count, so all agree on ``N`` without communicating.
   **Padding policy** (``even_batches='pad'``, the default): a rank with fewer than ``N`` batches
   repeats its own first batches (cycling) until it has ``N``; no utterance is dropped, and at most
   ``N - min(n_r)`` batches per rank are repeats (a few, since rows are balanced to one).
   ``even_batches='drop'`` cuts every rank to the smallest count instead (no repeats, a few
   utterances unseen that epoch).
3. **Stream** (``__iter__``): DataLoader worker ``w`` of ``W`` processes planned batches
   ``start + w, start + w + W, ...``. PyTorch's DataLoader collects worker outputs round robin in
   worker order, so the rank sees the planned sequence exactly, whatever ``W`` is.
4. **Position**: ``(epoch, batches consumed)`` is the whole state (the same on every rank, since
   ranks step together). Resuming sets ``start`` to the consumed count: the next batch is the one
   an uninterrupted run would have produced next; a position at the end of an epoch resumes at
   the start of the next one. A position saved with a different world size or data set cannot be
   mapped; the epoch then restarts from its beginning, with a warning. ``ResumableCosyLoader``
   keeps the count and is what Lightning saves (see its docstring for Lightning's one-batch
   prefetch, which the count corrects for).

Rows found bad only while streaming (a file changed under us, a feature failure) are dropped from
their batch and counted; a batch left empty is replaced by the previous good batch of the worker,
so the count never changes.

Why one module over 450 lines: index, plan and loaders are one contract (equal batch counts on every
rank, exact resume): the loader's position counts what the plan made from the index, and the
invariants that make resume exact are easier to check when the three sit together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import zlib
from bisect import bisect_right
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cosytrain.data import pipeline as P
from cosytrain.data.pipeline import DataError, FeatureConfig, FilterConfig
from cosytrain.data.text_tokenizer import build_text_tokenizer

log = logging.getLogger(__name__)

FACTS_VERSION = 1
_FACT_COLUMNS = ("utt", "audio_data", "text", "speech_token", "utt_embedding", "spk_embedding")


@dataclass(frozen=True)
class StreamOptions:
    """Everything a worker needs to rebuild batches; plain values so it pickles and hashes."""

    feat: FeatureConfig = FeatureConfig()
    filt: FilterConfig = FilterConfig()
    text_tokenizer: str = "byte"
    text_tokenizer_path: Optional[str] = None
    shuffle: bool = True
    shuffle_size: int = 1000
    sort_size: int = 500
    batch_type: str = "dynamic"
    batch_size: int = 16
    max_frames_in_batch: int = 2000
    use_spk_embedding: bool = False
    seed: int = 1986
    even_batches: str = "pad"

    def __post_init__(self) -> None:
        if self.batch_type not in ("static", "dynamic"):
            raise DataError(f"batch_type must be 'static' or 'dynamic', got {self.batch_type!r}")
        if self.even_batches not in ("pad", "drop"):
            raise DataError(f"even_batches must be 'pad' or 'drop', got {self.even_batches!r}")
        for name in ("shuffle_size", "sort_size", "batch_size", "max_frames_in_batch"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be >= 1, got {getattr(self, name)}")


def read_data_list(path: str | os.PathLike) -> list[str]:
    """Shard paths of a ``data.list``; a missing or empty list is a one-line ``DataError``."""
    from cosytrain.data.shards import read_data_list as _read
    from cosytrain.utils.text_files import TextFileError

    try:
        shards = _read(path)
    except (FileNotFoundError, TextFileError) as ex:  # TextFileError: a line that is not UTF-8, named
        raise DataError(str(ex)) from None
    if not shards:
        raise DataError(f"data list {path} names no shards; run `python -m cosytrain prepare` to fill it")
    return shards


# ------------------------------------------------------------------------------------------- index


def _shard_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{FACTS_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(raw.encode()).hexdigest()


def shard_facts(path: str, cache_dir: Optional[str] = None) -> dict[str, Any]:
    """``{"error": str|None, "row_groups": [rows per group], "facts": [row_facts...]}`` for a shard."""
    cache_file = None
    if cache_dir is not None and os.path.exists(path):
        cache_file = Path(cache_dir) / f"{_shard_key(path)}.json"
        if cache_file.is_file():
            try:
                return json.loads(cache_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass  # unreadable cache: rebuild it
    result = _read_shard_facts(path)
    if cache_file is not None:
        try:
            from cosytrain.utils.atomic import atomic_write_text

            atomic_write_text(cache_file, json.dumps(result, ensure_ascii=False))
        except OSError as ex:
            log.warning("cannot cache shard facts in %s (%s); continuing without the cache", cache_dir, ex)
    return result


def _read_shard_facts(path: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from cosytrain.data.shards import ReadStats, check_shard, read_shard_rows

    reason = check_shard(path)
    if reason is not None:
        return {"error": reason, "row_groups": [], "facts": []}
    pf = pq.ParquetFile(path)
    groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    stats = ReadStats()
    facts = [P.row_facts(row) for row in read_shard_rows(path, columns=_FACT_COLUMNS, stats=stats)]
    if stats.bad:
        return {"error": stats.bad[0][1], "row_groups": [], "facts": []}
    return {"error": None, "row_groups": groups, "facts": facts}


@dataclass
class ShardIndex:
    """Usable rows of a shard set: parallel arrays (shard, row, planned frames) plus skip counts."""

    shards: list[str]
    shard_of: np.ndarray
    row_of: np.ndarray
    frames_of: np.ndarray
    row_group_starts: list[list[int]]
    skipped: Counter = field(default_factory=Counter)
    total_rows: int = 0

    @classmethod
    def build(cls, shards: Sequence[str], opts: StreamOptions, cache_dir: Optional[str] = None,
              source: str = "data list") -> "ShardIndex":
        tokenizer = build_text_tokenizer(opts.text_tokenizer, opts.text_tokenizer_path)
        shard_of, row_of, frames_of, starts = [], [], [], []
        skipped: Counter = Counter()
        total = 0
        for s, path in enumerate(shards):
            info = shard_facts(path, cache_dir)
            if info["error"] is not None:
                skipped["corrupt_shard"] += 1
                log.warning("skipping shard %s: %s", path, info["error"])
                starts.append([0])
                continue
            starts.append([int(x) for x in np.cumsum([0] + list(info["row_groups"]))[:-1]] or [0])
            for r, facts in enumerate(info["facts"]):
                total += 1
                text_len = len(tokenizer.encode(facts["text"])) if facts["text"] else 0
                reason = P.check_facts(facts, text_len, opts.filt, opts.feat)
                if reason is not None:
                    skipped[reason] += 1
                    continue
                shard_of.append(s)
                row_of.append(r)
                frames_of.append(P.expected_feat_frames(facts, opts.feat))
        index = cls(list(shards), np.asarray(shard_of, np.int32), np.asarray(row_of, np.int64),
                    np.asarray(frames_of, np.int64), starts, skipped, total)
        if len(index) == 0:
            raise DataError(f"{source}: no usable utterance in {len(shards)} shard(s) "
                            f"(skipped: {dict(skipped) or 'none'}); check the shards and the filter options")
        if skipped:
            log.warning("%s: %d of %d rows usable; skipped %s", source, len(index), total, dict(skipped))
        return index

    def __len__(self) -> int:
        return int(self.shard_of.shape[0])

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for arr in (self.shard_of, self.row_of, self.frames_of):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update("\n".join(self.shards).encode())
        return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------- plan


def _mix(*parts: int) -> int:
    return zlib.crc32(",".join(str(p) for p in parts).encode())


@dataclass
class EpochPlan:
    """One rank's batches for one epoch, as (shard, row) pairs, and the agreed count ``N``."""

    epoch: int
    rank: int
    world_size: int
    batches: list[list[tuple[int, int]]]
    counts: list[int]  # planned batches per rank before evening out

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    @property
    def repeated(self) -> int:
        return max(0, self.num_batches - self.counts[self.rank])


def _rank_rows(n: int, world_size: int, rank: int) -> np.ndarray:
    """Positions of this rank's contiguous run; with fewer rows than ranks, ranks share rows."""
    if n >= world_size:
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        return np.arange(lo, hi)
    return np.asarray([rank % n])


def plan_epoch(index: ShardIndex, opts: StreamOptions, epoch: int, world_size: int, rank: int) -> EpochPlan:
    """The deterministic batch plan described in the module docstring."""
    shard_order = list(range(len(index.shards)))
    if opts.shuffle:
        random.Random(_mix(opts.seed, epoch, "shards")).shuffle(shard_order)
    shard_pos = np.empty(len(shard_order), dtype=np.int64)
    shard_pos[np.asarray(shard_order, dtype=np.int64)] = np.arange(len(shard_order))
    order = np.lexsort((index.row_of, shard_pos[index.shard_of]))
    counts, mine = [], []
    for r in range(world_size):
        items = order[_rank_rows(len(order), world_size, r)].tolist()
        if opts.shuffle:
            items = list(P.shuffle(items, opts.shuffle_size, random.Random(_mix(opts.seed, epoch, r, "buffer"))))
        frames = index.frames_of
        items = list(P.sort(items, opts.sort_size, key=lambda i: int(frames[i])))
        batches = list(P.batch(items, opts.batch_type, opts.batch_size, opts.max_frames_in_batch,
                               key=lambda i: int(frames[i])))
        counts.append(len(batches))
        if r == rank:
            mine = batches
    target = max(counts) if opts.even_batches == "pad" else min(counts)
    if len(mine) < target:
        mine = [mine[i % len(mine)] for i in range(target)]
    mine = mine[:target]
    refs = [[(int(index.shard_of[i]), int(index.row_of[i])) for i in b] for b in mine]
    return EpochPlan(epoch, rank, world_size, refs, counts)


# ------------------------------------------------------------------------------------------ stream


def _reader_capacity(index: "ShardIndex", shuffle_size: int) -> int:
    """Row groups to keep decoded: enough to cover one shuffle window, plus slack for its edges.

    Rows are read in shuffled order, but only within a window of ``shuffle_size`` consecutive rows
    of the plan; caching fewer groups than the window spans would re-read each group once per row
    (measured: 2x slower on 10 small shards). Memory is then about one shuffle buffer of rows, the
    same as upstream's in-memory shuffle buffer.
    """
    rows_in_shard = np.bincount(index.shard_of, weights=None, minlength=len(index.shards))
    last_row = np.zeros(len(index.shards), np.int64)
    np.maximum.at(last_row, index.shard_of, index.row_of)
    sizes = []
    for s, starts in enumerate(index.row_group_starts):
        if rows_in_shard[s] == 0:
            continue
        ends = list(starts[1:]) + [int(last_row[s]) + 1]
        sizes += [b - a for a, b in zip(starts, ends) if b > a]
    smallest = max(1, min(sizes)) if sizes else 1
    return max(3, -(-int(shuffle_size) // smallest) + 2)


class _RowReader:
    """Random access to shard rows through a small LRU of decoded row groups."""

    def __init__(self, shards: Sequence[str], starts: Sequence[Sequence[int]], capacity: int = 3) -> None:
        self.shards, self.starts, self.capacity = shards, starts, capacity
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def row(self, shard: int, row: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        group = bisect_right(self.starts[shard], row) - 1
        key = (shard, group)
        table = self._cache.get(key)
        if table is None:
            table = pq.ParquetFile(self.shards[shard]).read_row_group(group)
            self._cache[key] = table
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return table.slice(row - self.starts[shard][group], 1).to_pylist()[0]


class CosyIterableDataset(IterableDataset):
    """Yields padded batch dicts (upstream keys) for one rank; see the module docstring.

    Each batch also carries ``_skipped`` (reason -> count of rows dropped while building it) and
    ``_batch_index`` (its position in the epoch plan); ``CosyLoader`` removes both.
    """

    def __init__(self, shards: Sequence[str], opts: StreamOptions, cache_dir: Optional[str] = None,
                 source: str = "data list", index: Optional[ShardIndex] = None) -> None:
        super().__init__()
        self.opts = opts
        self.source = source
        self.index = index if index is not None else ShardIndex.build(shards, opts, cache_dir, source)
        self.rank, self.world_size = 0, 1
        self._explicit_rank = False
        self.epoch, self.start = 0, 0
        self.plan: Optional[EpochPlan] = None

    def set_rank(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.rank, self.world_size, self._explicit_rank = int(rank), int(world_size), True

    def _resolve_rank(self) -> None:
        if not self._explicit_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def prepare_epoch(self, epoch: int, start: int = 0) -> EpochPlan:
        """Plan ``epoch`` (in the main process, before workers start) and skip ``start`` batches."""
        self._resolve_rank()
        self.epoch, self.start = int(epoch), max(0, int(start))
        self.plan = plan_epoch(self.index, self.opts, self.epoch, self.world_size, self.rank)
        return self.plan

    def num_batches(self, epoch: int) -> int:
        self._resolve_rank()
        return plan_epoch(self.index, self.opts, epoch, self.world_size, self.rank).num_batches

    def _truncate_rng(self, sample: dict[str, Any]) -> random.Random:
        return random.Random(_mix(self.opts.seed, self.epoch, sample.get("utt", ""), "truncate"))

    def _build(self, reader: _RowReader, refs: list[tuple[int, int]], skipped: Counter) -> Optional[dict[str, Any]]:
        rows = []
        for shard, row in refs:
            try:
                rows.append(reader.row(shard, row))
            except Exception as ex:  # noqa: BLE001 - shard changed or broke after indexing
                skipped["corrupt_shard_row"] += 1
                log.warning("cannot read row %d of %s: %s", row, self.index.shards[shard], ex)
        tokenizer = build_text_tokenizer(self.opts.text_tokenizer, self.opts.text_tokenizer_path)
        stages = P.sample_stages(tokenizer, self.opts.filt, self.opts.feat, skipped, self._truncate_rng)
        samples = list(P.compose(rows, stages))
        if not samples:
            return None
        return P.collate(samples, use_spk_embedding=self.opts.use_spk_embedding, gan=self.opts.feat.vocoder)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan if self.plan is not None and self.plan.epoch == self.epoch else self.prepare_epoch(
            self.epoch, self.start)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = _RowReader(self.index.shards, self.index.row_group_starts,
                            capacity=_reader_capacity(self.index, self.opts.shuffle_size))
        last_good: Optional[dict[str, Any]] = None
        mine = list(range(self.start + worker, plan.num_batches, workers))
        for pos, i in enumerate(mine):
            skipped: Counter = Counter()
            batch = self._build(reader, plan.batches[i], skipped)
            if batch is None:
                skipped["empty_batch_replaced"] += 1
                batch = last_good
                for j in mine[pos + 1:]:  # no good batch yet: borrow the next buildable one
                    if batch is not None:
                        break
                    batch = self._build(reader, plan.batches[j], Counter())
                if batch is None:
                    log.error("%s: no buildable batch left on worker %d; its stream ends early", self.source, worker)
                    return
            else:
                last_good = batch
            yield {**batch, "_skipped": dict(skipped), "_batch_index": i}


# ------------------------------------------------------------------------------------------ loader


class CosyLoader:
    """An epoch-aware iterable around a fresh ``DataLoader`` per epoch (no resumable state)."""

    def __init__(self, dataset: CosyIterableDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: Optional[int] = None, epoch_fn: Optional[Any] = None, name: str = "train") -> None:
        self.dataset, self.num_workers, self.pin_memory = dataset, int(num_workers), bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.epoch_fn = epoch_fn
        self.name = name
        self.epoch = 0
        self.skipped: Counter = Counter()  # stream-time skips of the current/last epoch
        self._start, self._delivered, self._exhausted, self._num_batches = 0, 0, False, 0
        self._iterating_epoch: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _current_epoch(self) -> int:
        return int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch

    def _position(self, epoch: int) -> tuple[int, int]:
        """(epoch, first batch) to stream when asked for ``epoch``."""
        return epoch, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Lazy on purpose: Lightning calls iter() once just to check that the loader is iterable;
        # nothing (epoch, restored position) may be decided until a batch is actually asked for.
        return self._stream()

    def _stream(self) -> Iterator[dict[str, Any]]:
        epoch, start = self._position(self._current_epoch())
        plan = self.dataset.prepare_epoch(epoch, start)
        self._iterating_epoch, self._start, self._delivered, self._exhausted = epoch, start, 0, False
        self._num_batches = plan.num_batches
        self.skipped = Counter()
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False, **kwargs)
        yield from self._run(loader, plan, epoch)

    def _run(self, loader: DataLoader, plan: EpochPlan, epoch: int) -> Iterator[dict[str, Any]]:
        for batch in loader:
            self.skipped.update(batch.pop("_skipped", {}))
            batch.pop("_batch_index", None)
            self._delivered += 1
            yield batch
        self._exhausted = True
        if self.epoch_fn is None:
            self.epoch = epoch + 1
        report = dict(self.skipped_report())
        log.log(logging.WARNING if report else logging.INFO,
                "%s epoch %d rank %d/%d: %d batches (%d repeated to even out ranks); skipped rows: %s",
                self.name, epoch, plan.rank, plan.world_size, plan.num_batches - self._start, plan.repeated,
                report or "none")

    def skipped_report(self) -> Counter:
        """Planning-time skips (whole data set) plus stream-time skips of this rank's last epoch."""
        return self.dataset.index.skipped + self.skipped

    def num_batches(self, epoch: Optional[int] = None) -> int:
        return self.dataset.num_batches(self._current_epoch() if epoch is None else epoch)


class ResumableCosyLoader(CosyLoader):
    """``CosyLoader`` with ``state_dict``/``load_state_dict`` (Lightning saves and restores it).

    ``consumed`` counts batches the training loop has taken. Lightning's training fetcher pulls
    ``lookahead`` (= 1) batch ahead of the one being trained on, to know whether it is the last;
    so mid-epoch ``consumed = delivered - lookahead``, and ``delivered`` once the epoch is exhausted.
    """

    def __init__(self, *args: Any, lookahead: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lookahead = int(lookahead)
        self._pending: Optional[dict[str, Any]] = None

    def _fingerprint(self) -> dict[str, Any]:
        ds = self.dataset
        ds._resolve_rank()
        return {"world_size": ds.world_size, "data": ds.index.fingerprint(), "seed": ds.opts.seed}

    def consumed(self) -> int:
        if self._iterating_epoch is None:
            return 0
        if self._exhausted:
            return self._start + self._delivered
        return self._start + max(0, self._delivered - self.lookahead)

    def state_dict(self) -> dict[str, Any]:
        if self._iterating_epoch is None and self._pending is not None:
            return dict(self._pending)  # restored but not iterated yet: keep the restored position
        epoch = self._iterating_epoch if self._iterating_epoch is not None else self._current_epoch()
        return {"epoch": int(epoch), "consumed": int(self.consumed()), **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state) if state else None
        if self._pending is not None and self.epoch_fn is None:
            self.epoch = int(self._pending["epoch"])

    def _position(self, epoch: int) -> tuple[int, int]:
        pending, self._pending = self._pending, None
        if pending is None or int(pending.get("epoch", -1)) != epoch:
            return epoch, 0
        mine = self._fingerprint()
        if any(pending.get(k) != v for k, v in mine.items()):
            log.warning("%s: saved data position (%s) does not match this run (%s); epoch %d restarts from its "
                        "first batch", self.name, {k: pending.get(k) for k in mine}, mine, epoch)
            return epoch, 0
        consumed = int(pending.get("consumed", 0))
        if consumed >= self.dataset.num_batches(epoch):
            # Saved after the epoch's last batch. Lightning restores its epoch counter only after
            # creating the iterator and then runs this iterator as the next epoch, so stream that.
            return epoch + 1, 0
        return epoch, consumed


__all__ = ["StreamOptions", "ShardIndex", "EpochPlan", "plan_epoch", "CosyIterableDataset", "CosyLoader",
           "ResumableCosyLoader", "DataError", "read_data_list", "shard_facts"]
