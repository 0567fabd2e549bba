"""Per-row facts of a shard (lengths and validity) as one compact numpy record array, without torch.

Planning batches needs, for every row, what ``pipeline.check_facts`` checks and what
``pipeline.expected_feat_frames`` computes: the audio's sample count and rate, the speech-token
count and range, the embeddings' sizes and finiteness, and whether the text is blank. Two sources:

* **shards written by ``prepare``** carry those facts as scalar columns named ``cosytrain_*`` (and
  the schema key ``cosytrain.facts``). Reading them is a read of a few small columns: nothing scales
  with the audio. Extra columns were chosen over a sidecar file because they travel with the shard
  (copied, moved or re-listed, the facts stay right) and cannot go stale beside it; upstream's
  readers select columns by name (``parquet_opener`` turns every column into a sample key, and no
  stage of upstream's pipeline looks at keys it does not know), so upstream trains on these shards
  unchanged.
* **shards from upstream's tools** have no such columns: the shard is *scanned* once. Audio length
  comes from the file header where that is exact (uncompressed integer PCM, e.g. WAV PCM_16: no
  NaN is possible and libsndfile reports the frames actually present, a truncated file included);
  other audio (float WAV, FLAC, MP3, ...) is decoded, as ``pipeline.decode_wav`` would. Token and
  embedding facts are computed column-wise from the Arrow lists, with no Python loop per row.

This module imports no torch (index workers are spawned processes and start faster without it);
``index_build.read_shard_facts`` applies it to a whole shard.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from cosytrain.data.parquet_pages import STREAM_MIN_BYTES, Unsupported, chunk_bytes, stream_values

log = logging.getLogger(__name__)

FACTS_VERSION = 2
FACTS_META_KEY = b"cosytrain.facts"
COLUMN_PREFIX = "cosytrain_"

FACT_DTYPE = np.dtype([
    ("num_samples", "<i8"), ("sample_rate", "<i4"), ("audio_error", "u1"), ("text_blank", "?"),
    ("speech_token_len", "<i4"), ("speech_token_min", "<i8"), ("speech_token_max", "<i8"),
    ("utt_embedding_dim", "<i4"), ("utt_embedding_finite", "?"),
    ("spk_embedding_dim", "<i4"), ("spk_embedding_finite", "?"),
])
# audio_error codes -> the skip reasons of pipeline.decode_wav
AUDIO_ERRORS = (None, "undecodable_audio", "empty_audio", "nonfinite_audio")
_UNDECODABLE, _EMPTY, _NONFINITE = 1, 2, 3
# fields prepare writes as columns (text_blank is computed from the text, which the index reads anyway)
STORED_FIELDS = tuple(n for n in FACT_DTYPE.names if n != "text_blank")
FACT_COLUMNS = tuple(COLUMN_PREFIX + n for n in STORED_FIELDS)
SCAN_COLUMNS = ("audio_data", "text", "speech_token", "utt_embedding", "spk_embedding")
# containers whose integer-PCM header gives the exact decoded length (and cannot hold NaN)
_EXACT_HEADER_FORMATS = {"WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF"}


@dataclass
class ShardFacts:
    """Facts of every row of one shard, plus its row-group sizes; ``error`` set = unusable shard."""

    facts: np.ndarray  # FACT_DTYPE, one record per row
    texts: Optional[list[str]]  # the transcripts (not cached; only needed to count text tokens)
    row_groups: np.ndarray  # rows per row group (int64)
    error: Optional[str] = None
    from_columns: bool = False

    @classmethod
    def failed(cls, error: str) -> "ShardFacts":
        return cls(np.zeros(0, FACT_DTYPE), [], np.zeros(0, np.int64), error)


# ------------------------------------------------------------------------------ audio (per row)


def audio_facts(data: Any) -> tuple[int, int, int]:
    """(num_samples, sample_rate, audio_error code) of one row's audio bytes, as ``decode_wav`` sees them
    (and, like ``pipeline.row_facts``, (0, 0, code) for unusable audio)."""
    import soundfile as sf

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        return 0, 0, _UNDECODABLE
    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as f:
            frames, sr, fmt, subtype = int(f.frames), int(f.samplerate), f.format, f.subtype
            if fmt in _EXACT_HEADER_FORMATS and subtype.startswith("PCM_"):
                return (0, 0, _EMPTY) if frames == 0 else (frames, sr, 0)
            wav = f.read(dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001 - any decoder failure means the row is unusable
        return 0, 0, _UNDECODABLE
    if wav.shape[0] == 0:
        return 0, 0, _EMPTY
    if not np.isfinite(wav).all():
        return 0, 0, _NONFINITE
    return int(wav.shape[0]), sr, 0


# ------------------------------------------------------------------- lists (column-wise, per batch)


def _list_facts(column: Any, integer: bool) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(length, min, max, all finite) per list of an Arrow list column; None when the column needs the
    per-row path (not a list of numbers, or nulls inside the lists)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    typ = column.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        return None
    vtype = typ.value_type
    if integer and not pa.types.is_integer(vtype):
        return None
    if not integer and not (pa.types.is_floating(vtype) or pa.types.is_integer(vtype)):
        return None
    flat = column.flatten()
    if flat.null_count:
        return None
    lengths = pc.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    nulls = lengths < 0
    values = flat.to_numpy(zero_copy_only=False)
    values = values.astype(np.int64 if integer else np.float64, copy=False)
    n = len(lengths)
    vmin, vmax = np.zeros(n, np.int64), np.zeros(n, np.int64)
    finite = np.ones(n, bool)
    sizes = np.where(nulls, 0, lengths)
    nonempty = np.flatnonzero(sizes > 0)
    if nonempty.size:
        starts = (np.cumsum(sizes) - sizes)[nonempty]
        if integer:
            vmin[nonempty] = np.minimum.reduceat(values, starts)
            vmax[nonempty] = np.maximum.reduceat(values, starts)
        else:
            finite[nonempty] = np.logical_and.reduceat(np.isfinite(values), starts)
    return lengths, vmin, vmax, finite


def _row_facts_python(row: Mapping[str, Any], rec: np.ndarray) -> None:
    """The per-row fallback for unusual column types: ``pipeline.row_facts`` semantics, no audio."""
    tokens = row.get("speech_token")
    try:
        arr = np.asarray(tokens if tokens is not None else [], dtype=np.int64).reshape(-1)
        rec["speech_token_len"] = arr.size
        rec["speech_token_min"] = int(arr.min()) if arr.size else 0
        rec["speech_token_max"] = int(arr.max()) if arr.size else 0
    except (TypeError, ValueError, OverflowError):
        rec["speech_token_len"], rec["speech_token_min"], rec["speech_token_max"] = -1, 0, 0
    for key in ("utt_embedding", "spk_embedding"):
        try:
            emb = np.asarray(row.get(key), dtype=np.float64)
            ok = emb.ndim == 1
        except (TypeError, ValueError):
            ok = False
        rec[f"{key}_dim"] = int(emb.shape[0]) if ok else -1
        rec[f"{key}_finite"] = bool(np.isfinite(emb).all()) if ok else False


def batch_facts(batch: Any, decode_audio: bool = True) -> tuple[np.ndarray, list[str]]:
    """Facts and texts of one Arrow record batch (or table) holding ``SCAN_COLUMNS``."""
    names = batch.schema.names
    n = batch.num_rows
    out = np.zeros(n, FACT_DTYPE)
    texts = batch.column(names.index("text")).to_pylist() if "text" in names else [None] * n
    texts = [t if isinstance(t, str) else "" for t in texts]
    out["text_blank"] = [not t.strip() for t in texts]
    if decode_audio:
        audio = batch.column(names.index("audio_data")).to_pylist() if "audio_data" in names else [None] * n
        for i, data in enumerate(audio):
            out[i]["num_samples"], out[i]["sample_rate"], out[i]["audio_error"] = audio_facts(data)
    columnar = True
    tok = _list_facts(batch.column(names.index("speech_token")), True) if "speech_token" in names else None
    if tok is None:
        columnar = False
    else:
        out["speech_token_len"] = np.where(tok[0] < 0, 0, tok[0])  # a null list counts as empty, as row_facts
        out["speech_token_min"], out["speech_token_max"] = tok[1], tok[2]
    for key in ("utt_embedding", "spk_embedding"):
        emb = _list_facts(batch.column(names.index(key)), False) if key in names else None
        if emb is None:
            columnar = False
            continue
        out[f"{key}_dim"] = emb[0]  # -1 for a null list, as row_facts
        out[f"{key}_finite"] = emb[3] & (emb[0] >= 0)
    if not columnar:
        rows = batch.select([c for c in ("speech_token", "utt_embedding", "spk_embedding") if c in names]).to_pylist()
        for i, row in enumerate(rows):
            _row_facts_python(row, out[i])
    return out, texts


def scan_group_facts(path: str, pf: Any, group: int, cols: Sequence[str], batch_rows: int) -> tuple[np.ndarray, list[str]]:
    """Facts and texts of one row group. A big audio chunk (upstream's shards put a whole group's audio in one
    page) is streamed page by page (:mod:`parquet_pages`) so the scan holds megabytes, not the page."""

    def arrow_facts(columns: Sequence[str], decode_audio: bool) -> tuple[np.ndarray, list[str]]:
        parts, texts = [], []
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=list(columns),
                                     use_threads=False):
            f, t = batch_facts(batch, decode_audio=decode_audio)
            parts.append(f)
            texts += t
        return (np.concatenate(parts) if parts else np.zeros(0, FACT_DTYPE)), texts

    rest = [c for c in cols if c != "audio_data"]
    if "audio_data" in cols and rest and chunk_bytes(pf.metadata, group, "audio_data") > STREAM_MIN_BYTES:
        try:
            facts, texts = arrow_facts(rest, decode_audio=False)
            for rows, value in stream_values(path, pf.metadata, group, "audio_data", range(len(facts))):
                fact = audio_facts(value)
                for r in rows:
                    facts[r]["num_samples"], facts[r]["sample_rate"], facts[r]["audio_error"] = fact
            return facts, texts
        except Unsupported:
            pass  # read the group with Arrow
    return arrow_facts(cols, decode_audio=True)


# ---------------------------------------------------------------------------------- whole shards


def has_fact_columns(schema: Any) -> bool:
    meta = schema.metadata or {}
    return meta.get(FACTS_META_KEY) == str(FACTS_VERSION).encode() and all(c in schema.names for c in FACT_COLUMNS)


# ------------------------------------------------------------------------------ writing (prepare)


def append_fact_columns(table: Any, facts: Any) -> Any:
    """``table`` with the ``cosytrain_*`` columns of ``facts`` (a ``FACT_DTYPE`` record array, or arrays by
    field name) and the schema tag :func:`has_fact_columns` checks: what ``prepare`` and ``reshard`` write."""
    import pyarrow as pa

    for name in STORED_FIELDS:
        table = table.append_column(COLUMN_PREFIX + name, pa.array(np.asarray(facts[name]).astype(FACT_DTYPE[name])))
    meta = dict(table.schema.metadata or {})
    meta[FACTS_META_KEY] = str(FACTS_VERSION).encode()
    return table.replace_schema_metadata(meta)


def facts_for_rows(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The facts of rows that carry ``num_samples`` and ``sample_rate`` (prepare's), no audio decoded."""
    import pyarrow as pa

    n = len(rows)
    facts = np.zeros(n, FACT_DTYPE)
    facts["num_samples"] = [int(r["num_samples"]) for r in rows]
    facts["sample_rate"] = [int(r["sample_rate"]) for r in rows]
    table = pa.Table.from_pydict({
        "speech_token": pa.array([[int(x) for x in r["speech_token"]] for r in rows], pa.list_(pa.int64())),
        "utt_embedding": pa.array([[float(x) for x in r["utt_embedding"]] for r in rows], pa.list_(pa.float64())),
        "spk_embedding": pa.array([[float(x) for x in r["spk_embedding"]] for r in rows], pa.list_(pa.float64())),
    })
    lists, _ = batch_facts(table, decode_audio=False)
    for name in STORED_FIELDS:
        if name not in ("num_samples", "sample_rate", "audio_error"):
            facts[name] = lists[name]
    return facts
