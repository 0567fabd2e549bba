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
from tests.tasks._toy import StepRecorder, ToyDataModule, ToyPart, read_scalars, toy_batches

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
    assert not all(torch.equal(v, task.llm.state_dict()[k]) for k, v in sd.items())  # read at setup, not here
    task.load_init_from()
    assert all(torch.equal(v, task.llm.state_dict()[k]) for k, v in sd.items())

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(ToyPart(vocab=20).state_dict(), bad / "llm.pt")
    with pytest.raises(ValueError, match=r"bad/llm\.pt: .*embed\.weight: model \[16, 32\] vs checkpoint \[20, 32\] \(vocabulary"):
        _task(init_from=str(bad)).load_init_from()
    torch.save({k: v for k, v in sd.items() if k != "out.bias"}, bad / "llm.pt")
    with pytest.raises(ValueError, match=r"bad/llm\.pt: .*1 missing \(out\.bias\)"):  # also at setup, before step 1
        build_trainer(max_steps=1, default_root_dir=str(tmp_path / "run"), **QUIET).fit(
            _task(init_from=str(bad)), ToyDataModule(num_batches=1))
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(FileNotFoundError, match="flow.pt"):
        FlowTask(flow=ToyPart(), init_from=str(tmp_path)).load_init_from()


def test_resume_does_not_read_init_from(tmp_path):
    """Fine-tune from a model directory, move the directory away, resume with ckpt_path='last': the
    checkpoint alone suffices and the result equals an uninterrupted run (before: FileNotFoundError,
    because init_from was read again in SpeechTask.__init__)."""
    torch.manual_seed(5)
    base = tmp_path / "pretrained"
    base.mkdir()
    torch.save(ToyPart(dropout=0.3).state_dict(), base / "llm.pt")
    part = {"dropout": 0.3}
    rec_a = StepRecorder()
    build_trainer(max_steps=6, default_root_dir=str(tmp_path / "a"), callbacks=[rec_a], **QUIET).fit(
        _task(part=part, init_from=str(base)), ToyDataModule(num_batches=3))
    run = tmp_path / "b"
    rec_b1, rec_b2 = StepRecorder(), StepRecorder()
    build_trainer(max_steps=3, default_root_dir=str(run), callbacks=[rec_b1], **QUIET).fit(
        _task(part=part, init_from=str(base)), ToyDataModule(num_batches=3))
    base.rename(tmp_path / "moved")
    build_trainer(max_steps=6, default_root_dir=str(run), callbacks=[rec_b2], **QUIET).fit(
        _task(seed=1, part=part, init_from=str(base)), ToyDataModule(num_batches=3), ckpt_path="last")
    assert [r["loss"] for r in rec_b1.rows + rec_b2.rows] == [r["loss"] for r in rec_a.rows]
    assert torch.equal(rec_a.rows[-1]["weight"], rec_b2.rows[-1]["weight"])


def test_ckpt_path_last_without_a_checkpoint_still_starts_from_init_from(tmp_path):
    """`--ckpt_path last` on a first run restores nothing: init_from must still be loaded (not random weights)."""
    torch.manual_seed(5)
    sd = ToyPart().state_dict()
    torch.save(sd, tmp_path / "llm.pt")
    task = _task(init_from=str(tmp_path), train_conf={"optim_conf": {"lr": 0.0}, "scheduler": "constantlr"})
    build_trainer(max_steps=1, default_root_dir=str(tmp_path / "run"), limit_val_batches=0, **QUIET).fit(
        task, ToyDataModule(num_batches=1), ckpt_path="last")
    assert all(torch.equal(v, task.llm.state_dict()[k]) for k, v in sd.items())


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


@pytest.mark.parametrize("every,top_k,expected", [
    (2, -1, ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "last.ckpt"]),
    (2, 1, ["epoch=0-step=3.ckpt", "last.ckpt"]),
    (2, 0, ["last.ckpt"]),
    (50, 0, ["last.ckpt"]),  # stopped before the first step trigger: only the epoch-end save (the sft recipe)
])
def test_step_checkpoint_keeps_one_current_last(tmp_path, every, top_k, expected):
    from cosytrain.tasks.callbacks import StepCheckpoint

    build_trainer(max_steps=3, default_root_dir=str(tmp_path), limit_val_batches=0, **QUIET,
                  callbacks=[StepCheckpoint(every_n_train_steps=every, save_top_k=top_k)]).fit(
        _task(), ToyDataModule(num_batches=4))
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == expected, names
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    # the epoch stopped by max_steps is still open in last.ckpt (Lightning >= 2.6 would re-save it at train end
    # as completed, and a resume would skip the rest of the epoch)
    assert last["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0
    state = next(v for k, v in last["callbacks"].items() if k.startswith("StepCheckpoint"))
    assert state["last_model_path"] == str(tmp_path / "checkpoints" / "last.ckpt")
    if top_k:
        assert state["best_model_path"] == str(tmp_path / "checkpoints" / "epoch=0-step=3.ckpt")


def test_step_checkpoint_uses_only_public_lightning_api():
    """setup.cfg allows any Lightning 2.x >= 2.4: StepCheckpoint may not touch ModelCheckpoint's or the
    Trainer's private members (before: _should_skip_saving_checkpoint, _monitor_candidates,
    _save_topk_checkpoint, _save_last_checkpoint). Its own private helpers are fine."""
    import ast
    import inspect
    import textwrap

    from lightning.pytorch.callbacks import ModelCheckpoint

    from cosytrain.tasks.callbacks import StepCheckpoint

    inherited = {n for n in dir(ModelCheckpoint) if n.startswith("_") and not n.startswith("__")}
    inherited |= {n for n in vars(ModelCheckpoint(every_n_train_steps=1)) if n.startswith("_")}
    tree = ast.parse(textwrap.dedent(inspect.getsource(StepCheckpoint)))
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            holder = ast.unparse(node.value)
            if holder != "self" or node.attr in inherited:  # trainer._x, super()._x, or a Lightning self._x
                private.append(f"{holder}.{node.attr}")
    assert not private, private


def test_rows_without_instruct_are_counted(tmp_path):
    """collate pads rows without an instruction to length 0 in batches that carry instructions; the task
    counts those rows (data/rows_without_instruct) so a half-covered instruct file is visible."""
    dm = ToyDataModule(num_batches=2)
    batches = toy_batches(2)
    for b, lens in zip(batches, ([3, 0, 0, 2], [0, 0, 0, 1])):
        b["instruct_token_len"] = torch.tensor(lens, dtype=torch.int32)
    dm.train_dataloader = lambda: torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    build_trainer(max_steps=2, default_root_dir=str(tmp_path), limit_val_batches=0, enable_checkpointing=False,
                  **QUIET).fit(_task(), dm)
    tags = read_scalars(tmp_path)
    assert [v for _, v in tags["data/rows_without_instruct_step"]] == [2.0, 3.0]
    assert [v for _, v in tags["data/rows_with_instruct_step"]] == [2.0, 1.0]
    assert tags["data/rows_without_instruct_epoch"][-1][1] == 5.0
