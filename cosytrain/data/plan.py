"""The epoch plan: which rows each rank batches together, in numpy (see ``dataset.py`` for the policy).

``plan_epoch`` is a pure function of (index, options, epoch, world size, rank). Every rank computes
every rank's batch count, so all agree on the epoch length without communicating. Upstream's
buffered shuffle, buffered length sort and batching are done on arrays: the shuffle gives each
window of ``shuffle_size`` rows its own random permutation (random keys sorted inside the window),
the sort is a stable sort by planned frames inside each window of ``sort_size``, and only dynamic
batching (a greedy pass) loops, over plain ints. A rank's plan is arrays (shard and row of each row
in batch order, batch boundaries), not Python lists: a million rows plan in about a second and take
8 MB plus the boundaries.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cosytrain.data.index import ShardIndex

# bump when the plan of the same index and options changes, so a saved data position is not misread
PLAN_VERSION = 2


def _mix(*parts: object) -> int:
    return zlib.crc32(",".join(str(p) for p in parts).encode())


@dataclass
class EpochPlan:
    """One rank's batches for one epoch and every rank's planned count (``counts``).

    Batch ``i`` of the rank (``0 <= i < num_batches``) is its own planned batch ``i % counts[rank]``:
    with ``even_batches='pad'`` the last few repeat the first ones, with ``'drop'`` the count is cut.
    ``shard_of``/``row_of`` hold the rank's rows in batch order, ``bounds`` the batch boundaries.
    """

    epoch: int
    rank: int
    world_size: int
    bounds: np.ndarray
    counts: list[int]
    num_batches: int
    shard_of: np.ndarray  # shard of each row in batch order (int32)
    row_of: np.ndarray  # row of each (int32)

    @property
    def repeated(self) -> int:
        return max(0, self.num_batches - self.counts[self.rank])

    def batch_slice(self, i: int) -> slice:
        j = i % max(1, self.counts[self.rank])
        return slice(int(self.bounds[j]), int(self.bounds[j + 1]))

    def refs(self, i: int) -> list[tuple[int, int]]:
        """(shard, row) pairs of batch ``i``."""
        sl = self.batch_slice(i)
        return list(zip(self.shard_of[sl].tolist(), self.row_of[sl].tolist()))

    @property
    def batches(self) -> list[list[tuple[int, int]]]:
        """Every batch as (shard, row) pairs (small data sets and tests; streaming uses ``refs``)."""
        return [self.refs(i) for i in range(self.num_batches)]


def rank_positions(n: int, world_size: int, rank: int) -> slice | np.ndarray:
    """Positions of this rank's contiguous run; with fewer rows than ranks, ranks share rows."""
    if n >= world_size:
        return slice(rank * n // world_size, (rank + 1) * n // world_size)
    return np.asarray([rank % n])


def _positions(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)


def window_shuffle(items: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Upstream's buffered shuffle: each window of ``size`` consecutive items in a random order."""
    keys = np.random.Generator(np.random.PCG64(seed)).integers(0, 2**31 - 1, items.shape[0], dtype=np.int32)
    return items[np.lexsort((keys, _positions(items.shape[0]) // max(1, size)))]


def window_sort(items: np.ndarray, frames: np.ndarray, size: int) -> np.ndarray:
    """Upstream's buffered sort: a stable sort by ``frames`` inside each window of ``size`` items."""
    return items[np.lexsort((frames, _positions(items.shape[0]) // max(1, size)))]


def shard_order_positions(index: "ShardIndex", shard_order: list[int]) -> np.ndarray:
    """Index positions ordered by (shard position in ``shard_order``, row): the index holds each shard's
    rows as one ascending block, so this moves whole blocks (no sort of every row)."""
    sizes = np.bincount(index.shard_of, minlength=len(index.shards)).astype(np.int64)
    starts = np.cumsum(sizes) - sizes
    order = np.asarray(shard_order, dtype=np.int64)
    new_sizes = sizes[order]
    new_starts = np.cumsum(new_sizes) - new_sizes
    shift = np.repeat(starts[order] - new_starts, new_sizes)
    out = _positions(len(index))
    out += shift.astype(out.dtype)
    return out


def batch_bounds(frames: np.ndarray, batch_type: str, batch_size: int, max_frames: int) -> np.ndarray:
    """Batch start offsets (plus the end) for items of ``frames`` in order: static or dynamic batching
    exactly as ``pipeline.static_batch`` / ``pipeline.dynamic_batch`` (never an empty batch)."""
    n = int(frames.shape[0])
    if n == 0:
        return np.zeros(1, np.int64)
    if batch_type == "static":
        return np.append(np.arange(0, n, batch_size, dtype=np.int64), n)
    starts = [0]
    longest = count = 0
    for i, f in enumerate(frames.tolist()):
        grown = f if f > longest else longest
        if count and grown * (count + 1) > max_frames:
            starts.append(i)
            longest, count = f, 1
        else:
            longest, count = grown, count + 1
    starts.append(n)
    return np.asarray(starts, np.int64)


def plan_epoch(index: "ShardIndex", opts: Any, epoch: int, world_size: int, rank: int) -> EpochPlan:
    """The deterministic batch plan described in ``dataset.py`` (``opts``: its ``StreamOptions``)."""
    n_shards = len(index.shards)
    shard_order = list(range(n_shards))
    if opts.shuffle:
        random.Random(_mix(opts.seed, epoch, "shards")).shuffle(shard_order)
    if len(index) and np.all(np.diff(index.shard_of) >= 0):
        order = shard_order_positions(index, shard_order)
    else:  # an index not built shard by shard: sort every row
        shard_pos = np.empty(n_shards, dtype=np.int32)
        shard_pos[np.asarray(shard_order, dtype=np.int64)] = np.arange(n_shards, dtype=np.int32)
        order = np.lexsort((index.row_of, shard_pos[index.shard_of]))
    if epoch < opts.curriculum_epochs:  # short utterances first
        order = order[index.frames_of[order] <= opts.curriculum_max_frames]
    counts: list[int] = []
    mine_items, mine_bounds = order[:0], np.zeros(1, np.int64)
    for r in range(world_size):
        items = order[rank_positions(len(order), world_size, r)]
        if opts.shuffle:
            items = window_shuffle(items, opts.shuffle_size, _mix(opts.seed, epoch, r, "buffer"))
        items = window_sort(items, index.frames_of[items], opts.sort_size)
        bounds = batch_bounds(index.frames_of[items], opts.batch_type, opts.batch_size, opts.max_frames_in_batch)
        counts.append(len(bounds) - 1)
        if r == rank:
            mine_items, mine_bounds = items, bounds
    del order
    target = max(counts) if opts.even_batches == "pad" else min(counts)
    return EpochPlan(epoch, rank, world_size, mine_bounds, counts, target, index.shard_of[mine_items],
                     index.row_of[mine_items])
