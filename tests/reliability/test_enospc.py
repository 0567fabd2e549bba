"""A full disk while writing a checkpoint or an export: one clear line, the previous file intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosytrain.tasks.checkpoint_io import AtomicCheckpointIO
from cosytrain.tasks.lightning_cli import build_trainer, main
from cosytrain.utils.atomic import AtomicWriteError, atomic_torch_save
from tests.inference import _tiny_v1 as tiny
from tests.reliability._hooks import fill_disk

TOY = """
trainer:
  accelerator: cpu
  max_steps: 4
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  logger: false
  callbacks:
    - class_path: cosytrain.tasks.callbacks.StepCheckpoint
      init_args: {{every_n_train_steps: 1, save_top_k: 1, dirpath: {ckpt_dir}}}
    - class_path: tests.reliability._hooks.FillDiskAfterStep
      init_args: {{path: {ckpt_dir}, step: 1, leave: 2048}}
model:
  class_path: cosytrain.tasks.speech_task.LLMTask
  init_args:
    llm:
      class_path: tests.tasks._toy.ToyPart
      init_args: {{vocab: 16, dim: 32}}
    train_conf: {{optim: adam, optim_conf: {{lr: 0.01}}, scheduler: constantlr, grad_clip: 5}}
data:
  class_path: tests.tasks._toy.ToyDataModule
  init_args: {{num_batches: 4}}
"""


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_trainer_gets_the_atomic_checkpoint_io(tmp_path: Path) -> None:
    trainer = build_trainer(accelerator="cpu", max_steps=1, default_root_dir=str(tmp_path), logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_checkpoint_write_on_a_full_disk_is_one_line_and_keeps_last(tmp_path: Path, small_disk: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "toy.yaml"
    config.write_text(TOY.format(ckpt_dir=small_disk))
    code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cosytrain fit:")]
    assert code == 1 and len(lines) == 1, lines
    assert "no space left on device" in lines[0] and str(small_disk) in lines[0]
    last = torch.load(small_disk / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1  # step 2's save failed; step 1's checkpoint is whole
    assert _temps(small_disk) == []


def test_atomic_torch_save_on_a_full_disk(small_disk: Path) -> None:
    target = small_disk / "weights.pt"
    atomic_torch_save({"w": torch.ones(8)}, target)
    fill_disk(small_disk, leave=1024)
    with pytest.raises(AtomicWriteError, match="no space left") as err:
        atomic_torch_save({"w": torch.zeros(64 * 1024)}, target)
    assert "\n" not in str(err.value)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(8))
    assert _temps(small_disk) == []


def test_export_on_a_full_disk_keeps_the_previous_export(tmp_path: Path, small_disk: Path) -> None:
    from cosytrain.export import ExportError, export_model

    torch.set_num_threads(1)
    base = tiny.make_model_dir(tmp_path / "base")
    out = small_disk / "export"
    first = tiny.make_ckpt(tmp_path / "one.ckpt", {"llm": tiny.perturbed("llm", 7)}, 0, 5)
    export_model([first], out, base=base, check=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill_disk(small_disk, leave=64 * 1024)
    second = tiny.make_ckpt(tmp_path / "two.ckpt", {"llm": tiny.perturbed("llm", 8)}, 0, 6)
    with pytest.raises(BaseException) as err:
        export_model([second], out, base=base, overwrite=True, check=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, byte for byte
    assert sorted(p.name for p in small_disk.iterdir()) == ["export", "filler"]  # no temp dir left
    # export writes weights through memory (cosytrain.export.writer._save), so the OSError surfaces and is worded once
    assert isinstance(err.value, (AtomicWriteError, ExportError)), f"{type(err.value).__name__}: {err.value}"
    assert "no space left" in str(err.value) and "\n" not in str(err.value)
