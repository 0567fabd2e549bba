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

import io
from typing import Any, BinaryIO, Iterator, Mapping, Optional, Sequence

import numpy as np

CHUNK = 1 << 20  # bytes read from the file / decompressed at a time
SNAPPY_FRAGMENT = 1 << 16  # the reference compressor never copies across these boundaries
MAX_INDEX_PAGE = 64 << 20  # a dictionary-index page is small; refuse to decode a huge one whole

PAGE_DATA, PAGE_INDEX, PAGE_DICTIONARY, PAGE_DATA_V2 = 0, 1, 2, 3
ENC_PLAIN, ENC_PLAIN_DICTIONARY, ENC_RLE, ENC_RLE_DICTIONARY = 0, 2, 3, 8
STREAM_CODECS = {"GZIP": "gzip", "ZSTD": "zstd"}


class Unsupported(Exception):
    """The column chunk uses a layout this reader does not handle: read it with Arrow instead."""


# ------------------------------------------------------------------------- thrift compact protocol
class _Thrift:
    """Just enough of Thrift's compact protocol to read a Parquet ``PageHeader`` into nested dicts."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        b = self.buf[self.pos]  # IndexError: the header goes on past the bytes read so far
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = value = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def value(self, kind: int) -> Any:
        if kind in (1, 2):
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            self.pos += 8
            return None
        if kind == 8:
            n = self.varint()
            if self.pos + n > len(self.buf):
                raise IndexError("binary past the buffer")
            self.pos += n
            return None  # statistics' min/max: not needed
        if kind in (9, 10):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return [self.byte() == 1 if elem in (1, 2) else self.value(elem) for _ in range(size)]
        if kind == 11:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.value(types >> 4)
                    self.value(types & 0x0F)
            return None
        if kind == 12:
            return self.struct()
        raise Unsupported(f"thrift type {kind} in a page header")

    def struct(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return out
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self.zigzag()
            out[last] = self.value(kind)


def read_page_header(f: BinaryIO, offset: int) -> tuple[dict[int, Any], int]:
    """The ``PageHeader`` at ``offset`` and its length in bytes."""
    size = 256
    while True:
        f.seek(offset)
        buf = f.read(size)
        try:
            reader = _Thrift(buf)
            return reader.struct(), reader.pos
        except IndexError:
            if len(buf) < size or size > (64 << 20):
                raise Unsupported(f"truncated page header at byte {offset}") from None
            size *= 4


# ------------------------------------------------------------------------------ byte streams
def _file_pieces(f: BinaryIO, offset: int, length: int) -> Iterator[bytes]:
    f.seek(offset)
    left = length
    while left > 0:
        piece = f.read(min(CHUNK, left))
        if not piece:
            raise Unsupported(f"file ends inside a page at byte {offset + length - left}")
        left -= len(piece)
        yield piece


class _Slice(io.RawIOBase):
    """A read-only window of a file, for Arrow's streaming decompressors."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        self.f, self.at, self.left = f, offset, length

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        self.f.seek(self.at)
        data = self.f.read(n)
        b[:len(data)] = data
        self.at += len(data)
        self.left -= len(data)
        return len(data)


