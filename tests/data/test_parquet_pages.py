"""The page-streaming column reader returns exactly what Arrow returns, for every layout it accepts."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosytrain.data import parquet_bytes, parquet_pages
from cosytrain.data.parquet_pages import Unsupported, rle_hybrid, stream_values


def _values(n: int, seed: int, nulls: bool = False, dupes: bool = False) -> list:
    """Audio-like bytes: a tone (snappy finds copies), noise (literals) and silence, 1-6 KB each."""
    rng = np.random.default_rng(seed)
    out: list = []
    for i in range(n):
        k = int(rng.integers(500, 3000))
        tone = (np.sin(np.arange(k) * (0.05 + 0.01 * (i % 7))) * 8000).astype("<i2")
        noise = rng.integers(-3000, 3000, k // 2).astype("<i2")
        out.append(b"RIFF" + tone.tobytes() + bytes(k // 3) + noise.tobytes())
        if dupes and i % 3 == 2:
            out[-1] = out[i - 2]
        if nulls and i % 5 == 1:
            out[-1] = None
    return out


def _write(path: Path, values: list, **kw) -> str:
    table = pa.table({"utt": [f"u{i}" for i in range(len(values))], "audio_data": pa.array(values, pa.binary()),
                      "text": ["t"] * len(values)})
    pq.write_table(table, path, **kw)
    return str(path)


def _streamed(path: str, group: int, rows: list[int]) -> dict[int, bytes | None]:
    md = pq.ParquetFile(path).metadata
    got: dict[int, bytes | None] = {}
    for rs, value in stream_values(path, md, group, "audio_data", rows):
        for r in rs:
            assert r not in got
            got[r] = value
    return got


LAYOUTS = {
    "pyarrow default: one group, all audio in the dictionary page": dict(),
    "dictionary fallback to PLAIN pages (> write batch)": dict(write_batch_size=100, data_page_size=20_000),
    "plain, uncompressed": dict(use_dictionary=False, compression="none", data_page_size=50_000),
    "plain, snappy, one page": dict(use_dictionary=False, write_batch_size=5000),
    "plain, gzip": dict(use_dictionary=False, compression="gzip", data_page_size=200_000),
    "dictionary, zstd": dict(compression="zstd"),
    "data page v2, plain, snappy": dict(use_dictionary=False, data_page_version="2.0", data_page_size=100_000),
    "data page v2, dictionary, uncompressed": dict(data_page_version="2.0", compression="none"),
    "several row groups": dict(row_group_size=170),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("content", ["plain", "nulls+dupes"])
def test_streamed_values_equal_arrows(tmp_path: Path, monkeypatch, layout: str, content: str) -> None:
    monkeypatch.setattr(parquet_bytes, "CHUNK", 1 << 17)  # several snappy cuts per page at this size
    values = _values(600, seed=len(layout), nulls=content != "plain", dupes=content != "plain")
    path = _write(tmp_path / "s.parquet", values, **LAYOUTS[layout])
    pf = pq.ParquetFile(path)
    rng = random.Random(layout + content)
    for group in range(pf.metadata.num_row_groups):
        want = pf.read_row_group(group, columns=["audio_data"]).column(0).to_pylist()
        n = len(want)
        for rows in ([0], [n - 1], list(range(n)), sorted(rng.sample(range(n), min(n, 37))), [n // 2, 3, n // 2]):
            got = _streamed(path, group, rows)
            assert got == {r: want[r] for r in rows}


def test_only_the_page_holding_a_wanted_row_is_decoded(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path / "s.parquet", _values(400, seed=1), use_dictionary=False, write_batch_size=20,
                  data_page_size=20_000)
    start, length, _, _ = parquet_pages.column_chunk_bounds(pq.ParquetFile(path).metadata, 0, "audio_data")
    with open(path, "rb") as f:
        bodies = [body for _, _, body, _ in parquet_pages._pages(f, start, start + length)]
    assert len(bodies) > 5  # the file really has many pages, so decoding one is a choice
    decoded: list[int] = []
    real = parquet_pages.decompressed

    def spy(f, offset, length, codec):
        decoded.append(offset)
        return real(f, offset, length, codec)

    monkeypatch.setattr(parquet_pages, "decompressed", spy)
    _streamed(path, 0, [5])
    assert decoded == [bodies[0]]
    decoded.clear()
    _streamed(path, 0, [399])
    assert decoded == [bodies[-1]]


def test_unsupported_layouts_are_refused_not_misread(tmp_path: Path) -> None:
    path = _write(tmp_path / "lz4.parquet", _values(50, seed=2), compression="lz4")
    with pytest.raises(Unsupported, match="codec"):
        _streamed(path, 0, [3])
    lists = tmp_path / "list.parquet"
    pq.write_table(pa.table({"audio_data": [[b"a"], [b"b"]]}), lists)
    with pytest.raises(Unsupported):
        _streamed(str(lists), 0, [0])


def test_snappy_copy_across_a_cut_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A snappy block whose copy reaches back past a cut (not what the reference compressor writes, but legal
    snappy) must be refused, never decoded into wrong bytes."""
    # hand-made block: literals of 65,536 and 4,464 bytes, then a copy 65,000 bytes back (across the cut at 65,536)
    rng = random.Random(0)
    total = 65_536 + 4_464 + 64
    block = bytearray(parquet_bytes.varint_bytes(total))
    for size in (65_536, 4_464):
        block += bytes([61 << 2]) + (size - 1).to_bytes(2, "little") + rng.randbytes(size)
    block += bytes([(63 << 2) | 2]) + (65_000).to_bytes(2, "little")  # copy 64 bytes from 65,000 back
    assert pa.decompress(bytes(block), decompressed_size=total, codec="snappy") is not None  # valid snappy
    monkeypatch.setattr(parquet_bytes, "CHUNK", 1)
    with pytest.raises(Unsupported, match="fragment"):
        list(parquet_bytes.snappy_pieces(iter([bytes(block)])))
    # and without a cut before the copy, the same block decodes exactly
    monkeypatch.setattr(parquet_bytes, "CHUNK", 1 << 20)
    whole = b"".join(parquet_bytes.snappy_pieces(iter([bytes(block[i:i + 999]) for i in range(0, len(block), 999)])))
    assert whole == pa.decompress(bytes(block), decompressed_size=total, codec="snappy", asbytes=True)


def test_rle_hybrid_mixes_runs_and_bit_packing() -> None:
    # RLE run of 5 x value 3 (width 2), then one bit-packed group of 8 values 0..3,0..3
    data = bytes([5 << 1, 3]) + bytes([(1 << 1) | 1]) + bytes([0b11100100, 0b11100100])
    assert rle_hybrid(data, 2, 13).tolist() == [3] * 5 + [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(Unsupported):
        rle_hybrid(data, 2, 20)
    with pytest.raises(Unsupported):  # a bit-packed run cut short
        rle_hybrid(data[:-1], 2, 13)
