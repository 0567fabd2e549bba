"""Fine-tuning a CosyVoice2-architecture model end to end, at tiny size on the 25 Hz demo corpus:
a base directory (the demo recipes, one step, exported), then LoRA SFT (recipes/cosyvoice2_lora_tiny.yaml)
and DPO with LoRA (dpo-pairs -> recipes/cosyvoice2_dpo_tiny.yaml), each from `fit` to an exported
directory that loads strictly, whose llm.pt has the base's keys and shapes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cosytrain.cli import main as cli_main
from cosytrain.modeldir import load_model_dir
from tests.conftest import REPO_ROOT

QUIET = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A reduced 25 Hz demo corpus and a tiny v2 model directory exported from one-step demo runs."""
    import warnings

    from cosytrain.data.demo_corpus import build_demo_corpus
    from cosytrain.export import export_model

    home = tmp_path_factory.mktemp("cosytrain_home")
    runs = tmp_path_factory.mktemp("runs")
    old_env, old_cwd, old_threads = os.environ.get("COSYTRAIN_HOME"), Path.cwd(), torch.get_num_threads()
    os.environ["COSYTRAIN_HOME"] = str(home)
    os.chdir(REPO_ROOT)  # the tiny recipes name conf/model/qwen2_tiny relative to the repository
    torch.set_num_threads(1)
    try:
        data_list = build_demo_corpus(home / "demo", num_utts=8, token_rate=25)
        one_step = ["--trainer.max_steps", "1", *QUIET]
        assert cli_main(["fit", "--config", "recipes/cosyvoice2_demo.yaml", "--trainer.default_root_dir",
                         str(runs / "tts"), *one_step]) == 0
        assert cli_main(["fit", "--config", "recipes/hift_demo.yaml", "--trainer.default_root_dir", str(runs / "hift"),
                         "--model.init_args.hift", "conf/model/hift_v2_tiny.yaml", "--data", "conf/data/demo_v2.yaml",
                         "--data.init_args.val_data", "null", "--data.init_args.vocoder", "true",
                         "--data.init_args.truncate_length", "9600", "--data.init_args.token_mel_ratio", "0",
                         "--data.init_args.batch_type", "static", "--data.init_args.batch_size", "4", *one_step]) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the byte text tokenizer warning of the demo export
            export_model([runs / "tts" / "checkpoints" / "last.ckpt", runs / "hift" / "checkpoints" / "last.ckpt"],
                         runs / "base")
        yield {"base": runs / "base", "runs": runs, "data_list": data_list}
    finally:
        torch.set_num_threads(old_threads)
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("COSYTRAIN_HOME", None)
        else:
            os.environ["COSYTRAIN_HOME"] = old_env


def _check_export(out: Path, base: Path) -> dict[str, Any]:
    """Strict load; llm.pt is a plain upstream state dict of the base's keys and shapes, and differs from it."""
    directory, parts = load_model_dir(out)
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
    run = base["runs"] / "lora"
    assert cli_main(["fit", "--config", "recipes/cosyvoice2_lora_tiny.yaml", "--model.init_args.init_from",
                     str(base["base"]), "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2", *QUIET]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(".base_layer." in k for k in ckpt["state_dict"])
    out = base["runs"] / "lora_export"
    assert cli_main(["export", str(run / "checkpoints" / "last.ckpt"), "-o", str(out)]) == 0
    meta = _check_export(out, base["base"])
    assert meta["base"] == str(base["base"].resolve()) and meta["parts"]["llm"]["lora"]["config"]["r"] == 8


def test_dpo_from_pairs_to_a_strictly_loading_export(base: dict[str, Any]) -> None:
    pairs = base["runs"] / "pairs"
    assert cli_main(["dpo-pairs", "--model_dir", str(base["base"]), "--data", str(base["data_list"]), "-o", str(pairs),
                     "--num_candidates", "2", "--max_utts", "4", "--max_token_text_ratio", "3", "--scorer", "length",
                     "--device", "cpu"]) == 0
    summary = json.loads((pairs / "pairs.json").read_text())
    assert summary["pairs"] >= 1
    run = base["runs"] / "dpo"
    assert cli_main(["fit", "--config", "recipes/cosyvoice2_dpo_tiny.yaml", "--model.init_args.init_from",
                     str(base["base"]), "--data.init_args.train_data", str(pairs / "data.list"),
                     "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2", "--trainer.log_every_n_steps",
                     "1", *QUIET]) == 0
    from tests.tasks._toy import read_scalars

    scalars = read_scalars(run)
    for name in ("train/dpo_loss", "train/sft_loss", "train/dpo_acc", "train/chosen_reward", "train/reject_reward"):
        assert scalars.get(name), name
    out = base["runs"] / "dpo_export"
    assert cli_main(["export", str(run / "checkpoints" / "last.ckpt"), "-o", str(out)]) == 0
    _check_export(out, base["base"])
