"""Parquet shards in upstream CosyVoice's layout, plus a small per-utterance index.

Upstream's ``tools/make_parquet_list.py`` builds a pandas DataFrame per shard and calls
``to_parquet``; its training pipeline (``cosyvoice/dataset/processor.py:parquet_opener``) reads the
columns by name. Writing the same column names and Arrow types with pyarrow directly means a shard
made here trains upstream and a shard made upstream trains here, without pandas.

Layout of an output folder::

    parquet_000000000.tar ...     the shards (parquet despite the suffix, as upstream names them)
    utt2parquet_000000000.json    {utt: shard path} per shard
    spk2parquet_000000000.json    {spk: shard path} per shard
    data.list / utt2data.list / spk2data.list   one path per line, as upstream
    index.jsonl                   one line per utterance: what length-aware batching needs
    spk2embedding.pt              {spk: mean embedding} (upstream's name and content)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

# the shards' writers: temp file + os.replace, modes as a plain write gives (0644 under umask 022, not
# mkstemp's 0600), so others on a shared machine can read the shards; re-exported for data/ callers
from cosytrain.utils.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401

# Column -> Arrow type, in the order upstream writes them. pandas maps a Python str column to
# ``string``, bytes to ``binary``, lists of Python floats to ``list<double>`` (upstream's embeddings
# are ``.tolist()`` of float32 arrays, hence double on disk) and lists of ints to ``list<int64>``.
SHARD_SCHEMA_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("utt", pa.string()),
    ("wav", pa.string()),
    ("audio_data", pa.binary()),
    ("text", pa.string()),
    ("spk", pa.string()),
    ("utt_embedding", pa.list_(pa.float64())),
    ("spk_embedding", pa.list_(pa.float64())),
    ("speech_token", pa.list_(pa.int64())),
)
# Written only when the source folder has an ``instruct`` file (upstream does the same), and only in
# preference (DPO) shards: the rejected speech tokens (upstream's column, cosyvoice/dataset/processor.py).
OPTIONAL_SCHEMA_FIELDS: tuple[tuple[str, pa.DataType], ...] = (("instruct", pa.string()),
                                                               ("reject_speech_token", pa.list_(pa.int64())))

SHARD_COLUMNS: tuple[str, ...] = tuple(name for name, _ in SHARD_SCHEMA_FIELDS)
OPTIONAL_COLUMNS: tuple[str, ...] = tuple(name for name, _ in OPTIONAL_SCHEMA_FIELDS)

INDEX_NAME = "index.jsonl"
DATA_LIST = "data.list"
UTT2DATA_LIST = "utt2data.list"
SPK2DATA_LIST = "spk2data.list"


def shard_name(i: int) -> str:
    return f"parquet_{i:09d}.tar"


def utt2parquet_name(i: int) -> str:
    return f"utt2parquet_{i:09d}.json"


def spk2parquet_name(i: int) -> str:
    return f"spk2parquet_{i:09d}.json"


def shard_schema(with_instruct: bool = False, with_reject: bool = False) -> pa.Schema:
    wanted = {"instruct": with_instruct, "reject_speech_token": with_reject}
    fields = list(SHARD_SCHEMA_FIELDS) + [(name, typ) for name, typ in OPTIONAL_SCHEMA_FIELDS if wanted[name]]
    return pa.schema([pa.field(name, typ) for name, typ in fields])


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a table with the shard schema; ``instruct`` / ``reject_speech_token`` when any row carries it."""
    with_instruct = any("instruct" in r and r["instruct"] is not None for r in rows)
    with_reject = any(r.get("reject_speech_token") is not None for r in rows)
    schema = shard_schema(with_instruct, with_reject)
    missing = [c for c in SHARD_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"shard row lacks columns {missing}; every row needs {list(SHARD_COLUMNS)}")
    arrays = []
    for f in schema:
        values = [r.get(f.name, "" if f.name == "instruct" else None) for r in rows]
        if pa.types.is_list(f.type):
            if pa.types.is_int64(f.type.value_type):
                values = [None if v is None else [int(x) for x in v] for v in values]
            else:
                values = [None if v is None else [float(x) for x in v] for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


ROW_GROUP_SIZE = 64


def with_fact_columns(table: pa.Table, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Add the ``cosytrain_*`` fact columns (see ``shard_facts``) when every row carries
    ``num_samples`` and ``sample_rate``: the index then plans batches without reading any audio."""
    from cosytrain.data.shard_facts import append_fact_columns, facts_for_rows

    if not rows or not all("num_samples" in r and "sample_rate" in r for r in rows):
        return table
    return append_fact_columns(table, facts_for_rows(rows))


def write_shard(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write one shard atomically (snappy, like pandas' default).

    Row groups of ``ROW_GROUP_SIZE`` rows let the data pipeline read a few utterances at a time
    instead of a whole shard of audio (upstream readers go by column name, so nothing else changes).
    Rows that carry ``num_samples``/``sample_rate`` (``prepare``'s) also get the fact columns.
    """
    table = with_fact_columns(rows_to_table(rows), rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", row_group_size=ROW_GROUP_SIZE)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def write_shard_jsons(out_dir: Path, i: int, shard_path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Upstream's utt2parquet/spk2parquet json for shard ``i`` (indent=2, ensure_ascii=False)."""
    utts = [r["utt"] for r in rows]
    spks = sorted({r["spk"] for r in rows})
    atomic_write_text(out_dir / utt2parquet_name(i),
                      json.dumps(dict.fromkeys(utts, shard_path), ensure_ascii=False, indent=2))
    atomic_write_text(out_dir / spk2parquet_name(i),
                      json.dumps(dict.fromkeys(spks, shard_path), ensure_ascii=False, indent=2))


def write_lists(out_dir: Path, shard_paths: Sequence[str], num_shards_ids: Sequence[int]) -> None:
    """``data.list``/``utt2data.list``/``spk2data.list``: one path per line, as upstream."""
    atomic_write_text(out_dir / DATA_LIST, "".join(p + "\n" for p in shard_paths))
    atomic_write_text(out_dir / UTT2DATA_LIST,
                      "".join(str(out_dir / utt2parquet_name(i)) + "\n" for i in num_shards_ids))
    atomic_write_text(out_dir / SPK2DATA_LIST,
                      "".join(str(out_dir / spk2parquet_name(i)) + "\n" for i in num_shards_ids))


# ----------------------------------------------------------------------------------------- reading


@dataclass
class ReadStats:
    """Counts from reading shards; ``bad`` holds (shard, one-line reason) for each skipped shard."""

    shards_ok: int = 0
    rows: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def shards_bad(self) -> int:
        return len(self.bad)


def _one_line(ex: BaseException) -> str:
    msg = str(ex).strip().splitlines()
    return f"{type(ex).__name__}: {msg[0] if msg else ''}".strip()


def check_shard(path: str | os.PathLike) -> str | None:
    """Return None when ``path`` is a readable shard with the required columns, else a one-line reason."""
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as ex:  # noqa: BLE001 - any failure means the shard is unusable
        return _one_line(ex)
    names = set(pf.schema_arrow.names)
    missing = [c for c in ("utt", "text", "speech_token") if c not in names]
    if missing:
        return f"missing columns {missing}"
    return None


def read_shard_rows(path: str | os.PathLike, columns: Sequence[str] | None = None,
                    batch_size: int = 64, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Yield each row of a shard as a dict of Python values (lists, bytes, str).

    A truncated or corrupt shard is skipped, not raised: the reason goes to ``stats.bad`` (and a
    warning log line), as upstream's ``parquet_opener`` logs and moves on. Rows yielded before the
    corruption surfaced stay yielded; the shard is still counted bad.
    """
    import logging

    stats = stats if stats is not None else ReadStats()
    path = str(path)
    try:
        pf = pq.ParquetFile(path)
        cols = None
        if columns is not None:
            have = set(pf.schema_arrow.names)
            cols = [c for c in columns if c in have]
        n = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            for row in batch.to_pylist():
                n += 1
                yield row
        stats.shards_ok += 1
        stats.rows += n
    except Exception as ex:  # noqa: BLE001
        reason = _one_line(ex)
        stats.bad.append((path, reason))
        logging.getLogger(__name__).warning("skipping shard %s: %s", path, reason)


def read_data_list(path: str | os.PathLike) -> list[str]:
    """Shard paths from a ``data.list``; relative paths resolve against the list's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data list {path} not found; run `python -m cosytrain prepare` to make it")
    from cosytrain.utils.text_files import read_text

    out = []
    for line in read_text(path).splitlines():  # a byte that is not UTF-8: one line naming file:line
        line = line.strip()
        if not line:
            continue
        p = Path(line)
        out.append(str(p if p.is_absolute() else path.parent / p))
    return out


def iter_rows(data_list: str | os.PathLike, columns: Sequence[str] | None = None,
              stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """All rows of every shard named in ``data_list``, skipping bad shards into ``stats``."""
    for shard in read_data_list(data_list):
        yield from read_shard_rows(shard, columns=columns, stats=stats)


# ------------------------------------------------------------------------------------------- index


INDEX_FIELDS = ("utt", "shard", "spk", "duration_s", "sample_rate", "num_speech_tokens", "num_text_chars")


def index_record(row: Mapping[str, Any], shard: str, duration_s: float, sample_rate: int) -> dict[str, Any]:
    return {
        "utt": row["utt"],
        "shard": shard,
        "spk": row["spk"],
        "duration_s": round(float(duration_s), 4),
        "sample_rate": int(sample_rate),
        "num_speech_tokens": len(row["speech_token"]),
        "num_text_chars": len(row["text"]),
    }


def write_index(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records))


def read_index(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-utterance lengths (see ``INDEX_FIELDS``), for length-aware batching without opening shards."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"shard index {path} not found; re-run `python -m cosytrain prepare`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
