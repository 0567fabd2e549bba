"""The README's path, end to end on the full demo corpus: the default recipe (llm + flow, with the
FP16 evaluation callback) and the demo vocoder recipe train a few steps, export to one upstream-layout
model directory, reload strictly, and `python -m cosytrain synthesize` writes a wav. The FP16-vs-FP32
figures must appear in TensorBoard and in the exported model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosytrain import cli
from cosytrain.export import export_model
from cosytrain.modeldir import load_model_dir
from tests.conftest import REPO_ROOT

FAST = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_corpus):
    """Train the default recipe (4 steps, validation every 2) and the demo vocoder (1 step)."""
    root = str(demo_corpus[0])
    out = tmp_path_factory.mktemp("runs")
    sft = ["fit", "--config", str(REPO_ROOT / "recipes" / "sft.yaml"), "--data.init_args.root", root,
           "--trainer.default_root_dir", str(out / "sft"), "--trainer.max_steps", "4",
           "--trainer.val_check_interval", "2", *FAST]
    assert cli.main(sft) == 0
    hift = ["fit", "--config", str(REPO_ROOT / "recipes" / "hift_demo.yaml"), "--data.init_args.root", root,
            "--trainer.default_root_dir", str(out / "hift"), "--trainer.max_steps", "1",
            "--data.init_args.truncate_length", "4096", *FAST]
    assert cli.main(hift) == 0
    return out


def _scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_default_recipe_logs_fp16_figures_and_keeps_best_and_last(runs):
    scalars = _scalars(runs / "sft")
    assert len(scalars["val/loss"]) == 2  # validations at steps 2 and 4
    assert scalars["fp16/llm/top1_agreement"] and scalars["fp16/flow/mel_l1"]  # every 2nd validation
    assert scalars["fp16/passed"][-1] == 1.0
    checkpoints = {p.name for p in (runs / "sft" / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(name.startswith("step=") and "val_loss=" in name for name in checkpoints)


def test_export_reload_and_synthesize(runs, tmp_path, capsys):
    out = tmp_path / "model"
    with pytest.warns(RuntimeWarning, match="'byte' text tokenizer"):
        export_model([runs / "sft" / "checkpoints" / "last.ckpt", runs / "hift" / "checkpoints" / "last.ckpt"], out)
    card = json.loads((out / "cosytrain.json").read_text())
    assert card["generation"] == "v1" and card["check"]["finite"]
    assert card["fp16_check"]["passed"] is True
    assert {"llm", "flow"} <= set(card["fp16_check"]["stages"])
    directory, parts = load_model_dir(out)  # strict
    ckpt = torch.load(runs / "sft" / "checkpoints" / "last.ckpt", weights_only=True)
    flow = {k[len("flow."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("flow.")}
    assert all(torch.equal(parts["flow"].state_dict()[k], v) for k, v in flow.items())

    speakers = sorted(torch.load(out / "spk2info.pt", weights_only=True))
    wav = tmp_path / "hello.wav"
    assert cli.main(["synthesize", "--model_dir", str(out), "--text", "Hello there.", "--speaker", speakers[0],
                     "--seed", "0", "--out", str(wav)]) == 0
    audio, rate = sf.read(wav)
    assert rate == 22050 and audio.size > 0 and np.isfinite(audio).all()

    # best:1 of the default run on top of the first export as the base (the vocoder comes from it)
    best = tmp_path / "best"
    assert cli.main(["export", str(runs / "sft" / "checkpoints"), "--average", "best:1", "--base", str(out),
                     "-o", str(best)]) == 0
    chosen = json.loads((best / "cosytrain.json").read_text())["parts"]["llm"]["checkpoints"]
    assert len(chosen) == 1 and "val_loss=" in Path(chosen[0]["path"]).name
