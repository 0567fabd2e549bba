"""HiFTTask: FP16 with two grad scalers on CPU, skip-on-inf per optimizer, resume equality, export,
sample-rate check, init_from, the flow mel path and the demo recipe."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from cosytrain.data.features import mel_spectrogram
from cosytrain.models.hift import ConvRNNF0Predictor, HiFTGenerator
from cosytrain.models.hift.discriminator import (MultiPeriodDiscriminator, MultipleDiscriminator,
                                                 MultiResSpecDiscriminator)
from cosytrain.tasks.flow_mel_source import FlowMelSource
from cosytrain.tasks.hift_task import HiFTTask, check_sample_rate, default_mel_loss_config, split_gan_train_conf
from cosytrain.tasks.hift_weights import hift_state_dict
from cosytrain.tasks.lightning_cli import build_trainer

QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
             log_every_n_steps=1)
FRAMES = 8  # mel frames per crop: 8 x 256 = 2048 samples at 22.05 kHz


def small_hift() -> HiFTGenerator:
    return HiFTGenerator(base_channels=8, upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16],
                         resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
                         source_resblock_kernel_sizes=[7, 11], source_resblock_dilation_sizes=[[1, 3], [1, 3]],
                         f0_predictor=ConvRNNF0Predictor(cond_channels=8))


def small_disc() -> MultipleDiscriminator:
    return MultipleDiscriminator(MultiPeriodDiscriminator(periods=(2, 3), channels=(4, 8, 8, 8, 8)),
                                 MultiResSpecDiscriminator(fft_sizes=(256, 128), hop_sizes=(64, 32),
                                                           win_lengths=(256, 128), channels=4))


def make_task(seed: int = 0, **kwargs) -> HiFTTask:
    torch.manual_seed(seed)
    kwargs.setdefault("log_media_every_n_steps", 0)
    return HiFTTask(small_hift(), small_disc(), **kwargs)


def vocoder_batches(n: int, batch_size: int = 2, frames: int = FRAMES, seed: int = 0) -> list[dict]:
    """Harmonic tones with known F0 -> the keys the vocoder data pipeline produces."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * 256) / 22050
    out = []
    for _ in range(n):
        f0 = 100 + 100 * torch.rand(batch_size, 1, generator=g)
        speech = 0.4 * torch.sin(2 * math.pi * f0 * t) + 0.1 * torch.sin(4 * math.pi * f0 * t)
        speech = speech + 0.01 * torch.randn(batch_size, frames * 256, generator=g)
        mel = mel_spectrogram(speech, 1024, 80, 22050, 256, 1024, 0, 8000).transpose(1, 2)
        out.append({"speech": speech, "speech_feat": mel, "speech_feat_len": torch.full((batch_size,), frames),
                    "pitch_feat": f0.expand(batch_size, frames).clone(), "utts": [f"u{i}" for i in range(batch_size)]})
    return out


class VocoderData(pl.LightningDataModule):
    """Stands in for CosyDataModule(vocoder=True): same batch keys and the same hparams the task checks."""

    def __init__(self, num_batches: int = 2, sample_rate: int = 22050, hop_size: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.items = vocoder_batches(num_batches)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items, batch_size=None, shuffle=False)


def _adam_steps(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(s["step"]) for s in optimizer.state.values()}


