"""A tiny synthetic corpus (parquet shards, upstream schema) for the reliability runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.data.test_pipeline import make_row, write_shard


def write_tiny_corpus(folder: Path, num_utts: int = 12, shards: int = 2, speech_vocab: int = 64) -> Path:
    """``num_utts`` short sine-wave utterances with speech tokens below ``speech_vocab``; returns data.list."""
    folder.mkdir(parents=True, exist_ok=True)
    per = (num_utts + shards - 1) // shards
    paths = []
    for s in range(shards):
        rows = []
        for k in range(s * per, min(num_utts, (s + 1) * per)):
            seconds = (0.3, 0.4, 0.5)[k % 3]
            tokens = np.random.default_rng(k).integers(0, speech_vocab, size=int(seconds * 50)).tolist()
            rows.append(make_row(f"r{k:03d}", seconds=seconds, seed=k, text=f"utterance {k}", speech_token=tokens))
        paths.append(write_shard(folder / f"shard_{s:03d}.parquet", rows))
    listing = folder / "data.list"
    listing.write_text("".join(p + "\n" for p in paths))
    return listing
