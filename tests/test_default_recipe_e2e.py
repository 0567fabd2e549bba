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


def _cheap_recipe(folder: Path) -> Path:
    """recipes/sft.yaml with its SynthesisCallback cut to one utterance and three conditions (CI time)."""
    import yaml

    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "sft.yaml").read_text())
    for callback in recipe["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SynthesisCallback"):
            callback["init_args"].update(num_utterances=1, conditions=["vocoder_gt", "flow_gt", "full"])
    text = yaml.safe_dump(recipe).replace("../conf/", f"{REPO_ROOT}/conf/")
    path = folder / "sft.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_corpus):
    """Train the default recipe (4 steps, validation every 2) and the demo vocoder (1 step)."""
    root = str(demo_corpus[0])
    out = tmp_path_factory.mktemp("runs")
    sft = ["fit", "--config", str(_cheap_recipe(out)), "--data.init_args.root", root,
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


def test_default_recipe_listens_and_measures(runs):
    """SynthesisCallback: synth/* figures every validation, audio + mel figures, a report, a checkpoint by MCD."""
    scalars = _scalars(runs / "sft")
    for condition in ("vocoder_gt", "flow_gt", "full"):
        for figure in ("mcd", "lf0_rmse", "vde", "duration_ratio", "sim"):
            assert len(scalars[f"synth/{condition}/{figure}"]) == 2, (condition, figure)  # steps 2 and 4
    floor, flow = scalars["synth/vocoder_gt/mcd"][-1], scalars["synth/flow_gt/mcd"][-1]
    assert floor < 10 and floor < flow  # Griffin-Lim on the true mel vs a 4-step flow
    assert scalars["synth/vocoder_gt/sim"][-1] > 0.9 > scalars["synth/flow_gt/sim"][-1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs / "sft"), size_guidance={"audio": 0, "images": 0})
    events.Reload()
    audio, images = set(events.Tags()["audio"]), set(events.Tags()["images"])
    utt = next(tag.split("/")[1] for tag in audio if tag.startswith("synth/"))
    assert {f"synth/{utt}/{c}" for c in ("target", "vocoder_gt", "flow_gt", "full")} <= audio
    figure = events.Images(f"synth/{utt}/mels")[-1]
    assert figure.width >= 1000 and figure.height >= 300  # readable, not a thumbnail

    report = runs / "sft" / "synthesis" / "step_00000004" / "report.md"
    text = report.read_text()
    assert "vocoder on true mel (floor)" in text and f"({utt}_full.wav)" in text
    assert (report.parent / f"{utt}_full.wav").is_file() and (report.parent / f"{utt}.png").is_file()
    by_mcd = [p.name for p in (runs / "sft" / "checkpoints").iterdir() if "full_mcd=" in p.name]
    assert len(by_mcd) == 1


def test_export_best_by_a_synthesis_figure(runs, tmp_path):
    from cosytrain.export import checkpoint_infos, select_checkpoints

    ckpts = runs / "sft" / "checkpoints"
    # kept by val/loss and by synth/full/mcd: without --monitor, best:N means best by validation loss (README)
    _, default = select_checkpoints(checkpoint_infos([ckpts]), "best:1")
    assert default["monitor"] == "val/loss"
    chosen, how = select_checkpoints(checkpoint_infos([ckpts]), "best:1", monitor="synth/full/mcd")
    assert how == {"mode": "best", "n": 1, "monitor": "synth/full/mcd", "direction": "min"}
    values = _scalars(runs / "sft")["synth/full/mcd"]
    assert chosen[0].score == pytest.approx(min(values), rel=1e-5)


def test_export_reload_and_synthesize(runs, tmp_path, capsys):
    out = tmp_path / "model"
    with pytest.warns(RuntimeWarning, match="'phone' text tokenizer"):
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
    assert cli.main(["export", str(runs / "sft" / "checkpoints"), "--average", "best:1", "--monitor", "val/loss",
                     "--base", str(out), "-o", str(best)]) == 0
    chosen = json.loads((best / "cosytrain.json").read_text())["parts"]["llm"]["checkpoints"]
    assert len(chosen) == 1 and "val_loss=" in Path(chosen[0]["path"]).name


def test_a_hift_checkpoint_is_the_synthesis_vocoder(runs, tmp_path):
    """SynthesisCallback(vocoder=<HiFTTask .ckpt>): the generator is built from its run's config.yaml with the
    checkpoint's weights, and it is what the callback vocodes with; bad checkpoints are one-line errors."""
    from types import SimpleNamespace

    from cosytrain.errors import ConfigurationError
    from cosytrain.models.hift.generator import HiFTGenerator
    from cosytrain.tasks.hift_weights import hift_state_dict
    from cosytrain.tasks.synthesis_callback import SynthesisCallback

    ckpt = runs / "hift" / "checkpoints" / "last.ckpt"
    callback = SynthesisCallback(vocoder=str(ckpt), speaker_encoder="none")
    vocoder, name = callback._vocoder(SimpleNamespace(datamodule=None), {"hift": None}, torch.device("cpu"))
    assert isinstance(vocoder, HiFTGenerator) and str(ckpt) in name and not vocoder.training
    state = vocoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in hift_state_dict(ckpt).items())
    speech, _ = vocoder.inference(speech_feat=torch.full((1, 80, 20), -5.0))
    assert speech.shape[-1] == 20 * 256 and torch.isfinite(speech).all()

    lone = tmp_path / "lone.ckpt"  # no run config beside it
    lone.write_bytes(ckpt.read_bytes())
    with pytest.raises(ConfigurationError, match="no config.yaml beside it") as err:
        SynthesisCallback(vocoder=str(lone))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigurationError, match="no model.init_args.hift"):  # an llm+flow run's checkpoint
        SynthesisCallback(vocoder=str(runs / "sft" / "checkpoints" / "last.ckpt"))
    with pytest.raises(ConfigurationError, match="not found"):
        SynthesisCallback(vocoder=str(tmp_path / "missing.ckpt"))