def test_fp16_cpu_two_scalers_skip_only_the_overflowing_optimizer(tmp_path):
    task = make_task(precision="16-mixed", grad_scaler_init_scale=16.0)
    dtypes: list[torch.dtype] = []
    task.hift.conv_pre.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    # inf gradient into one discriminator weight during the discriminator step of the 2nd batch only
    # (the discriminator is frozen during the generator step, so this hook fires only in its own step)
    target = task.discriminator.mrd.discriminators[0].out.bias
    target.register_hook(lambda g: torch.full_like(g, math.inf) if task.global_step == 1 else g)
    trainer = build_trainer(max_steps=2, default_root_dir=str(tmp_path), **QUIET)
    trainer.fit(task, VocoderData(num_batches=2))

    assert trainer.global_step == 2  # batches, not optimizer steps
    assert dtypes and all(d == torch.float16 for d in dtypes)  # autocast really FP16 inside the step (on CPU)
    assert task.compute_dtype == torch.float16
    assert task.run_precision == "16-mixed"
    assert task.skipped_steps == {"generator": 0, "discriminator": 1}
    scale_g, scale_d = task.scalers["generator"].get_scale(), task.scalers["discriminator"].get_scale()
    assert scale_g == 16.0 and scale_d == 8.0  # only the overflowing optimizer's scaler backed off
    opt_g, opt_d = (o.optimizer for o in task.optimizers())
    assert _adam_steps(opt_g) == {2} and _adam_steps(opt_d) == {1}  # exactly one discriminator step skipped
    logged = trainer.logged_metrics
    for key in ("train/loss_scale_generator", "train/loss_scale_discriminator", "train/skipped_steps_discriminator",
                "train/grad_norm_generator", "train/d_loss", "train/g_loss", "train/g_loss_mel"):
        assert key in logged
    assert logged["train/loss_scale_discriminator"].item() == 8.0

    # both scalers go into the checkpoint and come back on resume
    ckpt = tmp_path / "fp16.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["hift_task"]
    assert saved["scalers"]["discriminator"]["scale"] == 8.0 and saved["scalers"]["generator"]["scale"] == 16.0
    resumed = make_task(seed=5, precision="16-mixed", grad_scaler_init_scale=1024.0)
    build_trainer(max_steps=3, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                  **QUIET).fit(resumed, VocoderData(num_batches=2), ckpt_path=str(ckpt))
    assert resumed.scalers["discriminator"].get_scale() == 8.0 and resumed.scalers["generator"].get_scale() == 16.0
    assert resumed.skipped_steps["discriminator"] == 1

    # export: the generator alone, prefix split off, loads strictly into a fresh generator
    state = hift_state_dict(str(ckpt))
    assert state and not any(k.startswith(("discriminator", "hift.")) for k in state)
    small_hift().load_state_dict(state, strict=True)


