"""DeepSpeed overlays: what they build, what they refuse, and the real engine on CPU (one rank, gloo).

The engine runs through ``tests/tasks/_deepspeed_cpu.py`` (Lightning's CUDA-only checks lifted), so
ZeRO-2/3, DeepSpeed's ``torch_autocast``, its clipping, overflow skips, checkpoint folders and
``GatheredParameters`` are the real ones. deepspeed is in the CI set (constraints.txt).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from cosytrain.tasks.lightning_cli import build_trainer, main, prepare_trainer_kwargs
from cosytrain.tasks.speech_task import FlowTask, LLMTask
from tests.tasks._toy import StepRecorder, ToyDataModule, ToyFlow, ToyPart, read_scalars

deepspeed = pytest.importorskip("deepspeed") if __import__("os").environ.get("CI") != "true" else __import__("deepspeed")

from cosytrain.tasks.deepspeed import (  # noqa: E402  (after the deepspeed import check)
    CosyDeepSpeedPrecision, CosyDeepSpeedStrategy, DeepSpeedConfigError, gathered_parameters,
)
from tests.tasks._deepspeed_cpu import cpu_strategy, deepspeed_process  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
             num_sanity_val_steps=0)
CONF = {"optim": "adam", "optim_conf": {"lr": 0.01}, "scheduler": "constantlr", "scheduler_conf": {}}


def _overlay_strategy(name: str) -> CosyDeepSpeedStrategy:
    """The strategy object exactly as the overlay's class_path/init_args build it."""
    spec = yaml.safe_load((REPO / "conf" / "strategy" / name).read_text())["trainer"]
    assert spec["strategy"]["class_path"] == "cosytrain.tasks.deepspeed.CosyDeepSpeedStrategy"
    return CosyDeepSpeedStrategy(**spec["strategy"]["init_args"]), spec


def _formatted_config(strategy, task, **trainer_kwargs) -> dict:
    """The DeepSpeed config dict the strategy hands ``deepspeed.initialize`` for ``task`` (no engine built)."""
    trainer = build_trainer(strategy=strategy, logger=False, enable_checkpointing=False, **trainer_kwargs)
    trainer.strategy._lightning_module = task
    trainer.strategy.config.setdefault("train_micro_batch_size_per_gpu", 1)  # fit reads it from the loader
    task.trainer = trainer
    trainer.strategy._format_config()
    return trainer.strategy.config


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_overlay_resolves_to_bf16_autocast_fp32_params_and_the_recipes_clip(name, stage):
    strategy, spec = _overlay_strategy(name)
    task = LLMTask(llm=ToyPart(), train_conf={**CONF, "grad_clip": 2.5})
    config = _formatted_config(strategy, task, precision=spec["precision"], accelerator="cpu")
    plugin = strategy.precision_plugin
    assert isinstance(plugin, CosyDeepSpeedPrecision) and plugin.precision == "bf16-mixed"
    assert plugin.autocast_dtype == torch.bfloat16
    assert config["zero_optimization"]["stage"] == stage
    # DeepSpeed's half engines off (module stays FP32), its torch.autocast on in BF16
    assert config["fp16"] == {"enabled": False} and config["bf16"] == {"enabled": False}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert config["gradient_clipping"] == 2.5  # the recipe's train_conf.grad_clip, not a trainer value
    # inputs are not cast (Lightning's DeepSpeedPrecision would make the features FP16)
    batch = {"speech_feat": torch.ones(1, 2), "speech_token": torch.ones(1, 2, dtype=torch.long)}
    assert plugin.convert_input(batch)["speech_feat"].dtype == torch.float32


def test_fp32_overlay_turns_autocast_off():
    strategy, _ = _overlay_strategy("deepspeed_zero2.yaml")
    config = _formatted_config(strategy, LLMTask(llm=ToyPart(), train_conf=CONF), precision="32-true",
                               accelerator="cpu")
    assert config["torch_autocast"] == {"enabled": False} and config["gradient_clipping"] == 5.0


def test_refusals_are_one_line():
    task = LLMTask(llm=ToyPart(), train_conf={**CONF, "grad_clip": 5})
    with pytest.raises(DeepSpeedConfigError, match="16-mixed with DeepSpeed") as err:
        build_trainer(strategy=CosyDeepSpeedStrategy(stage=2), precision="16-mixed", accelerator="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(DeepSpeedConfigError, match=r"gradient clipping is set twice \(trainer.gradient_clip_val=1"):
        _formatted_config(CosyDeepSpeedStrategy(stage=2), task, precision="bf16-mixed", gradient_clip_val=1.0)
    with pytest.raises(DeepSpeedConfigError, match="enables its fp16 engine"):
        CosyDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}})
    from lightning.pytorch.strategies import DeepSpeedStrategy

    for plain in ("deepspeed_stage_2", DeepSpeedStrategy(stage=2)):
        with pytest.raises(DeepSpeedConfigError, match="Lightning's DeepSpeed strategy runs 16-mixed as DeepSpeed's"):
            prepare_trainer_kwargs({"strategy": plain, "precision": "16-mixed"})
    # `auto` under DeepSpeed never means FP16: bf16 where CUDA has it, FP32 here
    assert prepare_trainer_kwargs({"strategy": CosyDeepSpeedStrategy(stage=2), "precision": "auto"})["precision"] == "32-true"


