"""Small trained runs and every export kind made from them, once per test session, for the oracle.

Each generation trains its repository demo recipe (llm + flow) and the demo vocoder recipe for ONE
optimizer step on a reduced demo corpus (FP32, CPU, one thread): enough to give real Lightning
checkpoints with the run's ``config.yaml``. From those, :func:`export_kinds` writes:

``run``        no ``--base``: the config rebuilt from the runs, one checkpoint per part
``best2``      no ``--base``: ``--average best:2`` over three scored checkpoints per run
``base_llm``   ``--base`` (the ``run`` export): only the llm from a checkpoint, flow/hift from the base
``base_best2`` ``--base``: ``--average best:2`` of llm + flow, hift from the base

The scored checkpoints are the run's ``last.ckpt`` with seeded noise added to every float weight
and a ModelCheckpoint state naming their validation scores (the demo recipes of v2/v3 validate on
nothing), so the averaged weights differ from every single checkpoint.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tests.conftest import REPO_ROOT

QUIET = ["--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
MC_KEY = ("ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1,"
          " 'train_time_interval': None}")
SCORES = {"epoch=0-step=1.ckpt": 0.7, "epoch=0-step=2.ckpt": 0.4, "epoch=0-step=3.ckpt": 0.5}
KINDS = ("run", "best2", "base_llm", "base_best2")


def fit(args: list[str]) -> None:
    from cosytrain.tasks.lightning_cli import main

    old = Path.cwd()
    os.chdir(REPO_ROOT)  # the tiny v2/v3 recipes name conf/model/qwen2_tiny relative to the repository
    try:
        assert main(["fit", *args, *QUIET]) == 0, args
    finally:
        os.chdir(old)


def train(gen: str, runs: Path, v1_root: Path, data_25hz: Path) -> dict[str, Path]:
    """One step of the generation's demo recipe and of the demo vocoder recipe; returns the run dirs."""
    tts, voc = runs / f"{gen}_tts", runs / f"{gen}_hift"
    if gen == "v1":
        fit(["--config", "recipes/sft.yaml", "--data.init_args.root", str(v1_root),
             "--trainer.default_root_dir", str(tts)])
        fit(["--config", "recipes/hift_demo.yaml", "--data.init_args.root", str(v1_root),
             "--trainer.default_root_dir", str(voc), "--data.init_args.truncate_length", "4096"])
    else:
        number = gen[1]
        fmax = ["--data.init_args.fmax", "null"] if gen == "v3" else []
        fit(["--config", f"recipes/cosyvoice{number}_demo.yaml", "--trainer.default_root_dir", str(tts),
             "--data.init_args.train_data", str(data_25hz)])
        fit(["--config", "recipes/hift_demo.yaml", "--trainer.default_root_dir", str(voc),
             "--model.init_args.hift", f"conf/model/hift_{gen}_tiny.yaml", "--data", "conf/data/demo_v2.yaml", *fmax,
             "--data.init_args.train_data", str(data_25hz), "--data.init_args.val_data", "null",
             "--data.init_args.vocoder", "true", "--data.init_args.truncate_length", "9600",
             "--data.init_args.token_mel_ratio", "0", "--data.init_args.batch_type", "static",
             "--data.init_args.batch_size", "4"])
    return {"tts": tts, "hift": voc}


def scored_copies(run: Path, seed: int) -> Path:
    """``<run>/scored/``: three noisy copies of ``last.ckpt`` whose ModelCheckpoint state scores them."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    folder = run / "scored"
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for step, name in enumerate(SCORES, start=1):
        copy_ = copy.copy(ckpt)
        copy_["state_dict"] = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                               for k, v in ckpt["state_dict"].items()}
        copy_["global_step"] = step
        copy_["callbacks"] = {**ckpt.get("callbacks", {}), MC_KEY: {
            "monitor": "val/loss", "best_model_score": torch.tensor(min(SCORES.values())), "best_model_path": "",
            "current_score": torch.tensor(SCORES[name]), "dirpath": str(folder),
            "best_k_models": {str(folder / n): torch.tensor(s) for n, s in SCORES.items()},
            "kth_best_model_path": "", "kth_value": torch.tensor(0.0), "last_model_path": ""}}
        torch.save(copy_, folder / name)
    return folder


def llm_only(run: Path) -> Path:
    """``<run>/llm_only/last.ckpt``: the run's checkpoint with only its ``llm.*`` weights."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("llm.")}
    out = run / "llm_only" / "last.ckpt"
    out.parent.mkdir(exist_ok=True)
    torch.save(ckpt, out)
    return out


def export_kinds(gen: str, runs: dict[str, Path], out: Path) -> dict[str, Path]:
    """Every export kind of the module docstring for one generation; kind -> model directory."""
    from cosytrain.export import export_model

    tts, voc = runs["tts"], runs["hift"]
    configs = [tts / "config.yaml", voc / "config.yaml"]
    dirs = {kind: out / f"{gen}_{kind}" for kind in KINDS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the demo's byte text tokenizer is named in cosytrain.json
        export_model([tts / "checkpoints" / "last.ckpt", voc / "checkpoints" / "last.ckpt"], dirs["run"])
        export_model([scored_copies(tts, 1), scored_copies(voc, 2)], dirs["best2"], average="best:2",
                     run_config=configs)
    export_model([llm_only(tts)], dirs["base_llm"], base=dirs["run"])
    export_model([tts / "scored"], dirs["base_best2"], base=dirs["run"], average="best:2")
    return dirs


def part_state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)
