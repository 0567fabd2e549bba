"""LoRA SFT and DPO runs of the tiny CosyVoice2-architecture recipes on a base model directory, exported:
shared by tests/test_finetune_e2e.py (its own base) and the upstream oracle tier (tests/upstream, on its
v2 ``run`` export), so both use the same commands the README gives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT

QUIET = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"]


def _cli(args: list[str]) -> None:
    from cosytrain.cli import main

    old, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(REPO_ROOT)  # the tiny recipes name conf/model/qwen2_tiny relative to the repository
    torch.set_num_threads(1)
    try:
        assert main(args) == 0, args
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)


def lora_export(base: Path, data_list: Path, runs: Path) -> Path:
    """fit recipes/cosyvoice2_lora_tiny.yaml (2 steps) with init_from ``base``; export its last.ckpt."""
    run, out = runs / "lora", runs / "lora_export"
    _cli(["fit", "--config", "recipes/cosyvoice2_lora_tiny.yaml", "--model.init_args.init_from", str(base),
          "--data.init_args.train_data", str(data_list), "--trainer.default_root_dir", str(run), *QUIET])
    _cli(["export", str(run / "checkpoints" / "last.ckpt"), "-o", str(out)])
    return out


def dpo_export(base: Path, data_list: Path, runs: Path) -> Path:
    """dpo-pairs from ``base`` on ``data_list`` (4 utterances, 2 candidates, length scorer), fit
    recipes/cosyvoice2_dpo_tiny.yaml (2 steps) on the pairs, export its last.ckpt."""
    pairs, run, out = runs / "pairs", runs / "dpo", runs / "dpo_export"
    _cli(["dpo-pairs", "--model_dir", str(base), "--data", str(data_list), "-o", str(pairs), "--num_candidates", "2",
          "--max_utts", "4", "--max_token_text_ratio", "3", "--scorer", "length", "--device", "cpu"])
    assert json.loads((pairs / "pairs.json").read_text())["pairs"] >= 1
    _cli(["fit", "--config", "recipes/cosyvoice2_dpo_tiny.yaml", "--model.init_args.init_from", str(base),
          "--data.init_args.train_data", str(pairs / "data.list"), "--trainer.default_root_dir", str(run), *QUIET])
    _cli(["export", str(run / "checkpoints" / "last.ckpt"), "-o", str(out)])
    return out
