"""``SynthesisCallback`` under DDP (two gloo CPU processes): rank 0 measures, every rank logs its figures.

Checkpoint callbacks on every rank compare the monitored ``synth/*`` value; if the ranks logged
different values (or rank 1 a NaN because it never measured), ``ModelCheckpoint`` would disagree
between ranks. The measuring itself is the test double of ``tests/tasks/_synth_ddp.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CONFIG = """
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_epochs: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger: false
  enable_checkpointing: true
  callbacks:
    - class_path: tests.tasks._synth_ddp.RankTaggedSynthesis
      init_args: {{speaker_encoder: none, log_audio: false, write_report: false}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: synth/full/mcd, mode: min, save_top_k: 1, dirpath: "{ckpt}",
                  filename: "best-mcd={{synth/full/mcd:.1f}}", auto_insert_metric_name: false}}
    - class_path: tests.tasks._synth_ddp.DumpSynthFigures
      init_args: {{folder: "{out}"}}
model:
  class_path: cosytrain.tasks.speech_task.LLMTask
  init_args:
    llm: {{class_path: tests.tasks._toy.ToyPart}}
    train_conf: {{scheduler: constantlr}}
data:
  class_path: tests.tasks._toy.ToyDataModule
  init_args: {{num_batches: 4}}
"""


@pytest.mark.timeout(150)
def test_rank0_figures_are_broadcast_and_logged_equal_on_both_ranks(tmp_path):
    out, ckpt = tmp_path / "figures", tmp_path / "ckpt"
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(CONFIG.format(out=out, ckpt=ckpt))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cosytrain", "fit", "--config", str(cfg),
                           "--trainer.default_root_dir", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    figs0, figs1 = ranks[0]["figures"], ranks[1]["figures"]
    # rank 0's own figures (10 + rank, measured on rank 0), on BOTH ranks: broadcast, not recomputed
    assert figs0["synth/full/mcd"] == figs1["synth/full/mcd"] == 10.0
    assert figs0["synth/measured_on_rank"] == figs1["synth/measured_on_rank"] == 0.0
    assert figs0["synth/full/sim"] == pytest.approx(0.5) and figs1["synth/full/sim"] == pytest.approx(0.5)
    # every expected name is logged on both ranks (NaN where nothing measured it), the same set
    assert set(figs0) == set(figs1) and "synth/flow_gt/mcd" in figs0
    assert math.isnan(figs0["synth/flow_gt/mcd"]) and math.isnan(figs1["synth/flow_gt/mcd"])
    # the checkpoint chosen by the broadcast figure carries rank 0's value in its name
    assert "best-mcd=10.0.ckpt" in [p.name for p in ckpt.glob("*.ckpt")]
