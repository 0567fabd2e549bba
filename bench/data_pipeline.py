"""Data pipeline benchmark: utterances/s and peak memory, on the demo shards and replicated sets (x10, x30).

Each configuration runs in a fresh subprocess so its peak RSS is its own. The 10x set lists every
demo shard ten times under new names (symlinks), so the pipeline indexes and streams 10x the rows.
Memory should stay flat as data grows: the ratio column says how far it does. Below one shuffle
window of data (the x1 set) everything is cached; from there on only the per-row index grows.

    python bench/data_pipeline.py [--sizes 1,10,30] [--epochs 1] [--num_workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _replicate(data_list: Path, times: int, out: Path) -> Path:
    shards = [line.strip() for line in data_list.read_text().splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in range(times):
        for i, shard in enumerate(shards):
            link = out / f"rep{r:02d}_{i:05d}.parquet"
            if not link.exists():
                link.symlink_to(shard)
            lines.append(str(link))
    listing = out / "data.list"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def _measure(data_list: str, epochs: int, num_workers: int) -> dict:
    """Runs in the child: build the datamodule, stream ``epochs`` epochs, report figures."""
    import torch

    from cosytrain.data.datamodule import CosyDataModule

    torch.set_num_threads(1)
    base_mb = _rss_mb()
    t0 = time.perf_counter()
    dm = CosyDataModule(train_data=data_list, num_workers=num_workers, max_frames_in_batch=2000)
    dm.setup("fit")
    loader = dm.train_dataloader()
    t_index = time.perf_counter() - t0
    utts = frames = batches = 0
    t1 = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            utts += len(batch["utts"])
            frames += int(batch["speech_feat_len"].sum())
            batches += 1
    t_stream = time.perf_counter() - t1
    return {"utts": utts, "batches": batches, "frames": frames, "index_s": t_index, "stream_s": t_stream,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "data_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb}


def _rss_mb() -> float:
    """Resident memory now (after imports): the baseline that the data pipeline adds to."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,30", help="replication factors of the demo set to measure")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--num_workers", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child, args.epochs, args.num_workers)))
        return 0

    from cosytrain.data.demo_corpus import ensure_demo_corpus

    demo = Path(ensure_demo_corpus())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [int(x) for x in args.sizes.split(",")]
        sets = [(f"demo x{n}", demo if n == 1 else _replicate(demo, n, Path(tmp) / f"rep{n}")) for n in sizes]
        for name, listing in sets:
            cmd = [sys.executable, __file__, "--child", str(listing), "--epochs", str(args.epochs),
                   "--num_workers", str(args.num_workers)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
            rows.append((name, json.loads(out.strip().splitlines()[-1])))
    base = rows[0][1]
    print(f"data pipeline, {args.epochs} epoch(s), num_workers={args.num_workers}, {os.cpu_count()} cpus")
    print(f"{'set':<10} {'utts':>6} {'batches':>7} {'index s':>8} {'stream s':>8} {'utt/s':>8} "
          f"{'frames/s':>9} {'peak MB':>8} {'data MB':>8} {'data mem x':>10}")
    for name, r in rows:
        ups = r["utts"] / max(r["stream_s"], 1e-9)
        fps = r["frames"] / max(r["stream_s"], 1e-9)
        print(f"{name:<10} {r['utts']:>6} {r['batches']:>7} {r['index_s']:>8.2f} {r['stream_s']:>8.2f} {ups:>8.1f} "
              f"{fps:>9.0f} {r['peak_rss_mb']:>8.0f} {r['data_mb']:>8.0f} {r['data_mb'] / max(base['data_mb'], 1):>10.2f}")
    print("data MB = peak RSS minus RSS after imports; utt/s and frames/s over the streaming pass only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
