"""Tiny CosyVoice 1 parts, model directories and fake Lightning checkpoints for the export/inference tests.

The parts are the reference fixtures' shrunk configs with their (upstream-made) weights, so synthesis
gives finite audio; model directories get a hand-written ``cosyvoice.yaml`` rendered with the
upstream-yaml writer; checkpoints are plain dicts shaped like Lightning's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import torch

from tests.conftest import load_fixture

FIXTURE_NAMES = {"llm": "v1_llm", "flow": "v1_flow", "hift": "hift_v1"}
MONITOR = "val/loss"
MC_KEY = ("ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1,"
          " 'train_time_interval': None}")


@functools.lru_cache(maxsize=None)
def _fixture(part: str) -> dict[str, Any]:
    return load_fixture(FIXTURE_NAMES[part])


def config(part: str) -> dict[str, Any]:
    return _fixture(part)["config"]


def state(part: str) -> dict[str, torch.Tensor]:
    """A private copy of the fixture's weights (contiguous: some fixture tensors are shared views)."""
    return {k: v.contiguous().clone() for k, v in _fixture(part)["state_dict"].items()}


def build(part: str, weights: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    from cosytrain.modeldir import build_from_fixture_config

    module = build_from_fixture_config(config(part))
    module.load_state_dict(state(part) if weights is None else dict(weights), strict=True)
    return module.eval()


def yaml_text(parts: Mapping[str, Any] | None = None) -> str:
    """A v1 ``cosyvoice.yaml`` for the tiny parts (upstream's header and front-end keys, by hand)."""
    from cosytrain.modeldir import dump_upstream_yaml, fixture_config_to_tree

    tree = {p: fixture_config_to_tree((parts or {}).get(p, config(p))) for p in ("llm", "flow", "hift")}
    head = ("__set_seed1: !apply:random.seed [1986]\n"
            "__set_seed3: !apply:torch.manual_seed [1986]\n"
            "sample_rate: 22050\n")
    tail = ("get_tokenizer: !name:whisper.tokenizer.get_tokenizer\n"
            "    multilingual: True\n    num_languages: 100\n    language: 'en'\n    task: 'transcribe'\n"
            "allowed_special: 'all'\n")
    return head + dump_upstream_yaml(tree) + tail


def make_model_dir(path: Path, weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                   yaml_name: str = "cosyvoice.yaml", front_end: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / yaml_name).write_text(yaml_text(), encoding="utf-8")
    for part in ("llm", "flow", "hift"):
        torch.save((weights or {}).get(part, state(part)), path / f"{part}.pt")
    if front_end:
        (path / "campplus.onnx").write_bytes(b"not really onnx")
        torch.save({"spk": {"embedding": torch.ones(1, 192)}}, path / "spk2info.pt")
    return path


def perturbed(part: str, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state(part).items()}


def make_ckpt(path: Path, parts: Mapping[str, Mapping[str, torch.Tensor]], epoch: int, step: int,
              best_k: Mapping[str, float] | None = None, extra: Mapping[str, torch.Tensor] | None = None,
              callback_key: str = MC_KEY) -> Path:
    """A Lightning-shaped checkpoint: part weights under ``<part>.``, epoch/step and ModelCheckpoint state."""
    sd = {f"{part}.{k}": v for part, weights in parts.items() for k, v in weights.items()}
    sd.update(extra or {})
    callbacks = {}
    if best_k is not None:
        callbacks[callback_key] = {
            "monitor": MONITOR, "best_model_score": torch.tensor(min(best_k.values())),
            "best_model_path": "", "current_score": torch.tensor(0.0), "dirpath": "/elsewhere/checkpoints",
            "best_k_models": {f"/elsewhere/checkpoints/{n}": torch.tensor(s) for n, s in best_k.items()},
            "kth_best_model_path": "", "kth_value": torch.tensor(0.0), "last_model_path": "",
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "global_step": step, "pytorch-lightning_version": "2.6.0", "state_dict": sd,
                "loops": {}, "callbacks": callbacks, "optimizer_states": [], "lr_schedulers": [],
                "hyper_parameters": {"train_conf": {"optim": "adam"}}}, path)
    return path


def _class_path(upstream: str) -> str:
    from cosytrain.modeldir.registry import CLASSES, FUNCTIONS

    return {**CLASSES, **FUNCTIONS}[upstream].replace(":", ".")


def cli_config(node: Any) -> Any:
    """A fixture config as LightningCLI writes a model config (class_path / init_args)."""
    if isinstance(node, dict) and node.get("class") == "omegaconf.DictConfig":
        return dict(node["content"])
    if isinstance(node, dict) and "class" in node:
        return {"class_path": _class_path(node["class"]),
                "init_args": {k: cli_config(v) for k, v in node.items() if k != "class"}}
    if isinstance(node, dict) and "function" in node:
        return _class_path(node["function"])  # a callable by import path; the defaults are upstream's values
    if isinstance(node, dict):
        return {k: cli_config(v) for k, v in node.items()}
    if isinstance(node, list):
        return [cli_config(v) for v in node]
    return node


def write_run_config(run_dir: Path, parts: tuple[str, ...], text_tokenizer: str | None = None) -> Path:
    import yaml

    model = {"class_path": "cosytrain.tasks.speech_task.SpeechTask",
             "init_args": {p: cli_config(config(p)) for p in parts}}
    data = {"class_path": "cosytrain.data.datamodule.CosyDataModule",
            "init_args": {"sample_rate": 22050, **({"text_tokenizer": text_tokenizer} if text_tokenizer else {})}}
    path = run_dir / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"seed_everything": 1234, "trainer": {"max_epochs": 1}, "model": model,
                                    "data": data}, sort_keys=False), encoding="utf-8")
    return path
