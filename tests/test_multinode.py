"""Two nodes x one process on localhost (``torchrun --nnodes 2`` twice, as on two machines) run the default
recipe for a few steps on the demo corpus, then resume once from ``last``: the README's multi-node path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.data.test_distributed import free_port


def _two_nodes(run: Path, root: str, home: Path, *extra: str) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "COSYTRAIN_HOME": str(home)}
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "cosytrain", "fit", "--config", str(REPO_ROOT / "recipes" / "sft.yaml"),
               "--config", str(REPO_ROOT / "conf" / "strategy" / "ddp.yaml"),
               "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.accelerator", "cpu",
               "--trainer.default_root_dir", str(run), "--data.init_args.root", root,
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=280)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    assert any("world_size=2" in log or "MEMBER: 2/2" in log or "2 processes" in log for log in logs), logs[0][-3000:]


@pytest.mark.timeout(600)
def test_default_recipe_on_two_nodes_and_resume(tmp_path: Path, demo_corpus) -> None:
    root = str(demo_corpus[0])
    run = tmp_path / "run"
    _two_nodes(run, root, tmp_path / "home", "--trainer.max_steps", "3")
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 3
    _two_nodes(run, root, tmp_path / "home", "--trainer.max_steps", "5", "--ckpt_path", "last")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5
    position = last["DemoDataModule"]["train"]
    assert position["world_size"] == 2 and position["epoch"] == 0 and position["consumed"] == 5
    # both parts trained on (weights moved between the two checkpoints)
    moved = {k.split(".")[0] for k, v in last["state_dict"].items()
             if v.is_floating_point() and not torch.equal(v, first["state_dict"][k])}
    assert {"llm", "flow"} <= moved
