"""Rows of parquet shards for one DataLoader worker, through a cache bounded in BYTES.

The worker knows its whole future: the planned batches it will build, in order. So the cache keeps
exactly the rows still to be used and, when full, evicts the row whose next use is farthest away
(Belady's rule, optimal for a known sequence). On a miss the row's row group is read with
``iter_batches`` (``BATCH_ROWS`` rows at a time, only the needed columns) and every row this worker
will need later is offered to the cache; reading stops after the last such row. What the cache holds
is bounded by ``budget`` whatever the corpus or the row-group size, and a row group is read about
once per worker per epoch when the budget holds a shuffle window's rows (a few times when it does
not: it is re-read, rows arrive in row order).

The read itself holds a few megabytes whatever the row-group size: pyarrow writes a column chunk as one
page when a row group is written in one call, as upstream's ``make_parquet_list.py`` does (one 1,000-row
group per shard, all its audio in one page), and Arrow decompresses a page whole (measured: 310 MB of
Arrow memory for the first 16 rows of 1,000 5-s utterances). So a binary column whose chunk is over
``STREAM_MIN_BYTES`` is read with :mod:`cosytrain.data.parquet_pages`, a megabyte at a time, keeping only
the wanted rows; the small columns still come from Arrow. A layout that module refuses is read with
Arrow as before (``python -m cosytrain.data.reshard`` rewrites such shards into ``prepare``'s 64-row groups).

Rows are dicts of compact values: ``audio_data`` bytes, ``text``/``utt``/``instruct`` str, and numpy
arrays for ``speech_token`` (int64) and the embeddings (float64), which every pipeline stage reads
with ``np.asarray``. A row's size is counted as its bytes plus a fixed overhead.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any, Container, Iterator, Optional, Sequence

import numpy as np

from cosytrain.data.parquet_pages import STREAM_MIN_BYTES, Unsupported, chunk_bytes, stream_values

# every column a pipeline stage reads; absent ones are skipped per shard (reject_speech_token: DPO shards)
READ_COLUMNS = ("utt", "audio_data", "text", "speech_token", "utt_embedding", "spk_embedding", "instruct",
                "reject_speech_token")
BATCH_ROWS = 16
ROW_OVERHEAD = 1024  # dict, keys, small objects


def _row_dicts(batch: Any, take: np.ndarray) -> list[dict[str, Any]]:
    """Rows ``take`` of an Arrow record batch as compact dicts (copies: the batch can be freed)."""
    import pyarrow as pa

    sub = batch.take(pa.array(take, pa.int64()))
    out: list[dict[str, Any]] = [{} for _ in range(sub.num_rows)]
    for name, col in zip(sub.schema.names, sub.columns):
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            if col.null_count == 0 and col.flatten().null_count == 0 and (
                    pa.types.is_integer(col.type.value_type) or pa.types.is_floating(col.type.value_type)):
                dtype = np.int64 if pa.types.is_integer(col.type.value_type) else np.float64
                values = col.flatten().to_numpy(zero_copy_only=False).astype(dtype)
                offsets = np.cumsum([0] + col.value_lengths().to_numpy(zero_copy_only=False).tolist())
                for i in range(sub.num_rows):
                    out[i][name] = values[offsets[i]:offsets[i + 1]].copy()
                continue
        for i, v in enumerate(col.to_pylist()):
            out[i][name] = v
    return out


def row_nbytes(row: dict[str, Any]) -> int:
    size = ROW_OVERHEAD
    for v in row.values():
        if isinstance(v, np.ndarray):
            size += v.nbytes
        elif isinstance(v, (bytes, str)):
            size += len(v)
        elif isinstance(v, list):
            size += 32 * len(v)
    return size


class RowReader:
    """``get_batch(refs, pos)``: the rows of the batch at position ``pos`` of this worker's sequence.

    Args:
        shards: shard paths; ``starts[s]`` first row of each row group of shard ``s``.
        shard_rows: rows per shard (to number rows globally).
        demand: ``(shard, row, pos)`` arrays of every row reference this worker will make, ``pos`` the
            position (0, 1, ...) of the batch that uses it.
        budget: bytes of decoded rows to keep.
    """

    def __init__(self, shards: Sequence[str], starts: Sequence[np.ndarray], shard_rows: np.ndarray,
                 demand: tuple[np.ndarray, np.ndarray, np.ndarray], budget: int,
                 columns: Sequence[str] = READ_COLUMNS) -> None:
        self.shards, self.starts = shards, [np.asarray(s, np.int64) for s in starts]
        self.base = np.concatenate([[0], np.cumsum(np.asarray(shard_rows, np.int64))])
        self.budget = int(budget)
        self.columns = tuple(columns)
        shard, row, pos = demand
        gid = self.base[np.asarray(shard, np.int64)] + np.asarray(row, np.int64)
        if self.base[-1] < 2**31:
            gid = gid.astype(np.int32)
        order = np.lexsort((pos, gid))  # by row, then by when it is used
        self._gid, self._pos = gid[order], np.asarray(pos, np.int32)[order]
        del order, gid
        self._rows: dict[int, tuple[dict[str, Any], int, int]] = {}  # gid -> (row, nbytes, next use)
        self._heap: list[tuple[int, int]] = []  # (-next use, gid), lazily cleaned
        self.bytes = 0
        self.peak_bytes = 0
        self.group_reads = 0
        self.page_streams = 0  # group reads that streamed the audio page by page
        self.stream_min_bytes = STREAM_MIN_BYTES
        self._files: OrderedDict[int, Any] = OrderedDict()

    # ------------------------------------------------------------------ demand
    def _next_use(self, gid: int, after: int) -> Optional[int]:
        lo = int(np.searchsorted(self._gid, gid, "left"))
        hi = int(np.searchsorted(self._gid, gid, "right"))
        k = lo + int(np.searchsorted(self._pos[lo:hi], after, "right"))
        return int(self._pos[k]) if k < hi else None

    # ------------------------------------------------------------------- cache
    def _drop(self, gid: int) -> None:
        _, size, _ = self._rows.pop(gid)
        self.bytes -= size

    def _push(self, nxt: int, gid: int) -> None:
        heapq.heappush(self._heap, (-nxt, gid))
        if len(self._heap) > 2 * len(self._rows) + 64:  # drop stale entries (rows used up or re-keyed)
            self._heap = [(-e[2], g) for g, e in self._rows.items()]
            heapq.heapify(self._heap)

    def _admit(self, gid: int, row: dict[str, Any], nxt: int, force: bool) -> None:
        size = row_nbytes(row)
        while self.bytes + size > self.budget and self._heap:
            neg, victim = self._heap[0]
            entry = self._rows.get(victim)
            if entry is None or entry[2] != -neg:
                heapq.heappop(self._heap)  # stale heap entry
                continue
            if -neg <= nxt and not force:
                return  # everything cached is needed sooner than this row
            heapq.heappop(self._heap)
            self._drop(victim)
        if self.bytes + size > self.budget and not force:
            return
        self._rows[gid] = (row, size, nxt)
        self._push(nxt, gid)
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def _file(self, shard: int) -> Any:
        import pyarrow.parquet as pq

        pf = self._files.get(shard)
        if pf is None:
            pf = pq.ParquetFile(self.shards[shard], buffer_size=1 << 20, pre_buffer=False)
            self._files[shard] = pf
            while len(self._files) > 4:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(shard)
        return pf

    def _stream_group(self, shard: int, row: int, pos: int) -> None:
        """Read the row group holding ``row`` and offer every row of it needed at ``pos`` or later."""
        starts = self.starts[shard]
        group = int(np.searchsorted(starts, row, "right")) - 1
        first = int(starts[group])
        last = int(starts[group + 1]) if group + 1 < len(starts) else int(self.base[shard + 1] - self.base[shard])
        g0, g1 = int(self.base[shard]) + first, int(self.base[shard]) + last
        lo, hi = int(np.searchsorted(self._gid, g0, "left")), int(np.searchsorted(self._gid, g1, "left"))
        gids, poss = self._gid[lo:hi], self._pos[lo:hi]
        keep = poss >= pos
        wanted: dict[int, int] = {}
        for g, p in zip(gids[keep].tolist(), poss[keep].tolist()):
            if g not in wanted and g not in self._rows:
                wanted[g] = p  # the first use at or after pos (sorted by pos within a gid)
        target = int(self.base[shard]) + row
        wanted.setdefault(target, pos)
        stop = max(wanted) - int(self.base[shard])  # last row of the group worth reading
        pf = self._file(shard)
        cols = [c for c in self.columns if c in pf.schema_arrow.names]
        self.group_reads += 1
        big = self._big_column(pf, group, cols)
        if big is not None:
            try:
                self._stream_pages(shard, group, first, stop, wanted, target, cols, big)
                self.page_streams += 1
                return
            except Unsupported:
                pass  # read the group with Arrow (rows already admitted are not offered twice)
        base = int(self.base[shard])
        todo = {g - base for g in wanted if g not in self._rows}  # not offered twice after a failed stream
        for r, row in self._arrow_rows(shard, group, first, stop, cols, todo):
            self._admit(base + r, row, wanted[base + r], force=(base + r == target))

    def _arrow_rows(self, shard: int, group: int, first: int, stop: int, columns: Sequence[str],
                    rows: Container[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row of the shard, row dict of ``columns``) for the ``rows`` of ``group``, read with Arrow up to
        row ``stop``."""
        at = first
        batches = self._file(shard).iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=list(columns),
                                                 use_threads=False)
        try:
            for batch in batches:
                idx = [i for i in range(batch.num_rows) if at + i in rows]
                if idx:
                    yield from zip((at + i for i in idx), _row_dicts(batch, np.asarray(idx)))
                at += batch.num_rows
                if at > stop:
                    break
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def _big_column(self, pf: Any, group: int, cols: Sequence[str]) -> Optional[str]:
        """The binary column (the audio) to stream page by page: its chunk in ``group`` is over
        ``stream_min_bytes`` uncompressed, where Arrow would hold the page whole."""
        import pyarrow as pa

        schema = pf.schema_arrow
        best, size = None, self.stream_min_bytes
        for name in cols:
            if pa.types.is_binary(schema.field(name).type) or pa.types.is_large_binary(schema.field(name).type):
                chunk = chunk_bytes(pf.metadata, group, name)
                if chunk > size:
                    best, size = name, chunk
        return best

    def _stream_pages(self, shard: int, group: int, first: int, stop: int, wanted: dict[int, int], target: int,
                      cols: Sequence[str], big: str) -> None:
        """``_stream_group`` for a group whose ``big`` column is read with :mod:`parquet_pages` (the other,
        small columns with Arrow): a row is offered to the cache as soon as its audio is read."""
        base = int(self.base[shard])
        partial: dict[int, dict[str, Any]] = {g - base: {} for g in wanted}
        small = [c for c in cols if c != big]
        if small:
            partial.update(self._arrow_rows(shard, group, first, stop, small, set(partial)))
        in_group = [r - first for r in sorted(partial)]
        for rows, value in stream_values(self.shards[shard], self._file(shard).metadata, group, big, in_group):
            for r in rows:
                g = base + first + r
                row = partial.pop(first + r)
                row[big] = value
                if g not in self._rows:
                    self._admit(g, row, wanted[g], force=(g == target))

    # ------------------------------------------------------------------ public
    def get_batch(self, refs: Sequence[tuple[int, int]], pos: int) -> list[Any]:
        """Rows of ``refs`` (a row that cannot be read is returned as the exception raised)."""
        out: list[Any] = []
        used: list[int] = []
        for shard, row in refs:
            gid = int(self.base[shard]) + int(row)
            try:
                if gid not in self._rows:
                    self._stream_group(shard, row, pos)
                out.append(self._rows[gid][0])
                used.append(gid)
            except Exception as ex:  # noqa: BLE001 - reported per row by the caller
                out.append(ex)
        for gid in set(used):  # keep a row only while a later batch still needs it
            nxt = self._next_use(gid, pos)
            if gid not in self._rows:
                continue
            row, size, _ = self._rows[gid]
            if nxt is None:
                self._drop(gid)
            else:
                self._rows[gid] = (row, size, nxt)
                self._push(nxt, gid)
        return out
