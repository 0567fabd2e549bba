"""Fine-tuning a CosyVoice2-architecture model end to end, at tiny size on the 25 Hz demo corpus:
a base directory (the demo recipes, one step, exported), then LoRA SFT (recipes/cosyvoice2_lora_tiny.yaml)
and DPO with LoRA (dpo-pairs -> recipes/cosyvoice2_dpo_tiny.yaml), each from `fit` to an exported
directory that loads strictly, whose llm.pt has the base's keys and shapes. Upstream's own code loads
the same kind of exports strictly in the oracle tier (tests/upstream/test_finetune_exports.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cosytrain.modeldir import load_model_dir
from tests import _finetune_runs
from tests.tasks._toy import read_scalars


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A reduced 25 Hz demo corpus and a tiny v2 model directory exported from one-step demo runs."""
    import warnings

    from cosytrain.data.demo_corpus import build_demo_corpus
    from cosytrain.export import export_model

    runs = tmp_path_factory.mktemp("runs")
    data_list = build_demo_corpus(tmp_path_factory.mktemp("demo25"), num_utts=8, token_rate=25)
    one_step = [a if a != "2" else "1" for a in _finetune_runs.QUIET]
    _finetune_runs._cli(["fit", "--config", "recipes/cosyvoice2_demo.yaml", "--data.init_args.train_data",
                         str(data_list), "--trainer.default_root_dir", str(runs / "tts"), *one_step])
    _finetune_runs._cli(["fit", "--config", "recipes/hift_demo.yaml", "--trainer.default_root_dir", str(runs / "hift"),
                         "--model.init_args.hift", "conf/model/hift_v2_tiny.yaml", "--data", "conf/data/demo_v2.yaml",
                         "--data.init_args.train_data", str(data_list), "--data.init_args.val_data", "null",
                         "--data.init_args.vocoder", "true", "--data.init_args.truncate_length", "9600",
                         "--data.init_args.token_mel_ratio", "0", "--data.init_args.batch_type", "static",
                         "--data.init_args.batch_size", "4", *one_step])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the byte text tokenizer warning of the demo export
        export_model([runs / "tts" / "checkpoints" / "last.ckpt", runs / "hift" / "checkpoints" / "last.ckpt"],
                     runs / "base")
    return {"base": runs / "base", "runs": runs, "data_list": data_list}


def _check_export(out: Path, base: Path) -> dict[str, Any]:
    """Strict load; llm.pt is a plain upstream state dict of the base's keys and shapes, and differs from it."""
    directory, _ = load_model_dir(out)
    assert directory.generation == "v2"
    merged = torch.load(out / "llm.pt", weights_only=True)
    original = torch.load(base / "llm.pt", weights_only=True)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in original.items()}
    changed = [k for k in merged if not torch.equal(merged[k], original[k])]
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")) for k in changed), changed[:5]
    for part in ("flow", "hift"):
        assert (out / f"{part}.pt").read_bytes() == (base / f"{part}.pt").read_bytes()
    meta = json.loads((out / "cosytrain.json").read_text())
    assert meta["check"]["finite"] and meta["parts"]["llm"]["lora"]["adapter"] == "lora/llm"
    assert (out / "lora" / "llm" / "adapter_model.safetensors").is_file()
    return meta


def test_lora_sft_from_fit_to_a_strictly_loading_export(base: dict[str, Any]) -> None:
    out = _finetune_runs.lora_export(base["base"], base["data_list"], base["runs"])
    ckpt = torch.load(base["runs"] / "lora" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(".base_layer." in k for k in ckpt["state_dict"])
    meta = _check_export(out, base["base"])
    assert meta["base"] == str(base["base"].resolve()) and meta["parts"]["llm"]["lora"]["config"]["r"] == 8


def test_dpo_from_pairs_to_a_strictly_loading_export(base: dict[str, Any]) -> None:
    out = _finetune_runs.dpo_export(base["base"], base["data_list"], base["runs"])
    scalars = read_scalars(base["runs"] / "dpo")
    for name in ("train/dpo_loss", "train/sft_loss", "train/dpo_acc", "train/chosen_reward", "train/reject_reward"):
        assert scalars.get(name), name
    _check_export(out, base["base"])
