"""FP16EvalCallback in a real Lightning loop: logs figures, catches an FP16-only fault, warns or stops."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from cosytrain.evaluation.fp16_batches import synthetic_batch
from cosytrain.evaluation.fp16_figures import figures_from_checkpoint
from cosytrain.modeldir import build_from_fixture_config
from cosytrain.tasks.fp16_callback import FP16CheckWarning, FP16EvalCallback
from tests.conftest import load_fixture


@functools.lru_cache(maxsize=None)
def _weights(name: str) -> tuple[dict, dict]:
    fx = load_fixture(name)
    return fx["config"], fx["state_dict"]


def _part(name: str) -> nn.Module:
    config, state = _weights(name)
    module = build_from_fixture_config(config)
    module.load_state_dict(state, strict=True)
    return module


class Holder(pl.LightningModule):
    """Carries fixture parts under the task attribute names; trains only a dummy weight (fast, stable)."""

    def __init__(self, llm: nn.Module | None = None, flow: nn.Module | None = None) -> None:
        super().__init__()
        if llm is not None:
            self.llm = llm
        if flow is not None:
            self.flow = flow
        self.dummy = nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.dummy ** 2).sum()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD([self.dummy], lr=0.1)


def _loader(n_batches: int = 2):
    batches = [synthetic_batch(1, text_vocab=100, speech_vocab=40, min_tokens=8, max_tokens=10, seed=s)
               for s in range(n_batches)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def _trainer(tmp_path: Path, callback: FP16EvalCallback, epochs: int = 2, logger=None) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=1, limit_val_batches=2,
                      num_sanity_val_steps=0, log_every_n_steps=1, logger=logger if logger is not None else False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[callback], default_root_dir=str(tmp_path))


def _fault_under_autocast(module: nn.Module) -> None:
    """An FP16-only bug: the estimator's output is off by 1.0 whenever CPU autocast is on."""
    module.register_forward_hook(lambda m, a, out: out + 1.0 if torch.is_autocast_enabled("cpu") else None)


def _tensorboard_tags(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "audio": 0})
    acc.Reload()
    return acc


def test_logs_figures_audio_and_images_and_saves_them_in_the_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.inference import _tiny_v1 as tiny

    model_dir = tiny.make_model_dir(tmp_path / "model", front_end=False)
    callback = FP16EvalCallback(every_n_validations=2, num_utterances=2, on_fail="stop", hift_from=str(model_dir))
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = _trainer(tmp_path, callback, epochs=3, logger=logger)
    trainer.fit(Holder(_part("v1_llm"), _part("v1_flow")), train_dataloaders=_loader(), val_dataloaders=_loader())

    assert trainer.current_epoch == 3 and not trainer.should_stop  # passing figures do not stop training
    figures = callback.last_figures
    assert figures["passed"] and set(figures["stages"]) == {"llm", "flow", "hift", "speech"}
    speech = figures["stages"]["speech"]  # the audio as served: flow under FP16 autocast, then the vocoder
    assert speech["nonfinite"] == 0 and speech["utterances"] == 2 and speech["sim"] >= 0.95
    assert 0 <= speech["mcd_db"] < 3.0 and figures["tolerances"]["speech/sim"] == 0.95
    assert figures["num_utterances"] == 2  # collected across the two validation batches of 1
    assert figures["global_step"] == 2 and callback.validations == 3  # ran at the 2nd validation only
    assert figures["vocoder"].startswith("hift_from=")

    acc = _tensorboard_tags(Path(logger.log_dir))
    scalars = acc.Tags()["scalars"]
    for tag in ("fp16/llm/kl_mean", "fp16/flow/mel_l1", "fp16/hift/lsd_db", "fp16/speech/sim", "fp16/passed"):
        assert tag in scalars
    assert [e.step for e in acc.Scalars("fp16/flow/mel_l1")] == [2]
    assert acc.Scalars("fp16/flow/mel_l1")[0].value == pytest.approx(figures["stages"]["flow"]["mel_l1"], rel=1e-6)
    assert {"fp16_check/mel_fp32", "fp16_check/mel_fp16"} <= set(acc.Tags()["images"])
    assert {"fp16_check/audio_fp32", "fp16_check/audio_fp16"} <= set(acc.Tags()["audio"])

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert figures_from_checkpoint(ckpt) == figures
    restored = FP16EvalCallback()
    restored.load_state_dict(ckpt["callbacks"]["FP16EvalCallback"])
    assert restored.last_figures == figures and restored.validations == 3


def test_injected_fp16_fault_stops_training(tmp_path: Path, caplog) -> None:
    flow = _part("v1_flow")
    _fault_under_autocast(flow.decoder.estimator)
    callback = FP16EvalCallback(num_utterances=1, on_fail="stop")
    trainer = _trainer(tmp_path, callback, epochs=4)
    with caplog.at_level("ERROR", logger="cosytrain.tasks.fp16_callback"):
        trainer.fit(Holder(flow=flow), train_dataloaders=_loader(1), val_dataloaders=_loader(1))
    assert trainer.should_stop and trainer.global_step == 1  # stopped after the first validation
    figures = callback.last_figures
    assert not figures["passed"] and figures["stages"]["flow"]["mel_l1"] > 0.05
    assert "Stopping training" in caplog.text and "flow/mel_l1" in caplog.text


def test_injected_fp16_fault_warns_and_training_goes_on(tmp_path: Path) -> None:
    llm = _part("v1_llm")
    llm.llm_decoder.register_forward_hook(
        lambda m, a, out: out.masked_fill(out > 0, float("inf")) if torch.is_autocast_enabled("cpu") else None)
    callback = FP16EvalCallback(num_utterances=1, on_fail="warn")
    trainer = _trainer(tmp_path, callback, epochs=2)
    with pytest.warns(FP16CheckWarning, match="llm/nonfinite"):
        trainer.fit(Holder(llm=llm), train_dataloaders=_loader(1), val_dataloaders=_loader(1))
    assert trainer.current_epoch == 2 and trainer.global_step == 2
    assert callback.last_figures["stages"]["llm"]["nonfinite"] > 0


def test_arguments_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="unknown FP16 tolerance"):
        FP16EvalCallback(tolerances={"flow/l2": 1.0})
    with pytest.raises(ValueError, match="on_fail"):
        FP16EvalCallback(on_fail="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_validations"):
        FP16EvalCallback(every_n_validations=0)
    with pytest.raises(ValueError, match="no hift.pt there"):
        FP16EvalCallback(hift_from="/nonexistent/model")
