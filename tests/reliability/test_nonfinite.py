"""NaN/inf injected under FP16 (CPU autocast + GradScaler) into a batch feature, an activation and a
gradient of the real (tiny) CosyVoice-1 llm + flow: the step is skipped and counted, the loss scale
lowered, the weights stay finite and unchanged over the skipped step, training goes on."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch

from cosytrain.tasks.lightning_cli import build_trainer
from cosytrain.tasks.speech_task import SpeechTask
from tests.inference import _tiny_v1 as tiny
from tests.tasks._toy import _ListDataset

STEPS, BAD = 4, 2  # the batch with index BAD (0-based, the third optimizer step) carries the fault


def _batches(n: int, seed: int = 0, b: int = 2, t_text: int = 6, t_tok: int = 8, t_feat: int = 14) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{
        "text_token": torch.randint(1, 100, (b, t_text), generator=g), "text_token_len": torch.full((b,), t_text),
        "speech_token": torch.randint(0, 40, (b, t_tok), generator=g), "speech_token_len": torch.full((b,), t_tok),
        "speech_feat": torch.randn(b, t_feat, 80, generator=g), "speech_feat_len": torch.full((b,), t_feat),
        "embedding": torch.randn(b, 192, generator=g), "utts": [f"u{i}" for i in range(b)],
    } for _ in range(n)]


class _Data(pl.LightningDataModule):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_ListDataset(_batches(STEPS)), batch_size=None, shuffle=False)


class _Fault(pl.Callback):
    """Plants the fault at batch ``BAD`` and records, after every step, the weights and counters."""

    def __init__(self, plant: Callable[[SpeechTask, dict], Callable[[], None]]) -> None:
        self.plant, self.undo = plant, None
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == BAD:
            self.undo = self.plant(pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.undo is not None:
            self.undo()
            self.undo = None
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.rows.append({"loss": float(outputs["loss"]), "params": params, "skipped": pl_module.skipped_steps,
                          "scale": float(trainer.precision_plugin.scaler.get_scale())})


def _nan_feature(task: SpeechTask, batch: dict) -> Callable[[], None]:
    batch["speech_feat"][0, 3, 5] = float("nan")  # one mel bin of one frame
    return lambda: None


def _inf_activation(task: SpeechTask, batch: dict) -> Callable[[], None]:
    def hook(module, args, output):  # the llm's output layer (FP16 under autocast): one logit column inf
        output = output.clone()
        output[..., 0] = float("inf")
        return output

    return task.llm.llm_decoder.register_forward_hook(hook).remove


def _nan_gradient(task: SpeechTask, batch: dict) -> Callable[[], None]:
    weight = next(p for n, p in task.flow.named_parameters() if n.startswith("decoder.estimator") and p.dim() > 1)
    return weight.register_hook(lambda grad: torch.full_like(grad, float("nan"))).remove


@pytest.mark.parametrize("plant", [_nan_feature, _inf_activation, _nan_gradient],
                         ids=["nan-in-batch-feature", "inf-in-activation", "nan-in-gradient"])
def test_fault_under_fp16_skips_one_step_and_keeps_weights_finite(tmp_path, plant) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = SpeechTask(llm=tiny.build("llm").train(), flow=tiny.build("flow").train(),
                      train_conf={"optim": "adam", "optim_conf": {"lr": 1e-3}, "scheduler": "constantlr",
                                  "grad_clip": 5})
    fault = _Fault(plant)
    trainer = build_trainer(accelerator="cpu", devices=1, precision="16-mixed", max_steps=STEPS,
                            default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[fault])
    trainer.fit(task, datamodule=_Data())
    rows = fault.rows
    assert len(rows) == STEPS
    assert [r["skipped"] for r in rows] == [0] * BAD + [1] * (STEPS - BAD)  # counted once, at the faulty step
    assert task.skipped_steps == 1
    for row in rows:
        assert all(torch.isfinite(p).all() for p in row["params"].values()), "a weight became non-finite"
    before, at, after = rows[BAD - 1]["params"], rows[BAD]["params"], rows[BAD + 1]["params"]
    assert all(torch.equal(before[n], at[n]) for n in before), "the faulty step changed weights"
    assert any(not torch.equal(at[n], after[n]) for n in at), "training did not go on after the skip"
    assert rows[BAD]["scale"] == rows[BAD - 1]["scale"] / 2  # the GradScaler saw the inf/NaN too
    assert all(r["loss"] == r["loss"] for i, r in enumerate(rows) if i != BAD)