def _snappy_pieces(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress one raw snappy block a megabyte at a time.

    The elements are scanned (tags only) to find cuts at 64 KiB output boundaries; the elements between two
    cuts are decompressed by Arrow's snappy as a block of their own (a length varint put in front)."""
    import pyarrow as pa

    buf = bytearray()
    feed = iter(pieces)

    def need(n: int) -> bool:
        while len(buf) < n:
            piece = next(feed, None)
            if piece is None:
                return False
            buf.extend(piece)
        return True

    pos = shift = total = 0
    while True:  # the block's uncompressed length
        if not need(pos + 1):
            raise Unsupported("empty snappy block")
        b = buf[pos]
        pos += 1
        total |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    del buf[:pos]
    start, pos, out, cut_out = 0, 0, 0, 0
    while out < total:
        if not need(pos + 5) and not need(pos + 1):
            raise Unsupported("snappy block ends early")
        tag = buf[pos]
        kind = tag & 3
        if kind == 0:
            n = tag >> 2
            if n < 60:
                head = 1
            else:
                head = 1 + n - 59
                if not need(pos + head):
                    raise Unsupported("snappy block ends early")
                n = int.from_bytes(buf[pos + 1:pos + head], "little")
            length, step = n + 1, head + n + 1
        elif kind == 1:
            length, step = 4 + ((tag >> 2) & 7), 2
        elif kind == 2:
            length, step = (tag >> 2) + 1, 3
        else:
            length, step = (tag >> 2) + 1, 5
        if not need(pos + step):
            raise Unsupported("snappy block ends early")
        pos += step
        out += length
        if out >= total or (out % SNAPPY_FRAGMENT == 0 and out - cut_out >= CHUNK):
            n_out = out - cut_out
            varint = bytearray()
            v = n_out
            while v >= 0x80:
                varint.append((v & 0x7F) | 0x80)
                v >>= 7
            varint.append(v)
            try:
                block = pa.decompress(bytes(varint) + bytes(buf[start:pos]), decompressed_size=n_out,
                                      codec="snappy", asbytes=True)
            except (OSError, ValueError) as ex:
                raise Unsupported(f"snappy block copies across a 64 KiB fragment ({ex})") from None
            yield block
            del buf[:pos]
            start = pos = 0
            cut_out = out


def _decompressed(f: BinaryIO, offset: int, length: int, codec: str) -> Iterator[bytes]:
    if codec == "UNCOMPRESSED":
        yield from _file_pieces(f, offset, length)
    elif codec == "SNAPPY":
        yield from _snappy_pieces(_file_pieces(f, offset, length))
    elif codec in STREAM_CODECS:
        import pyarrow as pa

        stream = pa.CompressedInputStream(pa.PythonFile(_Slice(f, offset, length), mode="r"), STREAM_CODECS[codec])
        while True:
            piece = stream.read(CHUNK)
            if not piece:
                return
            yield piece
    else:
        raise Unsupported(f"codec {codec}")


class _Bytes:
    """Read exact byte counts from a stream of pieces, or skip them without keeping them."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces, self.buf, self.at = pieces, b"", 0

    def _fill(self) -> bool:
        piece = next(self.pieces, None)
        if piece is None:
            return False
        self.buf, self.at = self.buf[self.at:] + piece if self.at < len(self.buf) else piece, 0
        return True

    def read(self, n: int) -> bytes:
        if self.at + n <= len(self.buf):
            self.at += n
            return self.buf[self.at - n:self.at]
        parts = [self.buf[self.at:]]
        got = len(parts[0])
        self.buf, self.at = b"", 0
        while got < n:
            if not self._fill():
                raise Unsupported("page ends inside a value")
            take = self.buf[:n - got]
            parts.append(take)
            got += len(take)
            self.at = len(take)
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n > 0:
            avail = len(self.buf) - self.at
            if avail >= n:
                self.at += n
                return
            n -= avail
            self.buf, self.at = b"", 0
            if not self._fill():
                raise Unsupported("page ends inside a value")


# ------------------------------------------------------------------------------ level / index runs
def rle_hybrid(data: bytes, bit_width: int, count: int) -> np.ndarray:
    """Parquet's RLE / bit-packed hybrid encoding: the first ``count`` values."""
    out = np.zeros(count, np.int64)
    if bit_width == 0:
        return out
    width_bytes = (bit_width + 7) // 8
    pos = got = 0
    while got < count:
        if pos >= len(data):
            raise Unsupported("RLE run ends early")
        shift = head = 0
        while True:
            b = data[pos]
            pos += 1
            head |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if head & 1:  # bit-packed: (head >> 1) groups of 8 values
            n = (head >> 1) * 8
            raw = np.frombuffer(data, np.uint8, (head >> 1) * bit_width, pos)
            pos += (head >> 1) * bit_width
            bits = np.unpackbits(raw, bitorder="little").reshape(n, bit_width).astype(np.int64)
            values = bits @ (1 << np.arange(bit_width, dtype=np.int64))
        else:
            n = head >> 1
            values = np.full(n, int.from_bytes(data[pos:pos + width_bytes], "little"), np.int64)
            pos += width_bytes
        take = min(n, count - got)
        out[got:got + take] = values[:take]
        got += take
    return out


def _levels_v1(data: _Bytes, max_def: int, count: int) -> np.ndarray:
    """Definition levels of a v1 data page (length-prefixed RLE), or all-present when the column is required."""
    if max_def == 0:
        return np.ones(count, bool)
    n = int.from_bytes(data.read(4), "little")
    return rle_hybrid(data.read(n), max_def.bit_length(), count) == max_def


# ------------------------------------------------------------------------------------ the reader
def column_chunk_bounds(metadata: Any, row_group: int, column: str) -> tuple[int, int, str, int]:
    """(first byte, byte length, codec, column index) of ``column``'s chunk in ``row_group``."""
    names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    if column not in names:
        raise Unsupported(f"no flat column {column!r}")
    index = names.index(column)
    desc = metadata.schema.column(index)
    if desc.physical_type != "BYTE_ARRAY" or desc.max_repetition_level != 0:
        raise Unsupported(f"{column} is {desc.physical_type}, repetition {desc.max_repetition_level}")
    chunk = metadata.row_group(row_group).column(index)
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
        start = min(start, chunk.dictionary_page_offset)
    return start, chunk.total_compressed_size, chunk.compression, index


def stream_values(path: str, metadata: Any, row_group: int, column: str,
                  rows: Sequence[int]) -> Iterator[tuple[list[int], Optional[bytes]]]:
    """``(rows_of_the_group, value)`` for every wanted row of ``column`` in ``row_group`` (``None``: null).

    Rows come in file order (a dictionary value once for all the wanted rows that share it). Only the
    pages up to the last wanted row are read. Raises :class:`Unsupported` (see the module docstring)."""
    max_def = metadata.schema.column(column_chunk_bounds(metadata, row_group, column)[3]).max_definition_level
    wanted = np.unique(np.asarray(rows, np.int64))
    if not len(wanted):
        return
    start, length, codec, _ = column_chunk_bounds(metadata, row_group, column)
    last = int(wanted[-1])
    with open(path, "rb") as f:
        pages = _pages(f, start, start + length)
        dictionary: Optional[tuple[int, int, int]] = None  # (body offset, body length, values)
        dict_rows: dict[int, list[int]] = {}  # dictionary index -> wanted rows
        plain_pages: list[tuple[int, dict[int, Any], int, int, int, np.ndarray]] = []
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
                    present, indices = _dictionary_page(f, kind, header, sub, body, body_len, codec, max_def,
                                                        num_rows)
                    value_of_row = np.cumsum(present) - 1
                    for r in page_rows.tolist():
                        if present[r]:
                            dict_rows.setdefault(int(indices[value_of_row[r]]), []).append(row0 + r)
                        else:
                            yield [row0 + r], None
                elif encoding == ENC_PLAIN:
                    plain_pages.append((kind, sub, body, body_len, row0, page_rows))
                else:
                    raise Unsupported(f"data page encoding {encoding}")
            row0 += num_rows
            if row0 > last:
                break
        if dict_rows:
            if dictionary is None:
                raise Unsupported("dictionary-encoded page without a dictionary page")
            body, body_len, count = dictionary
            values = _Bytes(_decompressed(f, body, body_len, codec))
            yield from _plain_values(values, sorted(dict_rows), count, dict_rows)
        for kind, sub, body, body_len, row0, page_rows in plain_pages:
            yield from _plain_page(f, kind, sub, body, body_len, codec, max_def, row0, page_rows)


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


def _dictionary_page(f: BinaryIO, kind: int, header: dict[int, Any], sub: dict[int, Any], body: int,
                     body_len: int, codec: str, max_def: int, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(present mask, dictionary index of each present value) of a dictionary-encoded data page."""
    if int(header.get(2, 0)) > MAX_INDEX_PAGE:
        raise Unsupported("dictionary-index page too large to decode whole")
    if kind == PAGE_DATA:
        data = _Bytes(_decompressed(f, body, body_len, codec))
        present = _levels_v1(data, max_def, num_rows)
        rest = b"".join([data.buf[data.at:], *data.pieces])
    else:
        present, levels = _v2_levels(f, sub, body, max_def, num_rows)
        compressed = sub.get(7, True)
        pieces = _decompressed(f, body + levels, body_len - levels, codec if compressed else "UNCOMPRESSED")
        rest = b"".join(pieces)
    n_values = int(present.sum())
    if not rest:
        return present, np.zeros(0, np.int64)
    return present, rle_hybrid(rest[1:], rest[0], n_values)


def _plain_values(values: _Bytes, indices: Sequence[int], count: int,
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


def _plain_page(f: BinaryIO, kind: int, sub: dict[int, Any], body: int, body_len: int, codec: str, max_def: int,
                row0: int, page_rows: np.ndarray) -> Iterator[tuple[list[int], Optional[bytes]]]:
    """Wanted rows of a PLAIN data page (v1 or v2), streamed."""
    num = int(sub.get(3 if kind == PAGE_DATA_V2 else 1, 0))
    if kind == PAGE_DATA_V2:
        present, levels = _v2_levels(f, sub, body, max_def, num)
        compressed = sub.get(7, True)
        data = _Bytes(_decompressed(f, body + levels, body_len - levels, codec if compressed else "UNCOMPRESSED"))
    else:
        data = _Bytes(_decompressed(f, body, body_len, codec))
        present = _levels_v1(data, max_def, num)
    value_of_row = np.cumsum(present) - 1
    nulls = [[row0 + int(r)] for r in page_rows.tolist() if not present[r]]
    for rows in nulls:
        yield rows, None
    want = {int(value_of_row[r]): [row0 + int(r)] for r in page_rows.tolist() if present[r]}
    yield from _plain_values(data, sorted(want), int(present.sum()), want)
