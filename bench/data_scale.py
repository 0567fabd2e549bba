"""Data at scale: index build, time to the first batch, memory and throughput from 10k to 1M utterances.

Synthetic corpora (short audio: the point is the row count) are written in two layouts:

* ``upstream``: what upstream's ``tools/make_parquet_list.py`` writes (1,000 rows per shard, one row group
  per shard, no cosytrain columns): the first launch scans the shards;
* ``cosytrain``: what ``prepare`` writes (64-row groups plus the ``cosytrain_*`` fact columns): the first
  launch reads those columns, no audio.

Each launch is a fresh process (``CosyDataModule`` as a recipe uses it, rank 0 of 1, 0 loader workers):
``first`` with an empty index cache, ``second`` with the cache the first one left. Columns: ``index s``
setup (the index); ``ready s`` from setup to the first batch (index, epoch plan, first row-group read
and features); ``1st batch s`` from process start (Python, torch and Lightning imports included) to it;
``index MB`` RSS added by setup; ``loader MB`` RSS added by streaming ``--batches`` batches (row cache,
features, batches); ``peak MB`` the process's peak RSS; ``utt/s`` steady throughput after the first batch.
The upstream layout's first launch is repeated with 1 and then 2 index processes (a fresh cache each
time; the order is alternated so the page cache favours neither). Extra tables: the same row
count with 0.3-s and 5-s audio (first-launch time must not follow the audio size for ``prepare``'s
shards); loader memory with 1,000-row versus 64-row groups of 5-s audio; and the index + plan memory
of 10 M utterances (synthetic facts, no shards).

    python bench/data_scale.py [--rows 10000,100000,1000000] [--root DIR] [--keep] [--skip_10m]

Disk: about 9.5 GB per layout per million rows of 0.2-s audio; the corpora are deleted at the end
unless ``--keep``. Times are with a warm page cache (the corpus was just written).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
SR = 16000
SHARD_ROWS = 1000


# ------------------------------------------------------------------------------------------ corpus


def _wav_header(frames: int) -> bytes:
    """The 44-byte header of a mono 16-bit PCM WAV of ``frames`` samples at ``SR``."""
    import struct

    data = 2 * frames
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, SR, 2 * SR, 2, 16)
            + b"data" + struct.pack("<I", data))


def _audio_column(rng: np.random.Generator, n: int, seconds: float) -> tuple[list[bytes], np.ndarray]:
    """``n`` distinct WAV files of about ``seconds`` (every row's bytes differ, as real audio does, so
    parquet cannot dictionary-encode the column away) and their sample counts."""
    frames = (SR * seconds * (1 + 0.05 * rng.integers(0, 8, n))).astype(np.int64)
    noise = (rng.standard_normal(int(frames.sum()) + n) * 3000).astype("<i2")
    out, at = [], 0
    for f in frames.tolist():
        out.append(_wav_header(f) + noise[at:at + f].tobytes())
        at += f + 1
    return out, frames


def _write_shard(args: tuple[str, int, int, float, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cosytrain.data import shard_facts as F
    from cosytrain.data import shards as S

    path, start, n, seconds, layout = args
    rng = np.random.default_rng(start)
    audio, samples = _audio_column(rng, n, seconds)
    ntok = np.ceil(samples / SR * 50).astype(np.int64)
    tok_off = np.concatenate([[0], np.cumsum(ntok)]).astype(np.int32)
    tokens = rng.integers(0, 4096, int(tok_off[-1]))
    emb_off = np.arange(0, (n + 1) * 192, 192, dtype=np.int32)
    cols = {
        "utt": pa.array([f"utt{start + i:09d}" for i in range(n)]),
        "wav": pa.array([f"/corpus/utt{start + i:09d}.wav" for i in range(n)]),
        "audio_data": pa.array(audio, pa.binary()),
        "text": pa.array([f"hi {(start + i) % 9973}" for i in range(n)]),
        "spk": pa.array([f"spk{(start + i) % 97}" for i in range(n)]),
        "utt_embedding": pa.ListArray.from_arrays(emb_off, pa.array(rng.standard_normal(n * 192))),
        "spk_embedding": pa.ListArray.from_arrays(emb_off, pa.array(rng.standard_normal(n * 192))),
        "speech_token": pa.ListArray.from_arrays(tok_off, pa.array(tokens, pa.int64())),
    }
    table = pa.Table.from_pydict(cols, schema=S.shard_schema())
    if layout == "cosytrain":  # the columns prepare writes (shard_facts.append_fact_columns), computed in bulk
        facts = {"num_samples": samples,
                 "sample_rate": np.full(n, SR, np.int32),
                 "audio_error": np.zeros(n, np.uint8), "speech_token_len": ntok.astype(np.int32),
                 "speech_token_min": np.minimum.reduceat(tokens, tok_off[:-1]),
                 "speech_token_max": np.maximum.reduceat(tokens, tok_off[:-1]),
                 "utt_embedding_dim": np.full(n, 192, np.int32), "utt_embedding_finite": np.ones(n, bool),
                 "spk_embedding_dim": np.full(n, 192, np.int32), "spk_embedding_finite": np.ones(n, bool)}
        table = F.append_fact_columns(table, facts)
        pq.write_table(table, path, compression="snappy", row_group_size=S.ROW_GROUP_SIZE)
    else:  # pandas' to_parquet in make_parquet_list.py: one row group per shard
        pq.write_table(table, path, compression="snappy", row_group_size=n)


def make_corpus(folder: Path, rows: int, seconds: float, layout: str) -> str:
    data_list = folder / "data.list"
    if data_list.is_file():
        return str(data_list)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [(str(folder / f"parquet_{i:09d}.tar"), i * SHARD_ROWS, min(SHARD_ROWS, rows - i * SHARD_ROWS), seconds,
              layout) for i in range(-(-rows // SHARD_ROWS))]
    with mp.get_context("spawn").Pool(2) as pool:
        for _ in pool.imap_unordered(_write_shard, tasks, chunksize=4):
            pass
    data_list.write_text("".join(t[0] + "\n" for t in tasks))
    return str(data_list)


# ------------------------------------------------------------------------------------------ launch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def launch(cfg: dict) -> dict:
    """One launch in this (fresh) process: setup, first batch, then ``batches`` more."""
    import torch

    torch.set_num_threads(1)
    from cosytrain.data.datamodule import CosyDataModule

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    dm = CosyDataModule(train_data=cfg["data_list"], index_cache_dir=cfg["cache"], sample_rate=22050,
                        speech_token_size=4096, min_length=0, max_output_input_ratio=10, shuffle_size=1000,
                        sort_size=500, max_frames_in_batch=2000, index_workers=cfg["workers"],
                        row_cache_mb=cfg["row_cache_mb"])
    dm.setup("fit")
    t_index = time.perf_counter() - t0
    rss_index = _rss_mb()
    it = iter(dm.train_dataloader())
    first = next(it)
    t_first = time.perf_counter() - T_START
    t_ready = time.perf_counter() - t0
    n_utts, t1 = 0, time.perf_counter()
    for _ in range(cfg["batches"]):
        n_utts += len(next(it)["utts"])
    rate = n_utts / (time.perf_counter() - t1)
    reader = dm.train_dataset.reader
    return {"index_s": t_index, "first_s": t_first, "ready_s": t_ready, "index_mb": rss_index - rss0,
            "loader_mb": _rss_mb() - rss_index,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "utt_s": rate,
            "rows": len(dm.train_dataset.index), "index_bytes": dm.train_dataset.index.nbytes(),
            "first_utts": len(first["utts"]), "reader_peak_mb": reader.peak_bytes / 2**20 if reader else 0,
            "indexed_here": len(dm.train_dataset.index.stats.indexed)}


def run_launch(cfg: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--_launch", json.dumps(cfg)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def index_10m(rows: int) -> dict:
    """Index arrays + one epoch plan for ``rows`` utterances from synthetic facts (no shards)."""
    import torch

    torch.set_num_threads(1)
    from cosytrain.data.dataset import StreamOptions
    from cosytrain.data.index import ShardIndex
    from cosytrain.data.index_build import ShardEntry
    from cosytrain.data.pipeline import FeatureConfig, FilterConfig
    from cosytrain.data.plan import plan_epoch
    from cosytrain.data.shard_facts import FACT_DTYPE

    opts = StreamOptions(feat=FeatureConfig(), filt=FilterConfig(speech_token_size=4096, min_length=0))
    n_shards = rows // SHARD_ROWS

    def entries():
        rng = np.random.default_rng(0)
        for s in range(n_shards):
            f = np.zeros(SHARD_ROWS, FACT_DTYPE)
            f["num_samples"] = rng.integers(16000, 16000 * 15, SHARD_ROWS)
            f["sample_rate"] = 16000
            f["speech_token_len"] = f["num_samples"] // 320
            f["speech_token_max"] = 4000
            f["utt_embedding_dim"] = f["spk_embedding_dim"] = 192
            f["utt_embedding_finite"] = f["spk_embedding_finite"] = True
            yield s, ShardEntry(f, rng.integers(20, 150, SHARD_ROWS).astype(np.int32), np.asarray([SHARD_ROWS]), None)

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    index = ShardIndex.from_entries([f"shard{s}" for s in range(n_shards)], entries(), opts)
    t_build = time.perf_counter() - t0
    rss_index = _rss_mb()
    t0 = time.perf_counter()
    plan = plan_epoch(index, opts, 0, 8, 3)  # rank 3 of 8 plans every rank's count
    t_plan = time.perf_counter() - t0
    return {"rows": len(index), "index_bytes": index.nbytes(), "index_mb": rss_index - rss0, "build_s": t_build,
            "plan_s": t_plan, "plan_batches": plan.num_batches,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "start_mb": rss0}


# -------------------------------------------------------------------------------------------- main


def _fmt_row(name: str, r: dict) -> str:
    return (f"{name:28} {r['rows']:>9} {r['index_s']:>8.2f} {r['ready_s']:>7.2f} {r['first_s']:>11.2f} "
            f"{r['index_mb']:>8.1f} {r['loader_mb']:>9.1f} {r['peak_mb']:>8.0f} {r['utt_s']:>7.0f}")


HEADER = (f"{'corpus / launch':28} {'rows':>9} {'index s':>8} {'ready s':>7} {'1st batch s':>11} {'index MB':>8} "
          f"{'loader MB':>9} {'peak MB':>8} {'utt/s':>7}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10000,100000,1000000")
    ap.add_argument("--seconds", type=float, default=0.2, help="audio length of the row-count corpora")
    ap.add_argument("--root", default=None, help="where corpora go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--row_cache_mb", type=int, default=256)
    ap.add_argument("--audio_rows", type=int, default=10000, help="rows of the 0.3-s vs 5-s comparison")
    ap.add_argument("--skip_10m", action="store_true")
    ap.add_argument("--only", default="main,workers,audio,groups,10m")
    ap.add_argument("--layouts", default="cosytrain,upstream")
    ap.add_argument("--_launch", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_index", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._launch:
        print(json.dumps(launch(json.loads(a._launch))))
        return 0
    if a._index:
        print(json.dumps(index_10m(a._index)))
        return 0
    root = Path(a.root or tempfile.mkdtemp(prefix="data-scale-"))
    only = set(a.only.split(","))
    print(f"data at scale, {os.cpu_count()} cpus, python {sys.version.split()[0]}, corpora in {root}", flush=True)

    def launches(name: str, data_list: str, workers: int = 1, both: bool = True, row_cache: int = a.row_cache_mb):
        cache = root / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        cfg = {"data_list": data_list, "cache": str(cache), "workers": workers, "row_cache_mb": row_cache,
               "batches": a.batches}
        out = [run_launch(cfg)]
        if both:
            out.append(run_launch(cfg))
        return out

    try:
        if "main" in only:
            print(HEADER)
            for rows in [int(r) for r in a.rows.split(",")]:
                for layout in a.layouts.split(","):
                    t0 = time.perf_counter()
                    dl = make_corpus(root / f"{layout}-{rows}", rows, a.seconds, layout)
                    made = time.perf_counter() - t0
                    first, second = launches(f"{layout}-{rows}", dl, workers=2)
                    print(_fmt_row(f"{layout} {rows // 1000}k first", first), f"  (written in {made:.0f}s)")
                    print(_fmt_row(f"{layout} {rows // 1000}k second", second), flush=True)
                    if layout == "upstream" and "workers" in only:  # alternate, so the page cache favours neither
                        for workers in (1, 2):
                            again = launches(f"{layout}-{rows}-w{workers}", dl, workers=workers, both=False)[0]
                            print(_fmt_row(f"{layout} {rows // 1000}k first, {workers} proc", again), flush=True)
                    if not a.keep and rows >= 100000:
                        shutil.rmtree(root / f"{layout}-{rows}", ignore_errors=True)
        if "audio" in only:
            print(f"\nsame rows ({a.audio_rows}), 0.3-s vs 5-s audio (first launch, 2 index processes)")
            print(HEADER)
            for layout in ("cosytrain", "upstream"):
                for seconds in (0.3, 5.0):
                    dl = make_corpus(root / f"{layout}-audio{seconds}", a.audio_rows, seconds, layout)
                    first = launches(f"{layout}-audio{seconds}", dl, workers=2, both=False)[0]
                    print(_fmt_row(f"{layout} {seconds:.1f}s audio first", first), flush=True)
        if "groups" in only:
            print(f"\nloader memory, 5-s audio, {a.audio_rows} rows: 1,000-row groups (upstream) vs 64-row groups")
            print(HEADER)
            for layout in ("upstream", "cosytrain"):
                dl = make_corpus(root / f"{layout}-audio5.0", a.audio_rows, 5.0, layout)
                second = launches(f"{layout}-groups", dl, workers=2)[1]
                print(_fmt_row(f"{layout} 5s audio second", second), flush=True)
        if "10m" in only and not a.skip_10m:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            for rows in (1_000_000, 10_000_000):
                out = subprocess.run([sys.executable, __file__, "--_index", str(rows)], capture_output=True, text=True,
                                     env=env, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"\nindex of {r['rows']:,} utterances from facts: arrays {r['index_bytes'] / 2**20:.0f} MB, "
                      f"RSS +{r['index_mb']:.0f} MB, built in {r['build_s']:.1f}s; one epoch plan for rank 3 of 8 "
                      f"in {r['plan_s']:.1f}s ({r['plan_batches']} batches); peak RSS {r['peak_mb']:.0f} MB "
                      f"(process at start {r['start_mb']:.0f} MB)", flush=True)
    finally:
        if not a.keep and a.root is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
