"""EMA weights (cosytrain.tasks.ema.EMAWeights over Lightning's EMAWeightAveraging): the average is
the EMA of the raw trajectory, checkpoints hold both, resume restores the average exactly, and every
callback sees the average during validation whatever its place in the list."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from cosytrain.tasks.ema import EMAWeights, has_ema_weights
from cosytrain.tasks.lightning_cli import build_trainer
from cosytrain.tasks.speech_task import LLMTask
from tests.tasks._toy import ToyDataModule, ToyPart

QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
             num_sanity_val_steps=0)
DECAY = 0.8


def _task(seed: int = 0) -> LLMTask:
    torch.manual_seed(seed)
    return LLMTask(llm=ToyPart(dropout=0.2), train_conf={"optim": "adam", "optim_conf": {"lr": 0.05},
                                                         "scheduler": "constantlr"})


class RawTrajectory(pl.Callback):
    """The raw weights after every optimizer step (listed before the EMA callback, so before its update)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


class SeenInValidation(pl.Callback):
    """What a callback's on_validation_epoch_end sees of the model (e.g. the FP16 or synthesis check)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.seen.append(pl_module.llm.out.weight.detach().clone())


def test_average_is_the_ema_of_the_raw_weights_and_callbacks_see_it(tmp_path: Path) -> None:
    raw, seen = RawTrajectory(), SeenInValidation()
    ema = EMAWeights(decay=DECAY)
    task = _task()
    # the probe comes AFTER the EMA callback: with Lightning's own class it would see the raw weights
    build_trainer(max_steps=6, default_root_dir=str(tmp_path), callbacks=[raw, ema, seen], **QUIET).fit(
        task, ToyDataModule(num_batches=3))
    expected = {k: v.clone() for k, v in raw.states[0].items()}  # the first update copies the weights
    averages = [expected]
    for state in raw.states[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * state[k] if state[k].is_floating_point() else state[k]
                    for k in state}
        averages.append(expected)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert has_ema_weights(ckpt)
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7)
        assert torch.equal(ckpt["current_model_state"][key], raw.states[-1][key])
    assert not torch.equal(ckpt["state_dict"]["llm.out.weight"], ckpt["current_model_state"]["llm.out.weight"])
    # validation after steps 3 and 6 ran on the averages of those steps, also for the later callback
    assert len(seen.seen) == 2
    torch.testing.assert_close(seen.seen[0], averages[2]["llm.out.weight"], rtol=0, atol=1e-7)
    torch.testing.assert_close(seen.seen[1], averages[5]["llm.out.weight"], rtol=0, atol=1e-7)
    # after fit the module holds the average (Lightning's behaviour, kept)
    torch.testing.assert_close(task.llm.out.weight, expected["llm.out.weight"], rtol=0, atol=1e-7)


def test_lightning_callback_alone_shows_the_order_problem(tmp_path: Path) -> None:
    """Why EMAWeights exists: with Lightning's class a later callback sees the raw weights."""
    raw, seen = RawTrajectory(), SeenInValidation()
    build_trainer(max_steps=3, default_root_dir=str(tmp_path), callbacks=[raw, EMAWeightAveraging(decay=DECAY), seen],
                  **QUIET).fit(_task(), ToyDataModule(num_batches=3))
    assert torch.equal(seen.seen[0], raw.states[-1]["llm.out.weight"])


def test_resume_restores_the_average_exactly(tmp_path: Path) -> None:
    build_trainer(max_steps=6, default_root_dir=str(tmp_path / "a"), callbacks=[EMAWeights(decay=DECAY)],
                  **QUIET).fit(_task(), ToyDataModule(num_batches=3))
    run = tmp_path / "b"
    build_trainer(max_steps=3, default_root_dir=str(run), callbacks=[EMAWeights(decay=DECAY)], **QUIET).fit(
        _task(), ToyDataModule(num_batches=3))
    build_trainer(max_steps=6, default_root_dir=str(run), callbacks=[EMAWeights(decay=DECAY)], **QUIET).fit(
        _task(seed=1), ToyDataModule(num_batches=3), ckpt_path="last")
    straight = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert set(straight[key]) == set(resumed[key])
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    state = resumed["callbacks"][next(k for k in resumed["callbacks"] if k.startswith("EMAWeights"))]
    assert state == {"latest_update_step": 6, "latest_update_epoch": -1}


def test_ema_with_lora_keeps_no_base_and_resumes_exactly(tmp_path: Path) -> None:
    from tests.tasks._tiny_llms import LLMBatches, build_llm, make_base_dir

    base = make_base_dir(tmp_path / "base", "v1")

    def task(seed: int) -> LLMTask:
        return LLMTask(llm=build_llm("v1", seed), init_from=str(base), lora={"llm": {"r": 2, "dropout": 0.1}},
                       train_conf={"optim": "adam", "optim_conf": {"lr": 0.05}, "scheduler": "constantlr"})

    build_trainer(max_steps=4, default_root_dir=str(tmp_path / "a"), callbacks=[EMAWeights(decay=DECAY)],
                  **QUIET).fit(task(0), LLMBatches("v1", 2))
    run = tmp_path / "b"
    build_trainer(max_steps=2, default_root_dir=str(run), callbacks=[EMAWeights(decay=DECAY)], **QUIET).fit(
        task(0), LLMBatches("v1", 2))
    resumed = task(1)
    build_trainer(max_steps=4, default_root_dir=str(run), callbacks=[EMAWeights(decay=DECAY)], **QUIET).fit(
        resumed, LLMBatches("v1", 2), ckpt_path="last")
    straight = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    again = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert not set(again[key]) & resumed.adapters.frozen_keys and any(".lora_B." in k for k in again[key])
        assert set(straight[key]) == set(again[key])
        assert all(torch.equal(straight[key][k], again[key][k]) for k in straight[key]), key
    lora_b = next(k for k in again["state_dict"] if ".lora_B." in k)
    assert not torch.equal(again["state_dict"][lora_b], again["current_model_state"][lora_b])


def test_ema_is_one_callback_line_and_off_in_every_recipe(capsys) -> None:
    import yaml

    from cosytrain.tasks.lightning_cli import main
    from tests.conftest import REPO_ROOT

    recipes = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
    for recipe in recipes:  # off by default: no recipe turns it on (the fine-tuning ones carry it commented out)
        callbacks = (yaml.safe_load(recipe.read_text()).get("trainer") or {}).get("callbacks") or []
        assert not any("EMA" in str(c.get("class_path", "")) for c in callbacks), recipe.name
    assert "cosytrain.tasks.ema.EMAWeights" in (REPO_ROOT / "recipes" / "cosyvoice2_lora_sft.yaml").read_text()
    recipe = REPO_ROOT / "recipes" / "cosyvoice2_lora_sft.yaml"
    assert main(["fit", "--config", str(recipe), "--trainer.callbacks+=cosytrain.tasks.ema.EMAWeights",
                 "--trainer.callbacks.decay=0.99", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    ema = [c for c in printed["trainer"]["callbacks"] if c["class_path"] == "cosytrain.tasks.ema.EMAWeights"]
    assert len(ema) == 1 and ema[0]["init_args"]["decay"] == 0.99
