"""CUDA runs: FP16/BF16 steps of every stage, the FP16 gate, DeepSpeed ZeRO-2 on one GPU, FP16 inference.

Marked ``gpu`` and skipped without CUDA (``tests/gpu/conftest.py``). Each test is small (tiny fixture
parts, a few steps): the whole tier is meant to fit a few minutes of a lent GPU
(``bench/gpu_session.sh`` runs it first).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from cosytrain.evaluation.fp16_batches import synthetic_batch
from cosytrain.tasks.lightning_cli import build_trainer
from cosytrain.tasks.speech_task import FlowTask, LLMTask
from tests.gpu.conftest import ON_CPU
from tests.inference import _tiny_v1 as tiny

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONF = {"optim": "adam", "optim_conf": {"lr": 1e-4}, "scheduler": "constantlr", "scheduler_conf": {},
              "grad_clip": 5}


def _quiet(device: torch.device) -> dict:
    return dict(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, enable_progress_bar=False,
                enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0)


def _loader(n: int = 4) -> torch.utils.data.DataLoader:
    """Fixture-sized utterances (text vocab 100 < the fixture's, speech vocab 40 < 64) with real mels."""
    batches = [synthetic_batch(2, text_vocab=100, speech_vocab=40, min_tokens=12, max_tokens=20, seed=s)
               for s in range(n)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


class Record(pl.Callback):
    """Per step: the loss scale after the step, a weight snapshot, the task's skipped count."""

    def __init__(self, param: str) -> None:
        self.param, self.rows = param, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.rows.append({"scale": float(scaler.get_scale()) if scaler is not None else None,
                          "weight": dict(pl_module.named_parameters())[self.param].detach().float().cpu().clone(),
                          "skipped": pl_module.skipped_steps})


def _dtype_probe(module: torch.nn.Module, seen: list) -> None:
    """Record the output dtype of the first Linear inside ``module`` (what autocast made of it)."""
    first = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_hook(lambda m, i, o: seen.append(o.dtype))


@pytest.mark.parametrize("stage", ["llm", "flow"])
def test_16_mixed_step_skips_an_injected_overflow_and_lowers_the_scale(stage, device, tmp_path):
    torch.manual_seed(0)
    part = tiny.build(stage)
    task = LLMTask(llm=part, train_conf=TRAIN_CONF) if stage == "llm" else FlowTask(flow=part, train_conf=TRAIN_CONF)
    name, target = next((n, p) for n, p in task.named_parameters() if p.requires_grad)
    target.register_hook(lambda g: torch.full_like(g, math.inf) if task.global_step == 1 else g)
    seen: list = []
    _dtype_probe(part, seen)
    rec = Record(name)
    build_trainer(precision="16-mixed", max_steps=3, default_root_dir=str(tmp_path), callbacks=[rec],
                  **_quiet(device)).fit(task, _loader())
    assert torch.float16 in seen  # autocast ran FP16 matmuls
    assert [r["skipped"] for r in rec.rows] == [0, 1, 1]
    assert rec.rows[1]["scale"] == rec.rows[0]["scale"] / 2  # GradScaler backed off after the overflow
    assert torch.equal(rec.rows[0]["weight"], rec.rows[1]["weight"])  # the overflowing step changed nothing
    assert not torch.equal(rec.rows[1]["weight"], rec.rows[2]["weight"])  # the next one trained
    assert all(torch.isfinite(r["weight"]).all() for r in rec.rows)


@pytest.mark.parametrize("stage", ["llm", "flow"])
def test_bf16_mixed_step_has_no_scaler(stage, device, tmp_path):
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no BF16")
    torch.manual_seed(0)
    part = tiny.build(stage)
    task = LLMTask(llm=part, train_conf=TRAIN_CONF) if stage == "llm" else FlowTask(flow=part, train_conf=TRAIN_CONF)
    seen: list = []
    _dtype_probe(part, seen)
    trainer = build_trainer(precision="bf16-mixed", max_steps=2, default_root_dir=str(tmp_path), **_quiet(device))
    trainer.fit(task, _loader())
    assert torch.bfloat16 in seen and getattr(trainer.precision_plugin, "scaler", None) is None
    assert all(torch.isfinite(p).all() for p in task.parameters())


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_hift_gan_step(precision, device, tmp_path):
    from tests.tasks.test_hift_task import VocoderData, make_task

    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no BF16")
    task = make_task(precision=precision, grad_scaler_init_scale=16.0)
    if precision == "16-mixed":  # an inf into one discriminator gradient on the 2nd batch only
        target = task.discriminator.mrd.discriminators[0].out.bias
        target.register_hook(lambda g: torch.full_like(g, math.inf) if task.global_step == 1 else g)
    quiet = {k: v for k, v in _quiet(device).items() if k != "limit_val_batches"}
    build_trainer(max_steps=2, default_root_dir=str(tmp_path), **quiet).fit(task, VocoderData(num_batches=2))
    want = torch.float16 if precision == "16-mixed" else torch.bfloat16
    assert task.compute_dtype == want
    if precision == "16-mixed":
        assert task.skipped_steps == {"generator": 0, "discriminator": 1}
        assert task.scalers["discriminator"].get_scale() == 8.0 and task.scalers["generator"].get_scale() == 16.0
    assert all(torch.isfinite(p).all() for p in task.hift.parameters())


def test_fp16_eval_callback_passes_its_default_tolerances(device, tmp_path):
    """The FP16 gate on this device: the fixture parts pass the default tolerances (calibrated on CPU)."""
    from tests.tasks.test_fp16_callback import Holder, _part

    from cosytrain.tasks.fp16_callback import FP16EvalCallback

    holder = Holder(llm=_part("v1_llm"), flow=_part("v1_flow"))
    callback = FP16EvalCallback(num_utterances=2, speech=False, log_media=False)
    loader = _loader(2)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=[callback], logger=False,
                         enable_checkpointing=False, **{k: v for k, v in _quiet(device).items()
                                                        if k not in ("limit_val_batches", "log_every_n_steps")})
    trainer.fit(holder, loader, loader)
    figures = callback.last_figures
    assert figures is not None and figures["passed"], figures.get("failures")
    assert set(figures["stages"]) >= {"llm", "flow"}
    (tmp_path / "fp16_callback_figures.json").write_text(json.dumps(figures, default=str, indent=1))
    _keep_figures("fp16_callback", figures)


def test_check_fp16_cli(device, tmp_path, capsys):
    from cosytrain.evaluation import fp16_cli

    model_dir = tiny.make_model_dir(tmp_path / "model")
    (model_dir / "cosytrain.json").write_text(json.dumps({"format": 1, "generation": "v1"}))
    assert fp16_cli.main(["--model_dir", str(model_dir), "--num_utterances", "2", "--device", str(device)]) == 0
    written = json.loads((model_dir / "fp16_check.json").read_text())
    assert written["passed"] and set(written["stages"]) == {"llm", "flow", "hift"}, written.get("failures")
    _keep_figures("check_fp16", written)


def test_inference_classes_with_fp16(device, tmp_path):
    from cosytrain.inference.model import CosyVoiceModel

    force = device.type == "cpu"  # on the CPU fp16=True runs FP32 unless forced
    model = CosyVoiceModel(tiny.build("llm"), tiny.build("flow"), tiny.build("hift"), fp16=True, device=str(device),
                           force_fp16=force)
    tokens = torch.randint(0, 40, (1, 60), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    embedding = torch.randn(1, 192, generator=torch.Generator().manual_seed(5))
    out = list(model.tts(source_speech_token=tokens, flow_embedding=embedding))
    speech = torch.cat([o["tts_speech"] for o in out], dim=1)
    assert speech.dtype == torch.float32 and torch.isfinite(speech).all() and speech.abs().max() > 0
    assert speech.shape[1] == int(60 / 50 * 22050 / 256) * 256
    streamed = list(model.tts(source_speech_token=tokens, flow_embedding=embedding, stream=True))
    assert all(torch.isfinite(o["tts_speech"]).all() for o in streamed)


def test_deepspeed_zero2_fit_resume_consolidate_and_export(device, tmp_path):
    """One-GPU ZeRO-2 (BF16 autocast in the engine): fit 2 steps, resume to 4, consolidate the folder with
    ``python -m cosytrain.export.zero_to_state_dict``, export the ZeRO folder onto a base directory."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    if device.type == "cuda":
        from cosytrain.tasks.deepspeed import CosyDeepSpeedStrategy as Strategy
        context = _nullcontext()
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    else:
        from tests.tasks._deepspeed_cpu import CPUDeepSpeedStrategy as Strategy, deepspeed_process
        context = deepspeed_process()
        precision = "bf16-mixed"
    run = tmp_path / "run"
    with context:
        for steps, ckpt in ((2, None), (4, "last")):
            torch.manual_seed(0)
            task = LLMTask(llm=tiny.build("llm"), train_conf=TRAIN_CONF)
            trainer = build_trainer(strategy=Strategy(stage=2, logging_batch_size_per_gpu=2), precision=precision,
                                    max_steps=steps, default_root_dir=str(run), **_quiet(device))
            trainer.fit(task, _loader(), ckpt_path=ckpt)
            assert trainer.global_step == steps
            assert trainer.strategy.config["gradient_clipping"] == 5.0
    folder = run / "checkpoints" / "last.ckpt"
    assert (folder / "checkpoint").is_dir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cosytrain.export.zero_to_state_dict", str(folder),
                           str(tmp_path / "fp32.ckpt"), "--split-into", str(tmp_path / "parts")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    llm = torch.load(tmp_path / "parts" / "llm.pt", weights_only=True)
    tiny.build("llm").load_state_dict(llm, strict=True)
    base = tiny.make_model_dir(tmp_path / "base")
    proc = subprocess.run([sys.executable, "-m", "cosytrain", "export", str(folder), "-o", str(tmp_path / "out"),
                           "--base", str(base)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = torch.load(tmp_path / "out" / "llm.pt", weights_only=True)
    assert all(torch.equal(exported[k], llm[k]) for k in llm)


# ------------------------------------------------------------------------------------------ helpers
class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _keep_figures(name: str, figures: dict) -> None:
    """bench/gpu_session.sh sets COSYTRAIN_GPU_FIGURES to a folder under $OUT: the figures come back."""
    folder = os.environ.get("COSYTRAIN_GPU_FIGURES")
    if folder and not ON_CPU:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(figures, default=str, indent=1))