def test_cli_refuses_a_clip_set_twice(tmp_path, capsys):
    from tests.tasks.test_cli import BASE

    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE)
    code = main(["fit", "--config", str(cfg), "--config", str(REPO / "conf" / "strategy" / "deepspeed_zero2.yaml"),
                 "--trainer.gradient_clip_val", "1.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "gradient clipping is set twice" in err[0], err


def test_gan_task_is_refused_before_deepspeed_starts():
    class Manual(LLMTask):
        def __init__(self):
            super().__init__(llm=ToyPart(), train_conf=CONF)
            self.automatic_optimization = False

    strategy = CosyDeepSpeedStrategy(stage=2)
    trainer = build_trainer(strategy=strategy, precision="bf16-mixed", accelerator="cpu", logger=False)
    strategy._lightning_module = Manual()
    with pytest.raises(DeepSpeedConfigError, match="train it with conf/strategy/ddp.yaml"):
        strategy.setup(trainer)


# ---------------------------------------------------------------- callbacks under ZeRO-3 (stand-in gather)
class _Recorder:
    """Stands in for deepspeed.zero.GatheredParameters: records which parameters each entry gathered."""

    def __init__(self) -> None:
        self.calls: list[list[torch.nn.Parameter]] = []

    def __call__(self, params, modifier_rank=None):
        assert modifier_rank is None  # read-only gather: no rank broadcasts changes back
        self.calls.append(list(params))
        return __import__("contextlib").nullcontext()


def _zero3_trainer(rank: int) -> SimpleNamespace:
    strategy = CosyDeepSpeedStrategy(stage=3)
    return SimpleNamespace(strategy=strategy, is_global_zero=rank == 0, world_size=1, sanity_checking=False,
                           current_epoch=0, global_step=3, loggers=[], datamodule=None, log_dir=None,
                           default_root_dir="/nonexistent")


@pytest.mark.parametrize("rank", [0, 1])
def test_callbacks_gather_on_every_rank_under_zero3(monkeypatch, rank):
    from cosytrain.tasks.callbacks import MelImageLogger
    from cosytrain.tasks.fp16_callback import FP16EvalCallback
    from cosytrain.tasks.synthesis_callback import SynthesisCallback

    recorder = _Recorder()
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recorder)
    flow = ToyFlow()
    module = SimpleNamespace(flow=flow, llm=None, hift=None, device=torch.device("cpu"), log=lambda *a, **k: None)
    trainer = _zero3_trainer(rank)
    batch = {"speech_feat": torch.zeros(1, 4, 80)}
    MelImageLogger().on_validation_batch_end(trainer, module, None, batch, 0)
    fp16 = FP16EvalCallback(speech=False)
    monkeypatch.setattr(fp16, "_check", lambda *a: [])
    fp16.on_validation_epoch_end(trainer, module)
    synth = SynthesisCallback(speaker_encoder="none", log_audio=False, write_report=False)
    monkeypatch.setattr(synth, "_synthesise_and_measure", lambda *a: {})
    synth.on_validation_epoch_end(trainer, module)
    # three gathers on rank 0 AND on the others (a collective), each of the flow's full parameter list
    assert [len(c) for c in recorder.calls] == [len(list(flow.parameters()))] * 3
    assert all(c[0] is flow.embed.weight for c in recorder.calls)


def test_gather_is_a_no_op_without_zero3(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recorder)
    for strategy in (CosyDeepSpeedStrategy(stage=2), None):
        with gathered_parameters(SimpleNamespace(strategy=strategy), ToyFlow()):
            pass
    assert recorder.calls == []


# ---------------------------------------------------------------- the real engine on CPU
@pytest.fixture(scope="module")
def ds_process():
    """One gloo group for every engine test here: DeepSpeed caches its groups, so it is made once."""
    with deepspeed_process():
        yield


def _fit(strategy, task, tmp_path, steps=3, callbacks=(), ckpt_path=None, **kw):
    rec = StepRecorder()
    # one rank: keep the loader's own order (Lightning would put a DistributedSampler in, which reorders)
    trainer = build_trainer(strategy=strategy or "auto", max_steps=steps, default_root_dir=str(tmp_path),
                            callbacks=[*([rec] if "llm" in task.part_names else []), *callbacks],
                            use_distributed_sampler=False, **{**QUIET, **kw})
    trainer.fit(task, ToyDataModule(num_batches=4), ckpt_path=ckpt_path)
    return trainer, rec


def test_zero2_trains_the_single_device_numbers_with_the_recipes_clip_and_skips(tmp_path, ds_process):
    """ZeRO-2 + BF16 autocast == cosytrain's single-device BF16 run: same clip (active: 0.05), same
    BF16 compute, the same step skipped after an injected inf, counted; checkpoint folder -> export."""
    train_conf = {**CONF, "grad_clip": 0.05}

    def task():
        torch.manual_seed(0)
        return LLMTask(llm=ToyPart(inf_at_call=2), train_conf=train_conf)

    _, ref = _fit(None, task(), tmp_path / "ref", steps=4, precision="bf16-mixed", limit_val_batches=0)
    trainer, got = _fit(cpu_strategy(2), task(), tmp_path / "ds", steps=4, precision="bf16-mixed",
                        limit_val_batches=0)
    assert [r["dtype"] for r in got.rows] == [torch.bfloat16] * 4  # autocast ran inside the engine
    assert [r["skipped"] for r in got.rows] == [r["skipped"] for r in ref.rows] == [0, 0, 1, 1]
    assert trainer.strategy.config["gradient_clipping"] == 0.05
    for a, b in zip(ref.rows, got.rows):
        assert a["loss"] == b["loss"] or abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
        torch.testing.assert_close(b["weight"], a["weight"], rtol=0, atol=2e-6)
    # the weights moved (the clip made steps small, not zero) and the skipped step left them alone
    assert not torch.equal(got.rows[0]["weight"], got.rows[1]["weight"])
    assert torch.equal(got.rows[1]["weight"], got.rows[2]["weight"])
    # the ZeRO folder consolidates into the trained FP32 weights, split into upstream part files
    from cosytrain.export.zero_to_state_dict import consolidate, write_part_files

    folder = tmp_path / "ds" / "checkpoints" / "last.ckpt"
    assert folder.is_dir()
    state = torch.load(consolidate(folder, tmp_path / "fp32.ckpt"), weights_only=True)["state_dict"]
    torch.testing.assert_close(state["llm.out.weight"], got.rows[-1]["weight"], rtol=0, atol=0)
    parts = write_part_files(state, tmp_path / "parts")
    assert set(parts) == {"llm"}


class _WeightReadingFlow(ToyFlow):
    """Reads its weights directly (no submodule call): ZeRO-3's per-module fetch hooks cannot help it.

    (On one rank the hooks would fetch a submodule's weights when it is called; with several ranks
    that fetch is a collective that rank 0 alone would enter: a hang. Direct reads show the gap on one.)
    """

    def _mel(self, token: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.embedding(token, self.embed.weight)
        h = h + torch.nn.functional.linear(embedding, self.spk.weight, self.spk.bias).unsqueeze(1)
        return h.repeat_interleave(2, dim=1)


def test_zero3_partitions_and_the_mel_callback_gathers(tmp_path, ds_process):
    """Under real ZeRO-3 a part's parameters are empty outside the engine; MelImageLogger still draws the
    flow's mel (it gathered them), and the run resumes from its ZeRO-3 folder."""
    from cosytrain.tasks.callbacks import MelImageLogger

    torch.manual_seed(0)
    task = FlowTask(flow=_WeightReadingFlow(), train_conf=CONF)
    mel = MelImageLogger()
    strategy = cpu_strategy(3)
    # ZeRO-3 keeps parameters under 1e5 elements whole and leaves recently used ones gathered; these
    # settings release every parameter right after its use, so a callback finds them partitioned
    strategy.config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0,
                                                stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    _fit(strategy, task, tmp_path, steps=2, callbacks=[mel], precision="bf16-mixed", limit_val_batches=1,
         val_check_interval=2)
    assert task.flow.embed.weight.numel() == 0  # partitioned: a callback without the gather would fail
    assert mel.logged == ["val/mel_target", "val/mel_flow"]
    resumed = FlowTask(flow=_WeightReadingFlow(), train_conf=CONF)
    trainer, _ = _fit(cpu_strategy(3), resumed, tmp_path, steps=4, precision="bf16-mixed", limit_val_batches=0,
                      ckpt_path="last")
    assert trainer.global_step == 4 and (tmp_path / "checkpoints" / "last.ckpt" / "checkpoint").is_dir()
    assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == [1, 2, 3, 4]
