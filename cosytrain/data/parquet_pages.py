"""Chosen values of one BYTE_ARRAY column of a Parquet row group, streamed in bounded memory.

Why hand-written: Arrow (the only Parquet reader cosytrain depends on) decompresses and decodes a page
whole, and pyarrow puts a whole row group's audio in ONE page when the group is written in one call, as
upstream's ``tools/make_parquet_list.py`` does (``df.to_parquet``: 1,000 rows per shard; dictionary
encoding is tried first, so all the audio lands in the dictionary page). Reading one utterance of such a
shard of 5-s audio made Arrow hold about three copies of 160 MB (compressed page, decompressed page,
array). This module walks the column chunk page by page and decompresses it a megabyte at a time, keeping
only the values asked for, so what a read holds does not depend on the row-group size.

Handled, as parquet-cpp (pyarrow, pandas) and parquet-mr write them: PLAIN dictionary pages, data pages
v1 and v2 with PLAIN or (RLE_)DICTIONARY values, optional columns with nulls, codecs UNCOMPRESSED, SNAPPY
(raw blocks cut at the 64 KiB fragments the reference compressor never copies across; a block that
does reference across a cut is refused, not mis-read), GZIP and ZSTD (Arrow's streaming decompressors).
Anything else (repeated columns, other encodings or codecs) raises :class:`Unsupported` before a value is
returned, or at the first value that cannot be decoded, and the caller reads the group with Arrow.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Iterator, Mapping, Optional, Sequence

import numpy as np

from cosytrain.data.parquet_bytes import ByteReader, Unsupported, decompressed, read_page_header, rle_hybrid

STREAM_MIN_BYTES = 8 << 20  # readers stream a column chunk larger than this (uncompressed) instead of using Arrow
MAX_INDEX_PAGE = 64 << 20  # a dictionary-index page is small; refuse to decode a huge one whole

PAGE_DATA, PAGE_INDEX, PAGE_DICTIONARY, PAGE_DATA_V2 = 0, 1, 2, 3
ENC_PLAIN, ENC_PLAIN_DICTIONARY, ENC_RLE, ENC_RLE_DICTIONARY = 0, 2, 3, 8


def _levels_v1(data: ByteReader, max_def: int, count: int) -> np.ndarray:
    """Definition levels of a v1 data page (length-prefixed RLE), or all-present when the column is required."""
    if max_def == 0:
        return np.ones(count, bool)
    n = int.from_bytes(data.read(4), "little")
    return rle_hybrid(data.read(n), max_def.bit_length(), count) == max_def


# ------------------------------------------------------------------------------------ the reader
def _column_index(metadata: Any, column: str) -> Optional[int]:
    for i in range(metadata.num_columns):
        if metadata.schema.column(i).path == column:
            return i
    return None


def column_chunk_bounds(metadata: Any, row_group: int, column: str) -> tuple[int, int, str, int]:
    """(first byte, byte length, codec, column index) of ``column``'s chunk in ``row_group``."""
    index = _column_index(metadata, column)
    if index is None:
        raise Unsupported(f"no flat column {column!r}")
    desc = metadata.schema.column(index)
    if desc.physical_type != "BYTE_ARRAY" or desc.max_repetition_level != 0:
        raise Unsupported(f"{column} is {desc.physical_type}, repetition {desc.max_repetition_level}")
    chunk = metadata.row_group(row_group).column(index)
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
        start = min(start, chunk.dictionary_page_offset)
    return start, chunk.total_compressed_size, chunk.compression, index


def chunk_bytes(metadata: Any, row_group: int, column: str) -> int:
    """Uncompressed bytes of ``column``'s chunk in ``row_group`` (0 when there is no such flat column)."""
    index = _column_index(metadata, column)
    return 0 if index is None else int(metadata.row_group(row_group).column(index).total_uncompressed_size)


