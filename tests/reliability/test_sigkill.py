"""SIGKILL at random points of ``python -m cosytrain fit`` (one of them half-way through writing
``last.ckpt``), resumed with ``--ckpt_path last`` until done: no corrupt checkpoint, and the final
weights equal an uninterrupted run's."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.reliability._corpus import write_tiny_corpus
from tests.reliability._hooks import PAUSE_ENV

REPO = Path(__file__).resolve().parents[2]
RECIPE = Path(__file__).with_name("tiny_llm_recipe.yaml")
MAX_STEPS = 12  # the recipe's; 6 batches per epoch, so the run crosses an epoch boundary
SEED = int(os.environ.get("COSYTRAIN_SIGKILL_SEED", "20261124"))  # printed on failure; change to explore


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra)
    return env


def _start(run: Path, data_list: Path, resume: bool, **env: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "cosytrain", "fit", "--config", str(RECIPE),
            "--trainer.default_root_dir", str(run), "--data.init_args.train_data", str(data_list)]
    if resume:
        args += ["--ckpt_path", "last"]
    return subprocess.Popen(args, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started (start_new_session), by its id
    proc.communicate()


def _finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def _checkpoints_load(run: Path) -> dict[str, int]:
    """Every ``*.ckpt`` of the run loads weights-only; returns name -> global_step."""
    steps = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        steps[path.name] = int(ckpt["global_step"])
    return steps


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == MAX_STEPS
    return ckpt["state_dict"]


def _step_files(run: Path) -> list[int]:
    # a step redone after a resume is saved as ...-step=N-v1.ckpt beside the killed run's file
    return [int(re.search(r"step=(\d+)", p.name).group(1)) for p in (run / "checkpoints").glob("epoch=*-step=*.ckpt")]


def _wait_until(done: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while not done() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return done()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_anywhere_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data_list = write_tiny_corpus(tmp_path / "corpus")
    # the uninterrupted run, timed: start-up (to the first checkpoint) and seconds per step
    t0 = time.monotonic()
    reference = _start(tmp_path / "ref", data_list, resume=False)
    assert _wait_until(lambda: bool(_step_files(tmp_path / "ref")), reference)
    startup = time.monotonic() - t0
    _finish(reference)
    per_step = max((time.monotonic() - t0 - startup) / (MAX_STEPS - 1), 0.05)
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"

    # 1. killed half-way through writing last.ckpt at step 3: the step-2 last.ckpt must survive
    marker = tmp_path / "paused"
    proc = _start(run, data_list, resume=False, **{PAUSE_ENV: f"3:{marker}"})
    assert _wait_until(marker.exists, proc), f"the run never reached the paused save (seed {SEED})"
    _kill(proc)
    assert list(ckpt_dir.glob(".last.ckpt.*.tmp")), "the kill did not land inside the write"
    steps = _checkpoints_load(run)
    assert steps["last.ckpt"] == 2 and steps["epoch=0-step=3.ckpt"] == 3

    # 2. resumed and killed at random moments: once during start-up (imports, model build, checkpoint
    #    load), then twice at a random point of the step after the next checkpoint (a step or a save)
    history = []
    for attempt in range(3):
        proc = _start(run, data_list, resume=True)
        if attempt == 0:
            delay = rng.uniform(0.2, 0.9) * startup
            time.sleep(delay)
        else:
            done_steps = max(_step_files(run))
            _wait_until(lambda: max(_step_files(run)) > done_steps, proc)
            delay = rng.uniform(0.0, 1.5) * per_step
            time.sleep(delay)
        finished = proc.poll() is not None
        _kill(proc)
        history.append((attempt, round(delay, 2), finished))
        steps = _checkpoints_load(run)  # nothing half-written is ever visible under a .ckpt name
        # a step's own file is written before last.ckpt, so a kill between the two leaves last one behind
        assert max(steps.values()) - 1 <= steps["last.ckpt"] <= max(steps.values()), (steps, history, SEED)
        if finished:
            break

    # 3. resumed to the end
    if not history[-1][2]:
        _finish(_start(run, data_list, resume=True))
    steps = _checkpoints_load(run)
    assert set(steps.values()) == set(range(1, MAX_STEPS + 1)), (steps, history, SEED)
    assert not list(ckpt_dir.glob(".last.ckpt.*.tmp")), "a completed save leaves no stale temp file"
    print(f"kills (attempt, seconds, finished before the kill): {history}; startup {startup:.1f}s,"
          f" {per_step:.2f}s/step")
    expected, got = _weights(tmp_path / "ref"), _weights(run)
    assert set(expected) == set(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m} ({history})")
