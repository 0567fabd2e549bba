"""The training task: resume equality, overfitting, init_from checks, freezing, accumulation, parts, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cosytrain.tasks.lightning_cli import build_trainer
from cosytrain.tasks.speech_task import FlowTask, LLMTask, SpeechTask
from tests.tasks._toy import StepRecorder, ToyDataModule, ToyPart, read_scalars

REPO = Path(__file__).resolve().parents[2]
QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
             num_sanity_val_steps=0)


def _task(seed=0, **kw):
    torch.manual_seed(seed)
    conf = {"optim": "adam", "optim_conf": {"lr": 0.01}, "scheduler": "warmuplr", "scheduler_conf": {"warmup_steps": 3}}
    conf.update(kw.pop("train_conf", {}))
    return LLMTask(llm=ToyPart(**kw.pop("part", {})), train_conf=conf, **kw)


def test_resume_matches_uninterrupted_run(tmp_path):
    """8 steps straight == 4 steps, stop, `ckpt_path='last'`, 4 more (FP32, CPU, bitwise, with dropout)."""
    part = {"dropout": 0.3}  # randomness in the step: equality needs the task's per-step seeding
    rec_a = StepRecorder()
    build_trainer(max_steps=8, default_root_dir=str(tmp_path / "a"), callbacks=[rec_a], **QUIET).fit(
        _task(part=part), ToyDataModule(num_batches=4))
    run = tmp_path / "b"
    rec_b1, rec_b2 = StepRecorder(), StepRecorder()
    build_trainer(max_steps=4, default_root_dir=str(run), callbacks=[rec_b1], **QUIET).fit(
        _task(part=part), ToyDataModule(num_batches=4))
    # a different init seed (and so a different global RNG state) proves weights and randomness
    # come from the checkpoint and the step position
    build_trainer(max_steps=8, default_root_dir=str(run), callbacks=[rec_b2], **QUIET).fit(
        _task(seed=1, part=part), ToyDataModule(num_batches=4), ckpt_path="last")
    losses_a = [r["loss"] for r in rec_a.rows]
    assert [r["loss"] for r in rec_b1.rows + rec_b2.rows] == losses_a
    assert torch.equal(rec_a.rows[-1]["weight"], rec_b2.rows[-1]["weight"])
    # the resumed run logs into the same folder and its curve continues at step 5
    steps = [s for s, _ in read_scalars(run)["train/loss"]]
    assert steps == list(range(1, 9)), steps
    assert [s for s, _ in read_scalars(run)["val/loss"]] == [4, 8]
    assert sorted(os.listdir(run / "checkpoints")).count("last.ckpt") == 1


def test_fixed_batch_overfits(tmp_path):
    task = _task(train_conf={"optim_conf": {"lr": 0.05}, "scheduler": "constantlr"}, part={"dim": 32})
    rec = StepRecorder()
    build_trainer(max_steps=60, default_root_dir=str(tmp_path), callbacks=[rec], logger=False,
                  enable_checkpointing=False, **QUIET).fit(task, ToyDataModule(num_batches=1))
    first, last = rec.rows[0]["loss"], rec.rows[-1]["loss"]
    assert last < first / 20, (first, last)


def test_gradient_accumulation_and_prefixed_checkpoint(tmp_path):
    task = _task(train_conf={"accum_grad": 2})
    trainer = build_trainer(max_epochs=1, default_root_dir=str(tmp_path), limit_val_batches=0, **QUIET)
    trainer.fit(task, ToyDataModule(num_batches=4))
    assert trainer.global_step == 2 and trainer.accumulate_grad_batches == 2
    assert all(int(s["step"]) == 2 for s in trainer.optimizers[0].state.values())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {f"llm.{k}" for k in ToyPart().state_dict()}
    with pytest.raises(ValueError, match="set only train_conf.accum_grad"):
        build_trainer(max_steps=1, accumulate_grad_batches=4, logger=False, enable_checkpointing=False,
                      **QUIET).fit(_task(train_conf={"accum_grad": 2}), ToyDataModule())


def test_freeze_by_prefix(tmp_path):
    task = _task(freeze=["llm.embed", "llm.proj.bias"])
    before = {k: v.clone() for k, v in task.state_dict().items()}
    build_trainer(max_steps=3, logger=False, enable_checkpointing=False, **QUIET).fit(task, ToyDataModule())
    after = task.state_dict()
    assert torch.equal(before["llm.embed.weight"], after["llm.embed.weight"])
    assert torch.equal(before["llm.proj.bias"], after["llm.proj.bias"])
    assert not torch.equal(before["llm.proj.weight"], after["llm.proj.weight"])
    with pytest.raises(ValueError, match="llm.embedz"):
        _task(freeze=["llm.embedz"])


def test_init_from_loads_weights_strictly_and_names_bad_keys(tmp_path):
    torch.manual_seed(5)
    src = ToyPart()
    sd = src.state_dict()
    torch.save({**sd, "epoch": 3, "step": 100}, tmp_path / "llm.pt")  # upstream adds epoch/step ints
    task = _task(init_from=str(tmp_path))
    assert all(torch.equal(v, task.llm.state_dict()[k]) for k, v in sd.items())

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(ToyPart(vocab=20).state_dict(), bad / "llm.pt")
    with pytest.raises(ValueError, match=r"bad/llm\.pt: .*embed\.weight: model \[16, 32\] vs checkpoint \[20, 32\] \(vocabulary"):
        _task(init_from=str(bad))
    torch.save({k: v for k, v in sd.items() if k != "out.bias"}, bad / "llm.pt")
    with pytest.raises(ValueError, match=r"bad/llm\.pt: .*1 missing \(out\.bias\)"):
        _task(init_from=str(bad))
    with pytest.raises(FileNotFoundError, match="flow.pt"):
        FlowTask(flow=ToyPart(), init_from=str(tmp_path))


def test_two_parts_in_one_run(tmp_path):
    torch.manual_seed(0)
    task = SpeechTask(llm=ToyPart(), flow=ToyPart(dim=8), train_conf={"scheduler": "constantlr"})
    build_trainer(max_steps=2, default_root_dir=str(tmp_path), **QUIET).fit(task, ToyDataModule(num_batches=2))
    tags = set(read_scalars(tmp_path))
    assert {"train/loss", "train/llm_loss", "train/flow_loss", "train/llm_acc", "train/llm_grad_norm",
            "train/flow_grad_norm", "val/llm_loss"} <= tags
    keys = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in keys} == {"llm", "flow"}


DDP_CONFIG = """
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
model:
  class_path: cosytrain.tasks.speech_task.LLMTask
  init_args:
    llm: {class_path: tests.tasks._toy.ToyPart}
    train_conf: {scheduler: constantlr}
