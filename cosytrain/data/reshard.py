"""``python -m cosytrain.data.reshard``: rewrite shards from upstream's tools in cosytrain's layout.

Upstream's ``make_parquet_list.py`` writes each shard (1,000 rows) as ONE row group, and pyarrow
writes each of its column chunks as one data page; a page is compressed whole, so reading any row
of such a shard decompresses the whole shard's audio (measured: 310 MB of Arrow memory to get the
first 16 rows of 1,000 5-s utterances, 2x the 150 MB column). cosytrain trains on those shards as
they are (the row reader streams such a page a megabyte at a time, ``data/parquet_pages.py``), but
the first launch must scan their audio headers. Rewriting them once with ``ROW_GROUP_SIZE``-row groups
and the ``cosytrain_*`` fact columns (what ``prepare`` writes) lets every later first launch plan
batches without reading audio, and lets Arrow read them without the page streamer. The rows,
their order and upstream's columns are unchanged, so upstream still trains on the output.

    python -m cosytrain.data.reshard --data_list data/train/data.list --des_dir data/train_cosy [--num_workers 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Optional, Sequence

from cosytrain.data import shards as S


def reshard_one(args: tuple[str, str, int]) -> tuple[str, int, Optional[str]]:
    """Rewrite one shard; returns (output path, rows, None) or (source, 0, one-line reason)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cosytrain.data.shard_facts import append_fact_columns, batch_facts
    from cosytrain.utils.atomic import atomic_open

    src, dst, group = args
    reason = S.check_shard(src)
    if reason is not None:
        return src, 0, reason
    rows = 0
    try:
        pf = pq.ParquetFile(src)
        with atomic_open(dst, "wb") as handle:
            writer = None
            for batch in pf.iter_batches(batch_size=group):
                facts, _ = batch_facts(batch)
                table = append_fact_columns(pa.Table.from_batches([batch]), facts)
                if writer is None:
                    writer = pq.ParquetWriter(handle, table.schema, compression="snappy")
                writer.write_table(table, row_group_size=group)
                rows += table.num_rows
            if writer is not None:
                writer.close()
    except Exception as ex:  # noqa: BLE001 - a shard that breaks mid-read is reported, the others go on
        return src, 0, S._one_line(ex)
    return dst, rows, None


def reshard(data_list: str, des_dir: str, num_workers: int = 1, group: int = S.ROW_GROUP_SIZE) -> tuple[list[str], list]:
    """Rewrite every shard of ``data_list`` into ``des_dir`` (same names) and write ``des_dir/data.list``.
    Returns (output shard paths, [(source, reason) for each shard that could not be read])."""
    out = Path(des_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = S.read_data_list(data_list)
    names = [Path(p).name for p in sources]
    if len(set(names)) != len(names):  # shards from several folders may share a name
        names = [f"{i:09d}_{n}" for i, n in enumerate(names)]
    tasks = [(src, str(out / name), group) for src, name in zip(sources, names)]
    if num_workers > 1 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(num_workers) as pool:
            results = pool.map(reshard_one, tasks, chunksize=1)
    else:
        results = [reshard_one(t) for t in tasks]
    written = [path for path, _, err in results if err is None]
    failed = [(path, err) for path, _, err in results if err is not None]
    S.atomic_write_text(out / S.DATA_LIST, "".join(p + "\n" for p in written))
    return written, failed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cosytrain.data.reshard", description=__doc__.splitlines()[0])
    p.add_argument("--data_list", required=True, help="data.list of the shards to rewrite")
    p.add_argument("--des_dir", required=True, help="output folder (shards + data.list)")
    p.add_argument("--num_workers", type=int, default=1)
    a = p.parse_args(argv)
    try:
        written, failed = reshard(a.data_list, a.des_dir, a.num_workers)
    except FileNotFoundError as ex:
        print(f"reshard: {ex}", file=sys.stderr)
        return 2
    for src, reason in failed:
        print(f"reshard: skipped {src}: {reason}", file=sys.stderr)
    print(f"reshard: {len(written)} shard(s) -> {Path(a.des_dir) / S.DATA_LIST} ({len(failed)} skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
