"""Precision means the same on CPU as on GPU: FP16 autocast + GradScaler, overflow skips, scaler resume."""

from __future__ import annotations

import math

import pytest
import torch

from cosytrain.tasks.lightning_cli import build_trainer
from cosytrain.tasks.precision import CosyMixedPrecision, apply_precision
from cosytrain.tasks.speech_task import SpeechTask
from tests.tasks._toy import StepRecorder, ToyDataModule, ToyPart, read_scalars

QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
             num_sanity_val_steps=0, limit_val_batches=0)


def _fit(tmp_path, precision, max_steps, inf_at_call=-1, ckpt_path=None, warmup=3, num_batches=4):
    torch.manual_seed(0)
    task = SpeechTask(llm=ToyPart(inf_at_call=inf_at_call),
                      train_conf={"scheduler": "warmuplr", "scheduler_conf": {"warmup_steps": warmup},
                                  "optim_conf": {"lr": 0.01}})
    rec = StepRecorder()
    trainer = build_trainer(precision=precision, max_steps=max_steps, default_root_dir=str(tmp_path),
                            callbacks=[rec], **QUIET)
    trainer.fit(task, ToyDataModule(num_batches=num_batches), ckpt_path=ckpt_path)
    return trainer, task, rec


def _cosy_deepspeed():
    """A CosyDeepSpeedStrategy object, or its class name when deepspeed is missing (apply_precision reads the name)."""
    try:
        from cosytrain.tasks.deepspeed import CosyDeepSpeedStrategy

        return CosyDeepSpeedStrategy(stage=2)
    except Exception:  # noqa: BLE001 - no deepspeed installed: Lightning refuses to build the strategy
        return type("CosyDeepSpeedStrategy", (), {})()


def test_16_mixed_stays_fp16_on_cpu():
    kw = apply_precision({"precision": "16-mixed", "accelerator": "cpu"})
    assert kw["precision"] is None
    (plugin,) = kw["plugins"]
    assert isinstance(plugin, CosyMixedPrecision) and plugin.precision == "16-mixed" and plugin.device == "cpu"
    assert plugin.scaler is not None and plugin.scaler.is_enabled()
    assert apply_precision({"precision": "bf16-mixed", "accelerator": "cpu"})["plugins"][0].scaler is None
    # DeepSpeed goes through cosytrain.tasks.deepspeed (tests/tasks/test_deepspeed.py): no AMP plugin here
    assert "plugins" not in apply_precision({"precision": "bf16-mixed", "strategy": _cosy_deepspeed()})


def test_fp16_cpu_fit_uses_fp16_and_logs_scale(tmp_path):
    trainer, task, rec = _fit(tmp_path, "16-mixed", max_steps=3)
    assert isinstance(trainer.precision_plugin, CosyMixedPrecision)
    assert all(r["dtype"] == torch.float16 for r in rec.rows)
    scalars = read_scalars(tmp_path)
    init_scale = trainer.precision_plugin.scaler.get_scale()  # no overflow: scale unchanged
    assert [v for _, v in scalars["train/loss_scale"]] == [init_scale] * 3
    for tag in ("train/loss", "train/acc", "train/lr", "train/grad_norm", "train/skipped_steps"):
        assert len(scalars[tag]) == 3, tag


@pytest.mark.parametrize("precision", ["16-mixed", "32-true"])
def test_inf_gradient_skips_exactly_one_step(tmp_path, precision):
    # forward call 2 (the third optimizer step) gets an inf loss -> inf grads
    trainer, task, rec = _fit(tmp_path, precision, max_steps=4, inf_at_call=2)
    w = [r["weight"] for r in rec.rows]
    assert not torch.equal(w[0], w[1])
    assert torch.equal(w[1], w[2]), "weights changed on the step whose gradient was inf"
    assert not torch.equal(w[2], w[3])
    assert torch.isfinite(w[3]).all()
    assert [r["skipped"] for r in rec.rows] == [0, 0, 1, 1] and task.skipped_steps == 1
    # the optimizer state advanced on 3 of 4 steps; the schedule advanced on all 4 (as upstream)
    opt = trainer.optimizers[0]
    assert all(int(s["step"]) == 3 for s in opt.state.values())
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    base, warm = 0.01, 3
    want = [base * warm**0.5 * min(k**-0.5, k * warm**-1.5) for k in range(2, 6)]
    assert [r["lr"] for r in rec.rows] == pytest.approx(want, rel=1e-12)
    if precision == "16-mixed":
        scales = [r["scale"] for r in rec.rows]
        assert scales[0] == scales[1] and scales[2] == scales[1] / 2 and scales[3] == scales[2]
        assert math.isnan(read_scalars(tmp_path)["train/grad_norm"][2][1])
    else:
        assert rec.rows[0]["dtype"] == torch.float32


def test_scaler_state_saved_and_restored(tmp_path):
    trainer, _, rec = _fit(tmp_path, "16-mixed", max_steps=4, inf_at_call=1)
    lowered = rec.rows[-1]["scale"]
    assert lowered == trainer.precision_plugin.scaler.get_scale() == 2.0**15
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["CosyMixedPrecision"]["scale"] == lowered
    assert ckpt["cosytrain"]["skipped_steps"] == 1
    assert all(k.startswith("llm.") for k in ckpt["state_dict"])
    trainer2, task2, rec2 = _fit(tmp_path, "16-mixed", max_steps=6, ckpt_path="last")
    assert [r["step"] for r in rec2.rows] == [5, 6]
    assert rec2.rows[0]["scale"] == lowered  # not back at the initial 65536
    assert task2.skipped_steps == 1


@pytest.mark.parametrize("precision,dtype", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_bf16_and_fp32_run_without_scaler(tmp_path, precision, dtype):
    trainer, task, rec = _fit(tmp_path, precision, max_steps=2)
    assert [r["dtype"] for r in rec.rows] == [dtype, dtype]
    assert getattr(trainer.precision_plugin, "scaler", None) is None
    assert "train/loss_scale" not in read_scalars(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in rec.rows)


def test_auto_precision_is_fp32_on_cpu_and_fp16_on_cuda():
    from cosytrain.tasks.precision import CosyMixedPrecision, apply_precision, resolve_auto_precision

    assert resolve_auto_precision("auto", "cpu") == "32-true"
    assert resolve_auto_precision("auto", "cuda") == "16-mixed"
    assert resolve_auto_precision("16-mixed", "cpu") == "16-mixed"  # explicit wins on every device
    kw = apply_precision({"precision": "auto", "accelerator": "cpu"})
    assert kw["precision"] is None and not any(isinstance(p, CosyMixedPrecision) for p in kw["plugins"])
    from cosytrain.tasks.deepspeed import prepare_deepspeed_kwargs

    kw = apply_precision(prepare_deepspeed_kwargs({"precision": "auto", "accelerator": "cpu",
                                                   "strategy": _cosy_deepspeed()}))
    assert kw["precision"] == "32-true"
