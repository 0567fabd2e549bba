"""Streaming dataset over parquet shards: equal batch counts on every rank, exact resume.

Upstream (``cosyvoice/dataset/dataset.py``) hands whole shards to ranks and workers and batches
whatever streams through. With shards of different sizes, ranks then run different numbers of
steps and DDP hangs in the first all-reduce a short rank never joins; and a restarted run cannot
find its place in the stream. Here the batching is *planned* before any audio is processed:

1. **Index** (``index.py``, ``index_build.py``): per row, the facts the checks of
   ``pipeline.check_facts`` and the planned length need, read from the ``cosytrain_*`` columns that
   ``prepare`` writes (no audio read) or, for shards from upstream's tools, from one scan of the
   shard (audio headers, decoding only where a header is not exact). Facts and text-token lengths
   (per tokenizer) are cached per shard, keyed by path, size and mtime; on the first launch the
   ranks split the shards between them and index in parallel processes, with no barrier. The index
   keeps 12 bytes per usable row. Bad shards and rows are counted by reason.
2. **Plan** (each epoch, ``plan_epoch``, a pure function of index, options, epoch and world size):
   shard order is shuffled with ``seed + epoch``; while ``epoch < curriculum_epochs`` only rows of at
   most ``curriculum_max_frames`` planned frames stay (short utterances first); the rows in that order are cut into
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
   worker order, so the rank sees the planned sequence exactly, whatever ``W`` is. Each worker reads
   its rows through a ``RowReader``: a cache bounded in bytes (``row_cache_bytes`` per rank, split
   between workers) that streams row groups and keeps only rows it will still use (``row_reader.py``).
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

Index (``index.py``, ``index_build.py``, ``shard_facts.py``), plan (``plan.py``) and the row reader
(``row_reader.py``) are modules of their own; this one holds the loaders and the position, the part
of the contract (equal batch counts, exact resume) that counts what the plan made from the index.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cosytrain.data import pipeline as P
from cosytrain.data.index import ShardIndex
from cosytrain.data.pipeline import DataError, FeatureConfig, FilterConfig
from cosytrain.data.plan import PLAN_VERSION, EpochPlan, _mix, plan_epoch
from cosytrain.data.row_reader import RowReader
from cosytrain.data.text_tokenizer import build_text_tokenizer

log = logging.getLogger(__name__)

DEFAULT_ROW_CACHE_BYTES = 256 << 20


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
    # short utterances first: for epochs below curriculum_epochs only rows of at most curriculum_max_frames
    # batching frames (the unit of max_frames_in_batch) are planned; 0 = no curriculum
    curriculum_epochs: int = 0
    curriculum_max_frames: int = 0

    def __post_init__(self) -> None:
        if self.batch_type not in ("static", "dynamic"):
            raise DataError(f"batch_type must be 'static' or 'dynamic', got {self.batch_type!r}")
        if self.even_batches not in ("pad", "drop"):
            raise DataError(f"even_batches must be 'pad' or 'drop', got {self.even_batches!r}")
        for name in ("shuffle_size", "sort_size", "batch_size", "max_frames_in_batch"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.curriculum_epochs < 0 or (self.curriculum_epochs > 0 and self.curriculum_max_frames < 1):
            raise DataError(f"curriculum_epochs {self.curriculum_epochs} needs curriculum_max_frames >= 1 "
                            f"(got {self.curriculum_max_frames}); set curriculum_epochs: 0 for no curriculum")


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


# ------------------------------------------------------------------------------------------ stream


class CosyIterableDataset(IterableDataset):
    """Yields padded batch dicts (upstream keys) for one rank; see the module docstring.

    Each batch also carries ``_skipped`` (reason -> count of rows dropped while building it) and
    ``_batch_index`` (its position in the epoch plan); ``CosyLoader`` removes both.
    """

    def __init__(self, shards: Sequence[str], opts: StreamOptions, cache_dir: Optional[str] = None,
                 source: str = "data list", index: Optional[ShardIndex] = None,
                 row_cache_bytes: int = DEFAULT_ROW_CACHE_BYTES) -> None:
        super().__init__()
        self.opts = opts
        self.source = source
        self.index = index if index is not None else ShardIndex.build(shards, opts, cache_dir, source)
        self.row_cache_bytes = int(row_cache_bytes)
        self.rank, self.world_size = 0, 1
        self._explicit_rank = False
        self.epoch, self.start = 0, 0
        self.plan: Optional[EpochPlan] = None
        self.reader: Optional[RowReader] = None  # the last worker-side reader (inspection, benchmarks)

    def set_rank(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.rank, self.world_size, self._explicit_rank = int(rank), int(world_size), True

    def _resolve_rank(self) -> None:
        if not self._explicit_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _plan(self, epoch: int) -> EpochPlan:
        self._resolve_rank()
        plan = self.plan
        if plan is None or (plan.epoch, plan.rank, plan.world_size) != (epoch, self.rank, self.world_size):
            plan = plan_epoch(self.index, self.opts, epoch, self.world_size, self.rank)
        return plan

    def prepare_epoch(self, epoch: int, start: int = 0) -> EpochPlan:
        """Plan ``epoch`` (in the main process, before workers start) and skip ``start`` batches."""
        self.plan = self._plan(int(epoch))
        self.epoch, self.start = int(epoch), max(0, int(start))
        return self.plan

    def num_batches(self, epoch: int) -> int:
        return self._plan(int(epoch)).num_batches

    def _truncate_rng(self, sample: dict[str, Any]) -> random.Random:
        return random.Random(_mix(self.opts.seed, self.epoch, sample.get("utt", ""), "truncate"))

    def _reader(self, plan: EpochPlan, mine: Sequence[int], workers: int) -> RowReader:
        """A reader that knows every row this worker will ask for, in order (its demand)."""
        slices = [plan.batch_slice(i) for i in mine]
        pos = np.repeat(np.arange(len(slices), dtype=np.int32), [sl.stop - sl.start for sl in slices])
        cat = (lambda a: np.concatenate([a[sl] for sl in slices]) if slices else a[:0])  # noqa: E731
        index = self.index
        return RowReader(index.shards, index.row_group_starts, index.rows_per_shard(),
                         (cat(plan.shard_of), cat(plan.row_of), pos), self.row_cache_bytes // max(1, workers))

    def _build(self, reader: RowReader, refs: list[tuple[int, int]], pos: int,
               skipped: Counter) -> Optional[dict[str, Any]]:
        rows = []
        for (shard, row), got in zip(refs, reader.get_batch(refs, pos)):
            if isinstance(got, Exception):  # shard changed or broke after indexing
                skipped["corrupt_shard_row"] += 1
                log.warning("cannot read row %d of %s: %s", row, self.index.shards[shard], got)
            else:
                rows.append(dict(got))  # the stages add keys; the cached row stays as read
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
        mine = list(range(self.start + worker, plan.num_batches, workers))
        reader = self.reader = self._reader(plan, mine, workers)
        last_good: Optional[dict[str, Any]] = None
        for pos, i in enumerate(mine):
            skipped: Counter = Counter()
            batch = self._build(reader, plan.refs(i), pos, skipped)
            if batch is None:
                skipped["empty_batch_replaced"] += 1
                batch = last_good
                for later, j in enumerate(mine[pos + 1:], start=pos + 1):  # no good batch yet: borrow the next
                    if batch is not None:
                        break
                    batch = self._build(reader, plan.refs(j), later, Counter())
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
        return {"world_size": ds.world_size, "data": f"{ds.index.fingerprint()}-p{PLAN_VERSION}", "seed": ds.opts.seed}

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
           "ResumableCosyLoader", "DataError", "read_data_list"]
