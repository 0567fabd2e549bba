"""Parquet's byte-level pieces, read a megabyte at a time: page headers (Thrift compact protocol), codecs,
PLAIN byte arrays and the RLE / bit-packed hybrid runs. Used by :mod:`cosytrain.data.parquet_pages`.

Why hand-written: Arrow decodes these only as part of reading a whole page (see ``parquet_pages``); no
Python package exposes them piecewise. Raw snappy has no streaming decoder anywhere, so a block is cut at
the 64 KiB fragments that the reference compressor (the one Arrow and parquet-mr use) never copies
across, and each piece is decompressed by Arrow's snappy; a block that does copy across a cut is refused.
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO, Iterator

import numpy as np

CHUNK = 1 << 20  # bytes read from the file / decompressed at a time
SNAPPY_FRAGMENT = 1 << 16  # the reference compressor never copies across these boundaries
STREAM_CODECS = {"GZIP": "gzip", "ZSTD": "zstd"}


def read_varint(buf: Any, pos: int) -> tuple[int, int]:
    """(value, position after it) of the unsigned LEB128 varint at ``pos`` (IndexError past the end)."""
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def varint_bytes(value: int) -> bytes:
    """``value`` as an unsigned LEB128 varint (snappy's length preamble)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


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
        value, self.pos = read_varint(self.buf, self.pos)
        return value

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
def file_pieces(f: BinaryIO, offset: int, length: int) -> Iterator[bytes]:
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


def snappy_pieces(pieces: Iterator[bytes]) -> Iterator[bytes]:
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

    need(10)
    try:
        total, pos = read_varint(buf, 0)  # the block's uncompressed length
    except IndexError:
        raise Unsupported("empty snappy block") from None
    del buf[:pos]
    pos = out = cut_out = 0
    while out < total:
        if not need(pos + 1):
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
            try:
                block = pa.decompress(varint_bytes(n_out) + bytes(buf[:pos]), decompressed_size=n_out,
                                      codec="snappy", asbytes=True)
            except (OSError, ValueError) as ex:
                raise Unsupported(f"snappy block copies across a 64 KiB fragment ({ex})") from None
            yield block
            del buf[:pos]
            pos, cut_out = 0, out


def decompressed(f: BinaryIO, offset: int, length: int, codec: str) -> Iterator[bytes]:
    if codec == "UNCOMPRESSED":
        yield from file_pieces(f, offset, length)
    elif codec == "SNAPPY":
        yield from snappy_pieces(file_pieces(f, offset, length))
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


class ByteReader:
    """Read exact byte counts from a stream of pieces, or skip them without keeping them."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces, self.buf, self.at = pieces, b"", 0

    def _fill(self) -> bool:
        piece = next(self.pieces, None)
        if piece is None:
            return False
        self.buf, self.at = piece, 0  # only called once the current piece is used up
        return True

    def rest(self) -> bytes:
        """Everything not read yet, whole (for a small page)."""
        return b"".join([self.buf[self.at:], *self.pieces])

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
        try:
            head, pos = read_varint(data, pos)
        except IndexError:
            raise Unsupported("RLE run ends early") from None
        if head & 1:  # bit-packed: (head >> 1) groups of 8 values
            n = (head >> 1) * 8
            if pos + (head >> 1) * bit_width > len(data):
                raise Unsupported("bit-packed run ends early")
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
