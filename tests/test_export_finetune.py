"""Export of fine-tuned runs: LoRA adapters merged into the base (a plain upstream llm.pt, strict load,
same outputs as the unmerged model), the adapter alone in peft's format, and raw vs EMA weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cosytrain.export import ExportError, export_model, main
from cosytrain.modeldir import load_model_dir
from cosytrain.tasks.ema import EMAWeights
from cosytrain.tasks.lightning_cli import build_trainer
from cosytrain.tasks.speech_task import LLMTask
from tests.inference import _tiny_v1 as tiny
from tests.tasks._tiny_llms import LLMBatches, llm_batches

QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
             num_sanity_val_steps=0, limit_val_batches=0)
VOCAB = dict(text_vocab=100, speech_vocab=40)  # the tiny v1 fixture llm's
TRAIN_CONF = {"optim": "adam", "optim_conf": {"lr": 0.02}, "scheduler": "constantlr"}
LORA = {"llm": {"r": 4, "alpha": 8, "train": ["llm_decoder"]}}


def _outputs(module: torch.nn.Module) -> list[torch.Tensor]:
    module.eval()
    out = []
    for batch in llm_batches(2, "v1", seed=11, **VOCAB):
        random.seed(0)
        out.append(module(batch, torch.device("cpu"))["loss"].detach())
    return out


@pytest.fixture()
def lora_run(tmp_path: Path) -> tuple[Path, Path, LLMTask]:
    base = tiny.make_model_dir(tmp_path / "base")
    task = LLMTask(llm=tiny.build("llm"), init_from=str(base), train_conf=TRAIN_CONF, lora=LORA)
    build_trainer(max_steps=3, default_root_dir=str(tmp_path / "run"), **QUIET).fit(task, LLMBatches("v1", 3, **VOCAB))
    return base, tmp_path / "run" / "checkpoints" / "last.ckpt", task


def test_lora_export_merges_into_a_plain_upstream_llm(tmp_path: Path, lora_run) -> None:
    base, ckpt, task = lora_run
    out = tmp_path / "export"
    assert main([str(ckpt), "-o", str(out)]) == 0  # no --base: the run's init_from is the base
    base_llm = torch.load(base / "llm.pt", weights_only=True)
    merged = torch.load(out / "llm.pt", weights_only=True)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base_llm.items()}
    assert not any(torch.equal(merged[k], base_llm[k]) for k in merged if k.startswith("llm_decoder."))
    adapted = [k for k in merged if k.endswith("linear_q.weight")]
    assert adapted and all(not torch.equal(merged[k], base_llm[k]) for k in adapted)
    for part in ("flow", "hift"):
        assert (out / f"{part}.pt").read_bytes() == (base / f"{part}.pt").read_bytes()
    # strict load (what export's own check did too) and the unmerged model's outputs
    _, parts = load_model_dir(out, ["llm"])
    for ours, theirs in zip(_outputs(parts["llm"]), _outputs(task.llm)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    meta = json.loads((out / "cosytrain.json").read_text())
    record = meta["parts"]["llm"]["lora"]
    assert record["config"]["r"] == 4 and record["adapter"] == "lora/llm" and meta["parts"]["llm"]["weights"] == "raw"
    assert meta["base"] == str(base.resolve())

    # the adapter alone, in peft's format, on the base gives the same outputs
    from peft import PeftModel

    adapter = out / "lora" / "llm"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    fresh = tiny.build("llm")
    peft_model = PeftModel.from_pretrained(fresh, str(adapter))
    for ours, theirs in zip(_outputs(peft_model), _outputs(task.llm)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    only = tmp_path / "adapter_only"
    assert main([str(ckpt), "-o", str(only), "--adapter-only"]) == 0
    assert (only / "llm" / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert not (only / "llm.pt").exists()


def test_lora_export_needs_the_base_it_was_trained_on(tmp_path: Path, lora_run) -> None:
    base, ckpt, _ = lora_run
    other = tiny.make_model_dir(tmp_path / "other", weights={"llm": tiny.perturbed("llm", 3)})
    with pytest.raises(ExportError, match=r"other/llm\.pt is not that file \(sha256 differs\)"):
        export_model([ckpt], tmp_path / "x", base=other)
    base.rename(tmp_path / "moved")
    with pytest.raises(ExportError, match=r"cannot be opened .*pass --base DIR"):
        export_model([ckpt], tmp_path / "y")
    export_model([ckpt], tmp_path / "z", base=tmp_path / "moved")  # found again with --base
    assert (tmp_path / "z" / "llm.pt").is_file()


def test_ema_export_differs_from_raw_as_recorded(tmp_path: Path) -> None:
    base = tiny.make_model_dir(tmp_path / "base")
    task = LLMTask(llm=tiny.build("llm"), train_conf=TRAIN_CONF)
    build_trainer(max_steps=3, default_root_dir=str(tmp_path / "run"), callbacks=[EMAWeights(decay=0.5)],
                  **QUIET).fit(task, LLMBatches("v1", 3, **VOCAB))
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    exported = {}
    for weights in ("auto", "ema", "raw"):
        out = tmp_path / weights
        export_model([ckpt_path], out, base=base, weights=weights, check=weights == "auto")
        exported[weights] = torch.load(out / "llm.pt", weights_only=True)
        assert json.loads((out / "cosytrain.json").read_text())["parts"]["llm"]["weights"] == (
            "raw" if weights == "raw" else "ema")
    for key, value in exported["ema"].items():
        assert torch.equal(value, ckpt["state_dict"][f"llm.{key}"]) and torch.equal(value, exported["auto"][key])
        assert torch.equal(exported["raw"][key], ckpt["current_model_state"][f"llm.{key}"])
    assert not torch.equal(exported["ema"]["llm_decoder.weight"], exported["raw"]["llm_decoder.weight"])

    plain = tmp_path / "plain"
    build_trainer(max_steps=1, default_root_dir=str(plain), **QUIET).fit(LLMTask(llm=tiny.build("llm")),
                                                                         LLMBatches("v1", 1, **VOCAB))
    with pytest.raises(ExportError, match=r"holds no EMA weights .*--weights raw"):
        export_model([plain / "checkpoints" / "last.ckpt"], tmp_path / "none", base=base, weights="ema")


def test_averaged_lora_checkpoints_are_the_mean_of_the_merged_models(tmp_path: Path) -> None:
    from cosytrain.tasks.callbacks import StepCheckpoint

    base = tiny.make_model_dir(tmp_path / "base")
    task = LLMTask(llm=tiny.build("llm"), init_from=str(base), train_conf=TRAIN_CONF, lora=LORA)
    folder = tmp_path / "run" / "checkpoints"
    build_trainer(max_steps=2, default_root_dir=str(tmp_path / "run"), **QUIET,
                  callbacks=[StepCheckpoint(dirpath=str(folder), every_n_train_steps=1, filename="{step}")]).fit(
        task, LLMBatches("v1", 2, **VOCAB))
    singles = []
    for name in ("step=1.ckpt", "step=2.ckpt"):
        export_model([folder / name], tmp_path / name, check=False)
        singles.append(torch.load(tmp_path / name / "llm.pt", weights_only=True))
    export_model([folder / "step=1.ckpt", folder / "step=2.ckpt"], tmp_path / "mean", check=False)
    mean = torch.load(tmp_path / "mean" / "llm.pt", weights_only=True)
    for key, value in mean.items():
        torch.testing.assert_close(value, (singles[0][key].double() + singles[1][key].double()).div(2).float(),
                                   rtol=0, atol=1e-7)
    meta = json.loads((tmp_path / "mean" / "cosytrain.json").read_text())
    assert meta["parts"]["llm"]["lora"]["adapter"].startswith("not written") and not (tmp_path / "mean" / "lora").exists()
    with pytest.raises(ExportError, match="averaged adapters are not one adapter"):
        export_model([folder / "step=1.ckpt", folder / "step=2.ckpt"], tmp_path / "only", adapter_only=True)