def stream_values(path: str, metadata: Any, row_group: int, column: str,
                  rows: Sequence[int]) -> Iterator[tuple[list[int], Optional[bytes]]]:
    """``(rows_of_the_group, value)`` for every wanted row of ``column`` in ``row_group`` (``None``: null).

    Rows come in file order (a dictionary value once for all the wanted rows that share it). Only the
    pages up to the last wanted row are read. Raises :class:`Unsupported` (see the module docstring)."""
    wanted = np.unique(np.asarray(rows, np.int64))
    if not len(wanted):
        return
    start, length, codec, index = column_chunk_bounds(metadata, row_group, column)
    max_def = metadata.schema.column(index).max_definition_level
    last = int(wanted[-1])
    with open(path, "rb") as f:
        pages = _pages(f, start, start + length)
        dictionary: Optional[tuple[int, int, int]] = None  # (body offset, body length, values)
        dict_rows: dict[int, list[int]] = {}  # dictionary index -> wanted rows
        plain_pages: list[tuple[int, dict[int, Any], int, int, int, int, np.ndarray]] = []
        row0 = 0
        for kind, header, body, body_len in pages:
            if kind == PAGE_DICTIONARY:
                dh = header.get(7) or {}
                if dh.get(2, ENC_PLAIN) not in (ENC_PLAIN, ENC_PLAIN_DICTIONARY):
                    raise Unsupported(f"dictionary encoding {dh.get(2)}")
                dictionary = (body, body_len, int(dh.get(1, 0)))
                continue
            if kind not in (PAGE_DATA, PAGE_DATA_V2):
                continue
            sub = header.get(5 if kind == PAGE_DATA else 8) or {}
            num_rows = int(sub.get(3 if kind == PAGE_DATA_V2 else 1, 0))
            page_rows = wanted[(wanted >= row0) & (wanted < row0 + num_rows)] - row0
            if len(page_rows):
                encoding = int(sub.get(4 if kind == PAGE_DATA_V2 else 2, -1))
                if encoding in (ENC_PLAIN_DICTIONARY, ENC_RLE_DICTIONARY):
                    if int(header.get(2, 0)) > MAX_INDEX_PAGE:
                        raise Unsupported("dictionary-index page too large to decode whole")
                    present, data = _page_values(f, kind, sub, body, body_len, codec, max_def, num_rows)
                    rest = data.rest()
                    indices = rle_hybrid(rest[1:], rest[0], int(present.sum())) if rest else np.zeros(0, np.int64)
                    value_of_row = np.cumsum(present) - 1
                    for r in page_rows.tolist():
                        if present[r]:
                            dict_rows.setdefault(int(indices[value_of_row[r]]), []).append(row0 + r)
                        else:
                            yield [row0 + r], None
                elif encoding == ENC_PLAIN:
                    plain_pages.append((kind, sub, body, body_len, num_rows, row0, page_rows))
                else:
                    raise Unsupported(f"data page encoding {encoding}")
            row0 += num_rows
            if row0 > last:
                break
        if dict_rows:
            if dictionary is None:
                raise Unsupported("dictionary-encoded page without a dictionary page")
            body, body_len, count = dictionary
            values = ByteReader(decompressed(f, body, body_len, codec))
            yield from _plain_values(values, sorted(dict_rows), count, dict_rows)
        for kind, sub, body, body_len, num_rows, row0, page_rows in plain_pages:
            present, data = _page_values(f, kind, sub, body, body_len, codec, max_def, num_rows)
            value_of_row = np.cumsum(present) - 1
            want: dict[int, list[int]] = {}
            for r in page_rows.tolist():
                if present[r]:
                    want[int(value_of_row[r])] = [row0 + r]
                else:
                    yield [row0 + r], None
            yield from _plain_values(data, sorted(want), int(present.sum()), want)


def _pages(f: BinaryIO, at: int, end: int) -> Iterator[tuple[int, dict[int, Any], int, int]]:
    while at < end:
        header, size = read_page_header(f, at)
        kind, body_len = int(header.get(1, -1)), int(header.get(3, -1))
        if body_len < 0 or kind < 0:
            raise Unsupported(f"page header at byte {at} without type or size")
        yield kind, header, at + size, body_len
        at += size + body_len


def _v2_levels(f: BinaryIO, sub: dict[int, Any], body: int, max_def: int, count: int) -> tuple[np.ndarray, int]:
    """(present mask, bytes of levels) of a v2 data page (levels are never compressed in v2)."""
    rep_len, def_len = int(sub.get(6, 0)), int(sub.get(5, 0))
    if max_def == 0:
        return np.ones(count, bool), rep_len + def_len
    f.seek(body + rep_len)
    present = rle_hybrid(f.read(def_len), max_def.bit_length(), count) == max_def
    return present, rep_len + def_len


def _page_values(f: BinaryIO, kind: int, sub: dict[int, Any], body: int, body_len: int, codec: str, max_def: int,
                 num_rows: int) -> tuple[np.ndarray, ByteReader]:
    """(present mask, reader of the values section) of a v1 or v2 data page."""
    if kind == PAGE_DATA_V2:
        present, levels = _v2_levels(f, sub, body, max_def, num_rows)
        codec = codec if sub.get(7, True) else "UNCOMPRESSED"
        return present, ByteReader(decompressed(f, body + levels, body_len - levels, codec))
    data = ByteReader(decompressed(f, body, body_len, codec))
    return _levels_v1(data, max_def, num_rows), data


def _plain_values(values: ByteReader, indices: Sequence[int], count: int,
                  rows_of: Mapping[int, list[int]]) -> Iterator[tuple[list[int], bytes]]:
    """The PLAIN byte arrays at sorted value ``indices`` of a stream of ``count`` values."""
    at = 0
    for index in indices:
        if index >= count:
            raise Unsupported(f"value {index} of a page of {count}")
        while at < index:
            values.skip(int.from_bytes(values.read(4), "little"))
            at += 1
        yield rows_of[index], values.read(int.from_bytes(values.read(4), "little"))
        at += 1