def test_autocast_dtypes_and_precision_given_twice_is_refused():
    """Each precision's compute dtype; the takeover of trainer.precision=16-mixed itself is exercised by
    the demo recipe test."""
    task = make_task()
    x = torch.randn(1, 80, 4)
    for precision, dtype in (("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)):
        task.run_precision = precision
        with task.autocast():
            assert task.hift.conv_pre(x).dtype == dtype
    with pytest.raises(ValueError, match="precision="):
        make_task(precision="fp8")
    with pytest.raises(ValueError, match="precision set twice"):
        build_trainer(max_steps=1, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                      **QUIET).fit(make_task(precision="16-mixed"), VocoderData(num_batches=1))


def _fit_states(task: HiFTTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.state_dict().items()}


def test_resume_equals_uninterrupted_run_fp32(tmp_path):
    data = lambda: VocoderData(num_batches=1)  # noqa: E731
    full = make_task(precision="32-true", discriminator_warmup_steps=1)
    build_trainer(max_epochs=2, logger=False, enable_checkpointing=False, **QUIET).fit(full, data())

    first = make_task(precision="32-true", discriminator_warmup_steps=1)
    trainer = build_trainer(max_epochs=1, logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(first, data())
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    second = make_task(seed=99, precision="32-true", discriminator_warmup_steps=1)  # other init: must be overwritten
    trainer2 = build_trainer(max_epochs=2, logger=False, enable_checkpointing=False, **QUIET)
    trainer2.fit(second, data(), ckpt_path=str(ckpt))

    assert trainer2.global_step == 2
    a, b = _fit_states(full), _fit_states(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for oa, ob in zip(full.optimizers(), second.optimizers()):
        for sa, sb in zip(oa.optimizer.state.values(), ob.optimizer.state.values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert any(k.startswith("discriminator.mpd.") for k in a) and any(k.startswith("hift.") for k in a)


def test_export_state_dict_from_checkpoint_dict():
    task = make_task()
    ckpt = {"state_dict": task.state_dict(), "epoch": 0}
    state = hift_state_dict(ckpt)
    assert set(state) == set(task.hift.state_dict())
    fresh = small_hift()
    fresh.load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="no 'hift"):
        hift_state_dict({"state_dict": {"discriminator.x": torch.zeros(1)}})


def test_wrong_sample_rate_is_one_line():
    with pytest.raises(ValueError) as err:
        check_sample_rate(22050, 24000)
    assert "\n" not in str(err.value) and "24000" in str(err.value) and "22050" in str(err.value)
    with pytest.raises(ValueError, match="sample rate mismatch") as err:
        build_trainer(max_steps=1, logger=False, enable_checkpointing=False, **QUIET).fit(
            make_task(), VocoderData(num_batches=1, sample_rate=24000))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="hop size mismatch"):
        check_sample_rate(24000, 24000, model_hop=480, data_hop=256)


def test_gan_train_conf_split():
    gen, disc = split_gan_train_conf({"optim": "adam", "optim_conf": {"lr": 2e-4}, "scheduler": "constantlr",
                                      "optim_d": "adamw", "optim_conf_d": {"lr": 1e-4}, "scheduler_d": "warmuplr",
                                      "scheduler_conf_d": {"warmup_steps": 10}, "grad_clip": 3})
    assert (gen.optim, gen.optim_conf["lr"], gen.scheduler, gen.grad_clip) == ("adam", 2e-4, "constantlr", 3)
    assert (disc.optim, disc.optim_conf["lr"], disc.scheduler, disc.grad_clip) == ("adamw", 1e-4, "warmuplr", 3)
    with pytest.raises(ValueError, match="accum_grad"):
        split_gan_train_conf({"accum_grad": 2})
    with pytest.raises(ValueError, match="max_epoch"):
        split_gan_train_conf({"max_epoch": 200})


def test_init_from_model_dir_and_upstream_hifigan_checkpoint(tmp_path):
    from tests.inference import _tiny_v1 as tiny

    model_dir = tiny.make_model_dir(tmp_path / "model", front_end=False)
    upstream_hift = tiny.state("hift")
    # a model dir's hift.pt: generator only, `generator.` prefix (a saved HiFiGan) is stripped
    torch.save({f"generator.{k}": v for k, v in upstream_hift.items()}, model_dir / "hift.pt")
    task = HiFTTask(tiny.build("hift", tiny.perturbed("hift", 1)).train(), small_disc(), init_from=str(model_dir))
    task.load_init_from()  # what setup() runs unless the run resumes from a checkpoint
    for k, v in upstream_hift.items():
        assert torch.equal(task.hift.state_dict()[k], v)

    # an upstream HiFiGan checkpoint: generator.* + discriminator.* (+ upstream's epoch/step ints)
    disc_state = {k: v + 1 for k, v in small_disc().state_dict().items()}
    hifigan = {**{f"generator.{k}": v for k, v in upstream_hift.items()},
               **{f"discriminator.{k}": v for k, v in disc_state.items()}, "epoch": 3, "step": 100}
    torch.save(hifigan, tmp_path / "hifigan.pt")
    task2 = HiFTTask(tiny.build("hift", tiny.perturbed("hift", 2)).train(), small_disc(),
                     init_from=str(tmp_path / "hifigan.pt"))
    task2.load_init_from()
    for k, v in disc_state.items():
        assert torch.equal(task2.discriminator.state_dict()[k], v)
    for k, v in upstream_hift.items():
        assert torch.equal(task2.hift.state_dict()[k], v)
    # the same whole-HiFiGan file placed as a model directory's hift.pt: both halves load
    torch.save(hifigan, model_dir / "hift.pt")
    task3 = HiFTTask(tiny.build("hift", tiny.perturbed("hift", 3)).train(), small_disc(), init_from=str(model_dir))
    task3.load_init_from()
    assert all(torch.equal(task3.discriminator.state_dict()[k], v) for k, v in disc_state.items())
    assert all(torch.equal(task3.hift.state_dict()[k], v) for k, v in upstream_hift.items())

    # shape mismatch: one line naming the keys
    with pytest.raises(ValueError) as err:
        HiFTTask(small_hift(), small_disc(), init_from=str(model_dir)).load_init_from()
    assert "\n" not in str(err.value) and "does not fit" in str(err.value)


def test_flow_mel_path_plumbing(tmp_path):
    from tests.tasks._toy import ToyFlow

    task = make_task(precision="32-true")
    batch = vocoder_batches(1)[0]
    batch["speech_token"] = torch.randint(0, 16, (2, FRAMES // 2))  # ToyFlow: 2 frames per token
    batch["speech_token_len"] = torch.full((2,), FRAMES // 2)
    batch["embedding"] = torch.randn(2, 192)
    flow = ToyFlow()
    task.mel_source, task._flow_source = "flow", (FlowMelSource(flow),)
    mels = task.input_mels(batch)["speech_feat"]
    assert mels.shape == batch["speech_feat"].shape and not torch.equal(mels, batch["speech_feat"])
    expected = flow._mel(batch["speech_token"][:1], batch["embedding"][:1])[0]
    torch.testing.assert_close(mels[0], expected)
    assert not any(p.requires_grad for p in flow.parameters())
    assert not any(k.startswith("flow") for k in task.state_dict())  # not trained, saved or exported
    # one training step on the flow's mels
    data = VocoderData(num_batches=1)
    data.items = [batch]
    build_trainer(max_steps=1, logger=False, enable_checkpointing=False, **QUIET).fit(task, data)
    # a cropped utterance (token length far from the audio length) is refused in one line
    bad = dict(batch, speech_token=batch["speech_token"][:, :1], speech_token_len=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="uncropped audio"):
        task.input_mels(bad)
    with pytest.raises(ValueError, match="flow_dir"):
        HiFTTask(small_hift(), small_disc(), mel_source="flow")


def test_flow_dir_loads_a_frozen_flow_from_a_model_directory(tmp_path):
    from tests.inference import _tiny_v1 as tiny

    model_dir = tiny.make_model_dir(tmp_path / "model", front_end=False)
    task = make_task(mel_source="flow", flow_dir=str(model_dir))
    source = task._flow_source[0]
    assert not source.flow.training and not any(p.requires_grad for p in source.flow.parameters())
    assert not any(k.startswith("flow") for k in task.state_dict())


def test_demo_recipe_trains_on_the_demo_corpus_through_the_cli(tmp_path, monkeypatch, demo_corpus):
    """recipes/hift_demo.yaml through cosytrain's LightningCLI on a reduced demo corpus (the espeak corpus
    through DemoDataModule in vocoder mode): one FP16 step (trainer.precision taken over by the task) plus
    validation, with audio and mel images in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cosytrain.tasks.lightning_cli import _cli_class

    demo_root = str(demo_corpus[0])  # the full demo corpus (tests/conftest.py): its last shard validates
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "hift_demo.yaml"
    run = tmp_path / "run"
    cli_cls, _, dm_cls = _cli_class()
    monkeypatch.setattr(sys, "argv", ["cosytrain"])  # LightningCLI warns when sys.argv and args both carry options
    kw = {"parser_mode": "omegaconf", "exit_on_error": False}
    # HiFTTask is a LightningModule, not a SpeechTask: the CLI is built with LightningModule as the base
    cli = cli_cls(pl.LightningModule, dm_cls, subclass_mode_model=True, subclass_mode_data=True,
                  parser_kwargs={**kw, "fit": kw}, save_config_kwargs={"overwrite": True},
                  auto_configure_optimizers=False, seed_everything_default=1234,
                  args=["fit", "--config", str(recipe), "--data.init_args.root", demo_root,
                        "--data.init_args.truncate_length", "4096",
                        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
                        "--trainer.check_val_every_n_epoch", "null",
                        "--trainer.accelerator", "cpu", "--trainer.precision", "16-mixed",
                        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                        "--trainer.default_root_dir", str(run), "--model.init_args.log_media_every_n_steps", "1"])
    task = cli.model
    assert isinstance(task, HiFTTask) and cli.trainer.global_step == 1
    assert task.run_precision == "16-mixed" and task.compute_dtype == torch.float16
    assert task.scalers["discriminator"] is not None and type(cli.trainer.precision_plugin).__name__ == "Precision"
    events = EventAccumulator(str(run), size_guidance={"audio": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/audio_generated", "val/audio_generated"} <= set(tags["audio"])
    assert {"train/mel_generated", "val/mel_real"} <= set(tags["images"])
    assert "val/loss_mel" in tags["scalars"]
    state = hift_state_dict(str(run / "checkpoints" / "last.ckpt"))
    assert set(state) == set(task.hift.state_dict())


def _build_cli_node(node):
    """A LightningCLI ``class_path``/``init_args`` node -> the object (enough for the conf/model pieces)."""
    import importlib

    if isinstance(node, dict) and "class_path" in node:
        module, _, name = node["class_path"].rpartition(".")
        args = {k: _build_cli_node(v) for k, v in (node.get("init_args") or {}).items()}
        return getattr(importlib.import_module(module), name)(**args)
    return node


@pytest.mark.parametrize("conf, manifest, upstream", [("hift_v1.yaml", "v1_hift", "cosyvoice.yaml"),
                                                     ("hift_v2.yaml", "v2_hift", "cosyvoice2.yaml")])
def test_official_vocoder_confs_match_upstream_manifests(conf, manifest, upstream):
    """conf/model/hift_v*.yaml build upstream's keys/shapes; the default GAN mel transform is upstream's
    ``mel_spec_transform1`` of the same config."""
    import dataclasses

    import yaml

    from cosytrain.modeldir import load_upstream_config
    from tests.conftest import load_manifest, reference_dir

    expected = {k: v["shape"] for k, v in load_manifest(manifest)["keys"].items()}
    node = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / "model" / conf).read_text())
    with torch.device("meta"):
        hift = _build_cli_node(node)
    assert {k: list(v.shape) for k, v in hift.state_dict().items()} == expected
    overrides = {"qwen_pretrain_path": "/nonexistent"} if upstream != "cosyvoice.yaml" else None
    tree = load_upstream_config(reference_dir() / "configs" / upstream, overrides)
    assert dataclasses.asdict(default_mel_loss_config(hift)) == tree["mel_spec_transform1"].kwargs


def _flow_batch() -> dict:
    batch = vocoder_batches(1)[0]
    batch["speech_token"] = torch.randint(0, 16, (2, FRAMES // 2))  # ToyFlow: 2 frames per token
    batch["speech_token_len"] = torch.full((2,), FRAMES // 2)
    batch["embedding"] = torch.randn(2, 192)
    return batch


def test_frozen_flow_follows_the_module_device_in_validate():
    """mel_source='flow' under `validate` (no on_fit_start): the frozen flow must be moved to the module's
    device before its first mel, as in fit (before: only on_fit_start moved it, so a CUDA validate fed a
    CPU flow with CUDA tensors). The spy records every move and checks each call's device against it."""
    from tests.tasks._toy import ToyFlow

    class SpySource(FlowMelSource):
        moved_to = None

        def to(self, device):
            self.moved_to = torch.device(device)
            return super().to(device)

        def __call__(self, batch, device):
            assert self.moved_to == torch.device(device), f"flow on {self.moved_to}, batch for {device}"
            return super().__call__(batch, device)

    task = make_task(precision="32-true")
    source = SpySource(ToyFlow())
    task.mel_source, task._flow_source = "flow", (source,)
    data = VocoderData(num_batches=1)
    data.items = [_flow_batch()]
    data.val_dataloader = data.train_dataloader
    out = build_trainer(logger=False, enable_checkpointing=False, **QUIET).validate(task, data)
    assert source.moved_to == task.device and math.isfinite(out[0]["val/loss_mel"])


def _bare_hift_file(tmp_path) -> str:
    torch.manual_seed(3)
    path = tmp_path / "hift.pt"
    torch.save(small_hift().state_dict(), path)
    return str(path)


def test_yin_f0_is_refused_for_pretrained_weights_unless_allowed(tmp_path, monkeypatch):
    """Without pyworld (simulated) the F0 targets would silently come from the YIN stand-in: fine-tuning
    pretrained weights is refused in one line naming the flag and the extra; the flag allows it, and the
    backend is logged (TensorBoard text + hparams + checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cosytrain.data import features
    from cosytrain.errors import ConfigurationError

    monkeypatch.setattr(features, "f0_backend_problem", lambda: "pyworld is not installed")
    init = _bare_hift_file(tmp_path)
    with pytest.raises(ConfigurationError) as err:
        build_trainer(max_steps=1, logger=False, enable_checkpointing=False, **QUIET).fit(
            make_task(init_from=init), VocoderData(num_batches=1))
    message = str(err.value)
    assert "\n" not in message and "allow_yin_f0_stand_in: true" in message and "cosytrain[vocoder]" in message
    assert "pyworld is not installed" in message and init in message
    # without pretrained weights (training from scratch) the stand-in is allowed, and said
    run = tmp_path / "run"
    task = make_task(init_from=init, allow_yin_f0_stand_in=True)
    build_trainer(max_steps=1, default_root_dir=str(run), **QUIET).fit(task, VocoderData(num_batches=1))
    assert task.f0_backend == "yin"
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("data/f0_backend/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("yin stand-in")
    assert "f0_backend: yin" in (run / "hparams.yaml").read_text()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hift_task"]["f0_backend"] == "yin"


def test_pyworld_is_the_f0_backend_and_matches_upstreams_recipe():
    """CI installs the vocoder extra (pyworld-prebuilt): compute_f0 is upstream's harvest (dio fallback) +
    stonemask at one frame per hop, linearly resized to the mel frames."""
    import numpy as np

    from cosytrain.data import features
    from tests.conftest import require_module

    pw = require_module("pyworld", "pip install -e '.[vocoder]' (part of the test extra)")
    assert features.f0_backend() == "pyworld" and features.f0_backend_problem() is None
    sr, hop, frames = 22050, 256, 40
    t = np.arange(frames * hop) / sr
    wav = 0.3 * np.sin(2 * np.pi * (120 + 60 * t) * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    got = features.compute_f0(torch.from_numpy(wav).float(), sr, hop, frames)
    x = torch.from_numpy(wav).float().numpy().astype("double")  # the float32 round trip the pipeline makes
    f0, times = pw.harvest(x, sr, frame_period=hop * 1000 / sr)
    f0 = pw.stonemask(x, f0, times, sr)
    want = torch.nn.functional.interpolate(torch.from_numpy(f0).view(1, 1, -1), size=frames, mode="linear").view(-1)
    torch.testing.assert_close(got, want.float())
    assert (got[5:-5] > 100).all() and (got[5:-5] < 200).all()
