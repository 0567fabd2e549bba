"""Export: prefix split, checkpoint choice and averaging, base fill-in, config from the run, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosytrain.export import (
    ExportError,
    average_state_dicts,
    checkpoint_infos,
    export_model,
    main,
    select_checkpoints,
)
from cosytrain.modeldir import ModelDirError, load_model_dir, open_model_dir
from tests.conftest import load_manifest
from tests.inference import _tiny_v1 as tiny


SCORES = {1: 0.50, 2: 0.30, 3: 0.45, 4: 0.35}  # epoch -> val/loss; best two are epochs 2 and 4


def _name(epoch: int) -> str:
    return f"epoch={epoch}-step={epoch * 10}.ckpt"


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    return tiny.make_model_dir(tmp_path / "base")


@pytest.fixture()
def llm_run(tmp_path: Path) -> Path:
    """Four top-k llm checkpoints plus last.ckpt (a copy of the newest), as ModelCheckpoint leaves them."""
    folder = tmp_path / "run" / "checkpoints"
    for epoch in SCORES:
        seen = {_name(e): s for e, s in SCORES.items() if e <= epoch}
        # cosytrain's StepCheckpoint (a ModelCheckpoint subclass) stores its state under its own name
        key = tiny.MC_KEY if epoch % 2 else tiny.MC_KEY.replace("ModelCheckpoint", "StepCheckpoint")
        tiny.make_ckpt(folder / _name(epoch), {"llm": tiny.perturbed("llm", epoch)}, epoch, epoch * 10, best_k=seen,
                       callback_key=key)
    tiny.make_ckpt(folder / "last.ckpt", {"llm": tiny.perturbed("llm", 4)}, 4, 40,
                   best_k={_name(e): s for e, s in SCORES.items()})
    return folder


def _mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: (sum(s[k].double() for s in states) / len(states)).float() for k in states[0]}


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert set(a) == set(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)


def test_round_trip_with_base_fill_in(tmp_path: Path, base: Path) -> None:
    weights = tiny.perturbed("llm", 7)
    ckpt = tiny.make_ckpt(tmp_path / "one.ckpt", {"llm": weights}, 0, 5,
                          extra={"discriminator.w": torch.ones(2)})
    out = tmp_path / "export"
    result = export_model([ckpt], out, base=base)

    _assert_equal_states(torch.load(out / "llm.pt", weights_only=True), weights)
    assert (out / "flow.pt").read_bytes() == (base / "flow.pt").read_bytes()
    assert (out / "hift.pt").read_bytes() == (base / "hift.pt").read_bytes()
    assert (out / "cosyvoice.yaml").read_text() == (base / "cosyvoice.yaml").read_text()
    assert (out / "campplus.onnx").read_bytes() == (base / "campplus.onnx").read_bytes()
    assert (out / "spk2info.pt").is_file()
    directory, parts = load_model_dir(out)  # strict, through the safe reader
    assert directory.generation == "v1"
    assert torch.equal(parts["llm"].state_dict()["llm_decoder.weight"], weights["llm_decoder.weight"])

    meta = json.loads((out / "cosytrain.json").read_text())
    assert meta == result.metadata
    assert meta["generation"] == "v1" and meta["parts"]["flow"]["source"] == "base"
    source = meta["parts"]["llm"]["checkpoints"][0]
    assert len(source["sha256"]) == 64 and source["global_step"] == 5
    assert meta["check"]["finite"] and meta["check"]["samples"] == meta["check"]["mel_frames"] * 256
    assert sorted(meta["front_end_files"]) == ["campplus.onnx", "spk2info.pt"]


def test_average_of_three_is_the_mean(tmp_path: Path, base: Path) -> None:
    states = [tiny.perturbed("llm", s, scale=0.1) for s in (1, 2, 3)]
    ckpts = [tiny.make_ckpt(tmp_path / f"c{i}.ckpt", {"llm": s}, i, i) for i, s in enumerate(states)]
    out = tmp_path / "avg"
    export_model(ckpts, out, base=base, check=False)
    _assert_equal_states(torch.load(out / "llm.pt", weights_only=True), _mean(states), exact=False)
    assert json.loads((out / "cosytrain.json").read_text())["parts"]["llm"]["averaging"] == {"mode": "all", "n": 3}


def test_best_n_picks_the_lowest_scores(tmp_path: Path, base: Path, llm_run: Path) -> None:
    chosen, how = select_checkpoints(checkpoint_infos([llm_run]), "best:2")
    assert [c.name for c in chosen] == [_name(2), _name(4)]
    assert how == {"mode": "best", "n": 2, "monitor": "val/loss", "direction": "min"}

    out = tmp_path / "best"
    assert main([str(llm_run), "-o", str(out), "--base", str(base), "--average", "best:2", "--no-check"]) == 0
    expected = _mean([tiny.perturbed("llm", 2), tiny.perturbed("llm", 4)])
    _assert_equal_states(torch.load(out / "llm.pt", weights_only=True), expected, exact=False)


def test_last_n_skips_the_duplicate_last_ckpt(llm_run: Path) -> None:
    chosen, how = select_checkpoints(checkpoint_infos([llm_run]), "last:2")
    assert [c.name for c in chosen] == [_name(4), _name(3)]
    assert how == {"mode": "last", "n": 2}
    everything, how = select_checkpoints(checkpoint_infos([llm_run]))
    assert sorted(c.name for c in everything) == sorted(_name(e) for e in SCORES) and how["n"] == 4


def test_best_n_from_file_names_without_callback_state(tmp_path: Path) -> None:
    for epoch, loss in ((0, 0.9), (1, 0.2), (2, 0.4)):
        tiny.make_ckpt(tmp_path / f"epoch={epoch}-val_loss={loss}.ckpt", {"llm": tiny.state("llm")}, epoch, epoch)
    with pytest.raises(ExportError, match="no checkpoint has a ModelCheckpoint with a monitor"):
        select_checkpoints(checkpoint_infos([tmp_path]), "best:1")
    chosen, _ = select_checkpoints(checkpoint_infos([tmp_path]), "best:2", monitor="val_loss")
    assert [c.score for c in chosen] == [0.2, 0.4]


def test_best_n_needs_enough_scores(llm_run: Path) -> None:
    with pytest.raises(ExportError, match=r"best:5: only 4 checkpoints have a val/loss score"):
        select_checkpoints(checkpoint_infos([llm_run]), "best:5")


def test_average_state_dicts_float64_and_integer_rules() -> None:
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "n": torch.tensor([3])}
    b = {"w": torch.tensor([2.0, 2.0], dtype=torch.float16), "n": torch.tensor([3])}
    out = average_state_dicts([a, b])
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], torch.tensor([1.5, 2.0]))
    assert torch.equal(out["n"], torch.tensor([3]))
    # float32 sums that would round in float32 are exact in float64
    big = [{"w": torch.tensor([16777216.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}]
    assert average_state_dicts(big)["w"].item() == pytest.approx(16777218.0 / 3, rel=1e-7)
    with pytest.raises(ExportError, match=r"integer tensor state dict\.n differs"):
        average_state_dicts([a, {**b, "n": torch.tensor([4])}])
    with pytest.raises(ExportError, match="keys differ"):
        average_state_dicts([a, {"w": b["w"]}])


def test_wrong_generation_checkpoint_is_refused(tmp_path: Path, base: Path) -> None:
    keys = list(load_manifest("v2_llm")["keys"])[:30]
    ckpt = tiny.make_ckpt(tmp_path / "v2.ckpt", {"llm": {k: torch.zeros(2) for k in keys}}, 0, 1)
    with pytest.raises(ExportError, match=r"look like CosyVoice 2 \(llm\.model\.model\.") as err:
        export_model([ckpt], tmp_path / "out", base=base)
    assert "CosyVoice 1" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_against_base_names_keys(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tiny.state("flow")
    weights["input_embedding.weight"] = torch.zeros(65, 32)
    ckpt = tiny.make_ckpt(tmp_path / "f.ckpt", {"flow": weights}, 0, 1)
    assert main([str(ckpt), "-o", str(tmp_path / "out"), "--base", str(base)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input_embedding.weight" in err and "[65, 32]" in err
    assert not (tmp_path / "out").exists()
    torch.save(weights, base / "flow.pt")  # the same check for a model directory, on the meta device
    with pytest.raises(ModelDirError, match=r"input_embedding\.weight"):
        open_model_dir(base).check()


def test_failed_check_leaves_existing_export_untouched(tmp_path: Path, base: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "llm.pt").write_bytes(b"previous export")
    broken = tiny.state("flow")
    broken["encoder_proj.bias"][:] = float("nan")
    ckpt = tiny.make_ckpt(tmp_path / "nan.ckpt", {"flow": broken}, 0, 1)
    with pytest.raises(ExportError, match="non-finite"):
        export_model([ckpt], out, base=base, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["llm.pt"]
    assert (out / "llm.pt").read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "export", "nan.ckpt"])  # no temp left
    with pytest.raises(ExportError, match="already exists"):
        export_model([ckpt], out, base=base)


def test_greedy_sampling_is_written_as_upstream_ras_with_top_k_1() -> None:
    from cosytrain.export.run_config import run_config_to_tree

    tree = run_config_to_tree({"sampling": "cosytrain.models.sampling.greedy_sampling",
                               "other": "cosytrain.models.sampling.ras_sampling"})
    assert tree["sampling"].target == "cosyvoice.utils.common.ras_sampling"
    assert tree["sampling"].kwargs == {"top_k": 1, "tau_r": 1.1}
    assert tree["other"].target == "cosyvoice.utils.common.ras_sampling" and tree["other"].kwargs == {}


def test_config_from_the_training_runs_without_base(tmp_path: Path) -> None:
    tiny.write_run_config(tmp_path / "tts", ("llm", "flow"), text_tokenizer="byte")
    tts = tiny.make_ckpt(tmp_path / "tts" / "checkpoints" / "last.ckpt",
                         {"llm": tiny.state("llm"), "flow": tiny.perturbed("flow", 3)}, 1, 10)
    tiny.write_run_config(tmp_path / "voc", ("hift",))
    voc = tiny.make_ckpt(tmp_path / "voc" / "checkpoints" / "last.ckpt", {"hift": tiny.state("hift")}, 1, 10,
                         extra={"discriminator.mpd.w": torch.ones(3)})
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"no hift weights and no --base"):
        export_model([tts], out)
    with pytest.warns(RuntimeWarning, match="'byte' text tokenizer"):
        export_model([tts, voc], out, check=False)  # the synthesis check is covered above; loading back is below
    meta = json.loads((out / "cosytrain.json").read_text())
    assert meta["run_text_tokenizer"] == "byte" and meta["config"]["source"] == "run" and meta["warnings"]
    directory = open_model_dir(out)
    assert directory.config["llm"].target == "cosyvoice.llm.llm.TransformerLM"
    assert directory.config["llm"].kwargs["sampling"].target == "cosyvoice.utils.common.ras_sampling"
    assert directory.config["flow"].kwargs["decoder"].kwargs["cfm_params"].target == "omegaconf.DictConfig"
    assert directory.config["sample_rate"] == 22050 and "get_tokenizer" in directory.config
    _, parts = load_model_dir(out)
    _assert_equal_states(parts["flow"].state_dict(), tiny.perturbed("flow", 3))
    assert not any(k.startswith("discriminator") for k in torch.load(out / "hift.pt", weights_only=True))

    # checkpoints moved away from their runs: the configs are named explicitly, one per run
    loose = tmp_path / "loose"
    loose.mkdir()
    for name, src in (("tts.ckpt", tts), ("voc.ckpt", voc)):
        (loose / name).write_bytes(src.read_bytes())
    with pytest.raises(ExportError, match="cannot find the run's config.yaml"):
        export_model([loose], tmp_path / "again", check=False)
    configs = [tmp_path / "tts" / "config.yaml", tmp_path / "voc" / "config.yaml"]
    with pytest.warns(RuntimeWarning):
        export_model([loose], tmp_path / "again", run_config=configs, check=False)
    assert (tmp_path / "again" / "cosyvoice.yaml").read_text() == (out / "cosyvoice.yaml").read_text()


def test_pickled_objects_in_a_checkpoint_are_named(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"llm.w": torch.ones(1)}, "hyper_parameters": {"when": Path("x")}}, path)
    with pytest.raises(ExportError, match=r"pickled\.ckpt: the checkpoint holds pickled Python objects"):
        checkpoint_infos([path])


def test_zero_helper_writes_part_files_by_prefix(tmp_path: Path) -> None:
    from cosytrain.export.zero_to_state_dict import consolidate, write_part_files

    sd = {"llm.a.weight": torch.ones(2, 2), "flow.b.bias": torch.zeros(3, dtype=torch.float16), "other": torch.ones(1)}
    written = write_part_files(sd, tmp_path)
    assert set(written) == {"llm", "flow"}
    flow = torch.load(written["flow"], weights_only=True)
    assert list(flow) == ["b.bias"] and flow["b.bias"].dtype == torch.float32
    with pytest.raises(NotADirectoryError):
        consolidate(tmp_path / "llm.pt", tmp_path / "out.ckpt")


def test_deepspeed_folder_without_deepspeed_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    import cosytrain.export.zero_to_state_dict as zero

    folder = tmp_path / "epoch=0-step=1.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    if importlib.util.find_spec("deepspeed") is not None:  # installed (CI): a broken folder is one line too
        with pytest.raises(ExportError, match="cannot convert this DeepSpeed checkpoint"):
            checkpoint_infos([folder])
    real = importlib.util.find_spec
    monkeypatch.setattr(zero.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ExportError, match="needs the deepspeed package"):
        checkpoint_infos([folder])


def test_a_real_lightning_checkpoint_of_the_speech_task(tmp_path: Path, base: Path) -> None:
    """What Lightning writes for cosytrain's task (hparams, loops, callbacks) loads weights-only and exports."""
    import lightning.pytorch as pl  # a hard dependency: a broken import must fail, not skip
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from cosytrain.tasks.speech_task import SpeechTask

    gen = torch.Generator().manual_seed(0)
    batches = [{"text_token": torch.randint(1, 100, (2, 5), generator=gen),
                "text_token_len": torch.tensor([5, 4], dtype=torch.int32),
                "speech_token": torch.randint(0, 40, (2, 8), generator=gen),
                "speech_token_len": torch.tensor([8, 6], dtype=torch.int32),
                "embedding": torch.randn(2, 192, generator=gen)} for _ in range(2)]
    task = SpeechTask(llm=tiny.build("llm").train(), train_conf={})  # upstream's defaults: adam + warmuplr
    folder = tmp_path / "run" / "checkpoints"
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[ModelCheckpoint(dirpath=str(folder), monitor="val/loss",
                                                                            save_top_k=2, save_last=True)])
    trainer.fit(task, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    infos = checkpoint_infos([folder])
    assert sorted(i.name for i in infos) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    chosen, how = select_checkpoints(infos, "best:1")
    assert how["monitor"] == "val/loss" and len(chosen) == 1
    out = tmp_path / "export"
    export_model([folder], out, base=base, average="last:1", check=False)
    trained = {k: v for k, v in task.llm.state_dict().items()}
    _assert_equal_states(torch.load(out / "llm.pt", weights_only=True), trained)


def test_fp16_figures_of_the_training_run_go_into_the_model_card(tmp_path: Path, base: Path) -> None:
    """The newest checkpoint's FP16EvalCallback figures become cosytrain.json's fp16_check section."""
    from cosytrain.evaluation.fp16_figures import CALLBACK_STATE_KEY, MODEL_CARD_KEY

    ckpts = []
    for step, agreement in ((10, 0.5), (20, 0.99)):
        path = tiny.make_ckpt(tmp_path / f"step={step}.ckpt", {"llm": tiny.perturbed("llm", step)}, 0, step)
        ckpt = torch.load(path, weights_only=True)
        ckpt["callbacks"][CALLBACK_STATE_KEY] = {"last_figures": {
            "passed": agreement > 0.9, "failures": [], "num_utterances": 4, "seed": 0,
            "stages": {"llm": {"top1_agreement": agreement, "kl": 1e-6}}}}
        torch.save(ckpt, path)
        ckpts.append(path)
    card = json.loads((export_model(ckpts, tmp_path / "out", base=base, check=False).output
                       / "cosytrain.json").read_text())[MODEL_CARD_KEY]
    assert card["passed"] is True and card["stages"]["llm"]["top1_agreement"] == 0.99
    assert "step 20" in card["measured_on"]


def test_best_n_with_several_monitors_defaults_to_val_loss_or_asks():
    """Kept by several metrics: best:N without --monitor means val/loss (README); without val/loss it asks."""
    from cosytrain.export.checkpoints import CheckpointInfo, select_checkpoints

    def infos(monitors):
        scores = {name: {f"c{i}.ckpt": float(s) for i, s in enumerate(values)} for name, values in monitors.items()}
        return [CheckpointInfo(Path(f"c{i}.ckpt"), 0, i, ("llm",),
                               {name: ("min", scores[name]) for name in monitors}) for i in range(3)]

    chosen, how = select_checkpoints(infos({"val/loss": [3, 1, 2], "synth/full/mcd": [1, 3, 2]}), "best:1")
    assert how["monitor"] == "val/loss" and chosen[0].name == "c1.ckpt"
    chosen, how = select_checkpoints(infos({"val/loss": [3, 1, 2], "synth/full/mcd": [1, 3, 2]}), "best:1",
                                     monitor="synth/full/mcd")
    assert chosen[0].name == "c0.ckpt"
    with pytest.raises(ExportError, match="several metrics"):
        select_checkpoints(infos({"val/acc": [3, 1, 2], "synth/full/mcd": [1, 3, 2]}), "best:1")
