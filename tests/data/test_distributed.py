"""Two real processes (gloo) through ``CosyDataModule`` on parquet shards: the first launch's index is
shared between the ranks, batch counts are equal, the data is disjoint, a resumed rank continues exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cosytrain.data.shards import read_data_list
from tests.conftest import REPO_ROOT
from tests.data.test_pipeline import write_corpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(180)
def test_two_ranks_through_the_datamodule(tmp_path: Path) -> None:
    data_list, utts = write_corpus(tmp_path / "shards", sizes=[7, 3, 9, 4, 6, 2, 8, 5])  # upstream format: scanned
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO_ROOT),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "tests.data._ddp_data_worker", str(tmp_path / f"r{rank}.json"), data_list,
               str(tmp_path / "cache")]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=170)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    res = [json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in range(2)]

    # equal batch counts (what every rank planned, and what each really streamed)
    assert res[0]["gathered_counts"] == res[1]["gathered_counts"] and len(res[0]["batches"]) > 3
    assert res[0]["counts"] == res[1]["counts"]
    # disjoint halves before the padding repeats; together every utterance exactly once
    own = [Counter(u for b in r["batches"][:r["counts"][r["rank"]]] for u in b) for r in res]
    assert not set(own[0]) & set(own[1]) and sum((own[0] + own[1]).values()) == len(utts)
    assert set(own[0]) | set(own[1]) == set(utts)
    # the first launch's index was split between the ranks, no shard twice; later launches read the cache
    indexed = [set(r["indexed"]) for r in res]
    assert not indexed[0] & indexed[1] and indexed[0] | indexed[1] == set(range(len(read_data_list(data_list))))
    assert res[0]["later_indexed"] == res[1]["later_indexed"] == []  # (which rank took which shard is timing)
    # a fresh data module given the saved position continues exactly where the first stopped
    assert res[0]["resumed"] and res[1]["resumed"]
    assert res[0]["state"]["train"]["world_size"] == 2 and res[0]["state"]["train"]["consumed"] == 2
