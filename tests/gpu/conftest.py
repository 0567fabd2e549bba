"""The ``gpu`` tier: CUDA runs of what CPU tests cannot show (``pytest -m gpu``; ``bench/gpu_session.sh`` runs it).

Every test here is marked ``gpu`` and SKIPS without CUDA, also under ``CI=true``: CI has no GPU and
never needs this tier (the repository's rule that a missing dependency fails under CI does not apply
to the device itself). ``COSYTRAIN_GPU_TIER_ON_CPU=1`` runs the same tests on the CPU instead (FP16
through cosytrain's CPU autocast + GradScaler, DeepSpeed through the test shim of
``tests/tasks/_deepspeed_cpu.py``) so the tier's own code can be checked before a GPU is lent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ON_CPU = os.environ.get("COSYTRAIN_GPU_TIER_ON_CPU") == "1"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA (the gpu tier; COSYTRAIN_GPU_TIER_ON_CPU=1 runs it on the CPU)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available() and not ON_CPU:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
