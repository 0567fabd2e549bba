"""Run cosytrain's DeepSpeed strategy for real on CPU, one rank (a test shim, not a product feature).

Lightning's ``DeepSpeedStrategy`` refuses a non-CUDA accelerator, and DeepSpeed's engine wants a device
index. DeepSpeed itself runs on CPU (its CPU accelerator, the gloo backend), so lifting those two
checks lets the tests drive the real engine: ZeRO-2/3 partitioning, ``torch_autocast``, clipping,
overflow skips, checkpoint folders and ``GatheredParameters``, exactly as a GPU run does them.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator

import torch

from cosytrain.tasks.deepspeed import CosyDeepSpeedStrategy


class CPUDeepSpeedStrategy(CosyDeepSpeedStrategy):
    """``CosyDeepSpeedStrategy`` with Lightning's CUDA-only checks lifted (everything else untouched)."""

    def setup_environment(self) -> None:  # Lightning: "only supported on CUDA GPUs"
        from lightning.pytorch.strategies.ddp import DDPStrategy

        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:  # Lightning checks CUDA device indices here
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:  # DeepSpeed's engine reads device_rank = root_device.index
        return torch.device("cpu", 0)

    def _get_process_group_backend(self) -> str:
        return "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def deepspeed_process() -> Iterator[None]:
    """One gloo process group for a block of DeepSpeed runs; environment and group undone afterwards."""
    import torch.distributed as dist

    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        try:
            import deepspeed.comm.comm as ds_comm

            ds_comm.cdb = None  # deepspeed's own handle on the destroyed group
        except ImportError:  # pragma: no cover
            pass
        os.environ.clear()
        os.environ.update(saved)


def cpu_strategy(stage: int, **kwargs: Any) -> CPUDeepSpeedStrategy:
    return CPUDeepSpeedStrategy(stage=stage, logging_batch_size_per_gpu=4, **kwargs)