data:
  class_path: tests.tasks._toy.ToyDataModule
  init_args: {num_batches: 4}
"""


@pytest.mark.timeout(120)
def test_ddp_two_processes_on_cpu(tmp_path):
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(DDP_CONFIG)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cosytrain", "fit", "--config", str(cfg),
                           "--trainer.default_root_dir", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stderr or "distributed_backend=gloo" in proc.stderr, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2


def test_flow_stage_callbacks_log_mel_images_and_skipped_counts(tmp_path):
    from cosytrain.tasks.callbacks import MelImageLogger, SkippedDataLogger
    from tests.tasks._toy import ToyFlow

    torch.manual_seed(0)
    task = FlowTask(flow=ToyFlow(), train_conf={"scheduler": "constantlr"})
    mel_cb = MelImageLogger()
    build_trainer(max_steps=2, default_root_dir=str(tmp_path), callbacks=[mel_cb, SkippedDataLogger(every_n_steps=1)],
                  **QUIET).fit(task, ToyDataModule(num_batches=2))
    tags = read_scalars(tmp_path)
    assert mel_cb.logged == ["val/mel_target", "val/mel_flow"]
    assert tags["image:val/mel_target"] == [(2, 12.0)] and tags["image:val/mel_flow"] == [(2, 12.0)]
    assert tags["data/skipped_total"][-1][1] == 4 and tags["data/skipped_too_long"][-1][1] == 3


def test_step_checkpoint_keeps_one_current_last(tmp_path):
    from cosytrain.tasks.callbacks import StepCheckpoint

    build_trainer(max_steps=3, default_root_dir=str(tmp_path), callbacks=[StepCheckpoint(every_n_train_steps=2)],
                  limit_val_batches=0, **QUIET).fit(_task(), ToyDataModule(num_batches=4))
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "last.ckpt"], names
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
