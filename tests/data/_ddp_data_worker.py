"""One rank of ``test_distributed.py``: a real gloo process group, ``CosyDataModule`` as a recipe uses it.

Run as ``python -m tests.data._ddp_data_worker OUT_JSON DATA_LIST CACHE`` with torchrun-style
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). It writes what the test checks:
this rank's batches for a whole epoch, the shards it indexed on the first launch, and whether a
resumed data module continued exactly.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from cosytrain.data.datamodule import CosyDataModule

OPTIONS = dict(shuffle_size=8, sort_size=4, max_frames_in_batch=250, seed=3, speech_token_size=4096)


def _module(data_list: str, cache: str, workers: int = 0) -> CosyDataModule:
    dm = CosyDataModule(train_data=data_list, index_cache_dir=cache, num_workers=workers, **OPTIONS)
    dm.setup("fit")  # rank and world size come from torch.distributed: no trainer, no set_rank
    return dm


def main() -> int:
    out, data_list, cache = sys.argv[1:4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    first = _module(data_list, cache, workers=2)  # two loader workers per rank for the whole epoch
    stats = first.train_dataset.index.stats
    loader = first.train_dataloader()
    batches = [b["utts"] for b in loader]
    plan = first.train_dataset.plan
    # resume from a fresh data module (as a restarted job): 2 batches, save, a third module continues
    second = _module(data_list, cache)
    it = iter(second.train_dataloader())
    head = [next(it)["utts"] for _ in range(2)]
    state = second.state_dict()
    del it
    third = _module(data_list, cache)
    third.load_state_dict(state)
    rest = [b["utts"] for b in third.train_dataloader()]
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(batches)]))
    result = {"rank": rank, "world": dist.get_world_size(), "batches": batches, "counts": plan.counts,
              "gathered_counts": [int(c) for c in counts], "indexed": stats.indexed,
              "later_indexed": second.train_dataset.index.stats.indexed + third.train_dataset.index.stats.indexed,
              "resumed": head + rest == batches, "state": state}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
