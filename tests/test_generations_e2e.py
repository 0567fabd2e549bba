"""CosyVoice 2 and 3 end to end: tiny recipe -> a training step on the 25 Hz demo corpus -> export
without a base -> strict reload -> synthesis through ``AutoModel`` (offline and streaming); plus the
generation-mismatch errors and the official-size model configs against upstream's manifests.

Everything runs in-process on the CPU in one thread (the machine is shared): the recipes are the
repository's, with ``--trainer.max_steps 1`` and FP32 (the recipes' CPU FP16 is correct but slow).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cosytrain.export import ExportError, export_model, run_config_to_tree
from cosytrain.modeldir import load_model_dir
from tests.conftest import REPO_ROOT, load_manifest

GENERATIONS = {"v2": ("CosyVoice2", "CosyVoice2Model", "cosyvoice2.yaml", "hift_v2_tiny.yaml", []),
               "v3": ("CosyVoice3", "CosyVoice3Model", "cosyvoice3.yaml", "hift_v3_tiny.yaml",
                      ["--data.init_args.fmax", "null"])}
QUIET = ["--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A reduced 25 Hz demo corpus in a private COSYTRAIN_HOME; cwd = the repository root (the tiny
    recipes name conf/model/qwen2_tiny relative to it); one torch thread."""
    from cosytrain.data.demo_corpus import build_demo_corpus

    home = tmp_path_factory.mktemp("cosytrain_home")
    old_env, old_cwd, old_threads = os.environ.get("COSYTRAIN_HOME"), Path.cwd(), torch.get_num_threads()
    os.environ["COSYTRAIN_HOME"] = str(home)
    os.chdir(REPO_ROOT)
    torch.set_num_threads(1)
    try:
        data_list = build_demo_corpus(home / "demo", num_utts=8, token_rate=25)
        yield {"home": home, "data_list": data_list, "runs": tmp_path_factory.mktemp("runs")}
    finally:
        torch.set_num_threads(old_threads)
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("COSYTRAIN_HOME", None)
        else:
            os.environ["COSYTRAIN_HOME"] = old_env


def _fit(args: list[str]) -> None:
    from cosytrain.tasks.lightning_cli import main

    assert main(["fit", *args, *QUIET]) == 0


@pytest.fixture(scope="module")
def exported(demo: dict[str, Any]) -> dict[str, Path]:
    """gen -> a model directory exported from one llm+flow step and one vocoder step (cached per module)."""
    return {}


def _export(gen: str, demo: dict[str, Any], cache: dict[str, Path]) -> Path:
    if gen in cache:
        return cache[gen]
    _, _, _, hift_yaml, extra = GENERATIONS[gen]
    runs = demo["runs"]
    number = gen[1]
    _fit(["--config", f"recipes/cosyvoice{number}_demo.yaml", "--trainer.default_root_dir", str(runs / f"{gen}_tts")])
    # the vocoder run exactly as the demo recipe's comment gives it
    _fit(["--config", "recipes/hift_demo.yaml", "--trainer.default_root_dir", str(runs / f"{gen}_hift"),
          "--model.init_args.hift", f"conf/model/{hift_yaml}", "--data", "conf/data/demo_v2.yaml", *extra,
          "--data.init_args.val_data", "null", "--data.init_args.vocoder", "true",
          "--data.init_args.truncate_length", "9600", "--data.init_args.token_mel_ratio", "0",
          "--data.init_args.batch_type", "static", "--data.init_args.batch_size", "4"])
    out = runs / f"{gen}_export"
    with pytest.warns(RuntimeWarning, match="'byte' text tokenizer"):
        export_model([runs / f"{gen}_tts" / "checkpoints" / "last.ckpt",
                      runs / f"{gen}_hift" / "checkpoints" / "last.ckpt"], out)
    cache[gen] = out
    return out


@pytest.mark.parametrize("gen", ["v2", "v3"])
def test_recipe_trains_exports_reloads_and_synthesises(gen: str, demo: dict[str, Any],
                                                       exported: dict[str, Path]) -> None:
    from cosytrain.inference.auto import AutoModel

    auto_name, model_name, config_name, _, _ = GENERATIONS[gen]
    out = _export(gen, demo, exported)
    shards = demo["data_list"].parent

    # the directory: upstream layout, rendered config, Qwen folder and front-end files of the run
    meta = json.loads((out / "cosytrain.json").read_text())
    assert meta["generation"] == gen and meta["config"] == {**meta["config"], "file": config_name, "source": "run"}
    assert meta["text_tokenizer"] == "byte" and meta["check"]["finite"]
    assert meta["check"]["samples"] == meta["check"]["mel_frames"] * 480
    assert (out / "CosyVoice-BlankEN" / "config.json").read_bytes() == \
        (REPO_ROOT / "conf/model/qwen2_tiny/config.json").read_bytes()
    for name in ("speech_tokenizer_builtin.npz", "campplus_builtin.npz"):
        assert (out / name).read_bytes() == (shards / name).read_bytes()
    text = (out / config_name).read_text()
    assert "qwen_pretrain_path: ''" in text and "pretrain_path: !ref <qwen_pretrain_path>" in text
    spk2info = torch.load(out / "spk2info.pt", weights_only=True)
    spk2embedding = torch.load(shards / "spk2embedding.pt", weights_only=True)
    assert sorted(spk2info) == sorted(spk2embedding)
    for spk, info in spk2info.items():
        assert info["embedding"].shape == (1, 192) and info["embedding"].dtype == torch.float32
        torch.testing.assert_close(info["embedding"][0], torch.tensor(spk2embedding[spk], dtype=torch.float32))

    # strict reload gives exactly the trained weights
    ckpt = torch.load(demo["runs"] / f"{gen}_tts" / "checkpoints" / "last.ckpt", weights_only=True)
    directory, parts = load_model_dir(out)
    assert directory.generation == gen
    for part in ("llm", "flow"):
        ours = parts[part].state_dict()
        trained = {k[len(part) + 1:]: v for k, v in ckpt["state_dict"].items() if k.startswith(part + ".")}
        assert set(ours) == set(trained)
        assert all(torch.equal(ours[k], trained[k]) for k in trained), part

    # synthesis through the user API, offline and streaming
    model = AutoModel(model_dir=str(out), device="cpu")
    assert type(model).__name__ == auto_name and type(model.model).__name__ == model_name
    spk = model.list_available_spks()[0]
    torch.manual_seed(0)
    offline = list(model.inference_sft("Hello there.", spk))
    torch.manual_seed(0)
    streamed = list(model.inference_sft("Hello, friend!", spk, stream=True))
    assert len(offline) == 1 and len(streamed) >= 2
    for chunk in offline + streamed:
        wav = chunk["tts_speech"]
        assert wav.shape[0] == 1 and wav.shape[1] % 480 == 0 and bool(torch.isfinite(wav).all())

    # known tokens: streaming gives the same length as offline; the first chunk is the first
    # 25-token hop minus the vocoder's held-back frames (8 mel frames v2 cache; 3 + 4 + 1 v3 look-ahead)
    tokens = torch.randint(0, 256, (1, 90), dtype=torch.int32)
    emb = torch.nn.functional.normalize(torch.randn(1, 192), dim=1)
    whole = list(model.model.tts(source_speech_token=tokens, flow_embedding=emb))[0]["tts_speech"]
    chunks = [c["tts_speech"] for c in model.model.tts(source_speech_token=tokens, flow_embedding=emb, stream=True)]
    assert whole.shape[1] == 90 * 2 * 480 == sum(c.shape[1] for c in chunks)
    assert chunks[0].shape[1] == (25 * 2 - 8) * 480 and len(chunks) == 3  # hops 25, 50, then the last 15
    # with a 10-token prompt the first hop is padded to 40 so that prompt + hop fill whole 25-token chunks
    prompt = {"flow_prompt_speech_token": torch.randint(0, 256, (1, 10), dtype=torch.int32),
              "prompt_speech_feat": torch.randn(1, 20, 80)}
    chunks = [c["tts_speech"] for c in model.model.tts(source_speech_token=tokens, flow_embedding=emb, stream=True,
                                                       **prompt)]
    assert chunks[0].shape[1] == (40 * 2 - 8) * 480 and sum(c.shape[1] for c in chunks) == 90 * 2 * 480

    # zero-shot from a demo utterance (built-in speech tokenizer and speaker embedding of the export)
    wav = next((demo["home"] / "demo" / "wavs").rglob("*.wav"))
    zero_shot = list(model.inference_zero_shot("Hello, friend!", "A prompt.", str(wav), stream=True))
    assert zero_shot and all(bool(torch.isfinite(c["tts_speech"]).all()) for c in zero_shot)


def test_v1_checkpoint_onto_v2_base_is_one_clear_error(tmp_path: Path, demo: dict[str, Any],
                                                         exported: dict[str, Path]) -> None:
    from tests.inference import _tiny_v1 as tiny

    v2_dir = _export("v2", demo, exported)
    ckpt = tiny.make_ckpt(tmp_path / "v1.ckpt", {"llm": tiny.state("llm")}, 0, 1)
    with pytest.raises(ExportError) as err:
        export_model([ckpt], tmp_path / "out", base=v2_dir)
    message = str(err.value)
    assert "CosyVoice 1" in message and "CosyVoice 2" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_v2_model_dir_as_v1_init_from_is_one_clear_error(demo: dict[str, Any], exported: dict[str, Path]) -> None:
    from cosytrain.tasks.speech_task import SpeechTask
    from tests.inference import _tiny_v1 as tiny

    v2_dir = _export("v2", demo, exported)
    with pytest.raises(ValueError) as err:
        SpeechTask(llm=tiny.build("llm"), init_from=str(v2_dir)).load_init_from()  # what setup() runs
    message = str(err.value)
    assert "CosyVoice 1" in message and "CosyVoice 2" in message and "\n" not in message


def test_parts_of_two_generations_are_not_exported_together(tmp_path: Path, demo: dict[str, Any],
                                                             exported: dict[str, Path]) -> None:
    """A v2 llm+flow run with a v3 (causal) vocoder run: refused before anything is written."""
    runs = demo["runs"]
    _export("v2", demo, exported)
    _export("v3", demo, exported)
    with pytest.raises(ExportError, match=r"CosyVoice [23]\).*make a CosyVoice [23] model; export parts of one"):
        export_model([runs / "v2_tts" / "checkpoints" / "last.ckpt", runs / "v3_hift" / "checkpoints" / "last.ckpt"],
                     tmp_path / "mixed", check=False)
    assert not (tmp_path / "mixed").exists()


def test_base_export_adds_the_runs_front_end_files_and_speakers(tmp_path: Path, demo: dict[str, Any],
                                                                exported: dict[str, Path]) -> None:
    """A base without built-in front ends or spk2info.pt gets the run's (found through its config.yaml)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(_export("v2", demo, exported), base)
    for name in ("speech_tokenizer_builtin.npz", "campplus_builtin.npz", "spk2info.pt", "cosytrain.json"):
        (base / name).unlink()
    out = tmp_path / "out"
    result = export_model([demo["runs"] / "v2_tts" / "checkpoints" / "last.ckpt"], out, base=base, check=False)
    assert (out / "hift.pt").read_bytes() == (base / "hift.pt").read_bytes()
    assert sorted(result.metadata["front_end_files"]) == sorted(
        ["CosyVoice-BlankEN/", "speech_tokenizer_builtin.npz", "campplus_builtin.npz", "spk2info.pt"])
    assert result.metadata["text_tokenizer"] == "byte"
    assert sorted(torch.load(out / "spk2info.pt", weights_only=True)) == sorted(
        torch.load(demo["data_list"].parent / "spk2embedding.pt", weights_only=True))


# --------------------------------------------------------------------------------------------------
# conf/model: official sizes are upstream's state dicts; tiny ones have the same structure
# --------------------------------------------------------------------------------------------------


def _load_cli_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def _classes(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["class_path"]] if "class_path" in node else []
        return own + [c for v in node.values() for c in _classes(v)]
    return []


@pytest.mark.parametrize("gen", ["v2", "v3"])
@pytest.mark.parametrize("part", ["llm", "flow", "hift"])
def test_official_conf_matches_upstream_manifest(gen: str, part: str, tmp_path: Path) -> None:
    from cosytrain.modeldir import Builder

    manifest = load_manifest(f"{gen}_{part}")
    cfg = _load_cli_yaml(REPO_ROOT / "conf" / "model" / f"{part}_{gen}.yaml")
    if part == "llm":
        qwen = tmp_path / "qwen"
        qwen.mkdir()
        (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2", **manifest["qwen2_config"]}))
        cfg["init_args"]["llm"]["init_args"]["pretrain_path"] = str(qwen)
    module = Builder(f"{part}_{gen}.yaml", device="meta").build(run_config_to_tree(cfg, part), part)
    ours = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert ours == {k: v["shape"] for k, v in manifest["keys"].items()}
    assert type(module).__name__ == manifest["class"].rsplit(".", 1)[-1]
    tiny = REPO_ROOT / "conf" / "model" / f"{part}_{gen}_tiny.yaml"
    assert _classes(_load_cli_yaml(tiny)) == _classes(cfg)


# --------------------------------------------------------------------------------------------------
# Token-level models without training
# --------------------------------------------------------------------------------------------------


def _tiny_parts(gen: str) -> dict[str, torch.nn.Module]:
    from cosytrain.modeldir import Builder

    parts = {}
    for part in ("llm", "flow", "hift"):
        cfg = _load_cli_yaml(REPO_ROOT / "conf" / "model" / f"{part}_{gen}_tiny.yaml")
        if part == "llm":
            cfg["init_args"]["llm"]["init_args"]["pretrain_path"] = str(REPO_ROOT / "conf/model/qwen2_tiny")
        parts[part] = Builder(part).build(run_config_to_tree(cfg, part), part)
    return parts


class _ScriptedLLM(torch.nn.Module):
    """Yields fixed speech tokens, standing in for the LLM's sampling loop."""

    def __init__(self, tokens: list[int]) -> None:
        super().__init__()
        self.tokens = tokens

    def inference(self, **kwargs: Any):
        yield from self.tokens


def test_v3_silence_runs_are_cut_to_five() -> None:
    from cosytrain.inference.model import CosyVoice2Model, CosyVoice3Model

    torch.manual_seed(0)
    parts = _tiny_parts("v3")
    script = [1] * 8 + [7] + [2, 28, 29, 55, 248, 494, 9]
    empty = torch.zeros(1, 0, dtype=torch.int32)
    text = torch.ones(1, 3, dtype=torch.int32)
    v3 = CosyVoice3Model(_ScriptedLLM(script), parts["flow"], parts["hift"], device="cpu")
    assert list(v3.speech_tokens(text, empty, empty, torch.zeros(0, 192))) == [1] * 5 + [7] + [2, 28, 29, 55, 248, 9]
    v2 = CosyVoice2Model(_ScriptedLLM(script), parts["flow"], parts["hift"], device="cpu")
    assert list(v2.speech_tokens(text, empty, empty, torch.zeros(0, 192))) == script  # v2 keeps every token


def test_v3_fp16_streaming_is_finite_and_close_to_fp32() -> None:
    from cosytrain.inference.model import CosyVoice3Model

    torch.manual_seed(0)
    parts = _tiny_parts("v3")
    tokens = torch.randint(0, 256, (1, 40), dtype=torch.int32)
    emb = torch.nn.functional.normalize(torch.randn(1, 192), dim=1)
    fp32 = CosyVoice3Model(parts["llm"], parts["flow"], parts["hift"], device="cpu")
    fp16 = CosyVoice3Model(parts["llm"], parts["flow"], parts["hift"], fp16=True, device="cpu", force_fp16=True)
    assert fp16.amp_dtype == torch.float16
    a = torch.cat([c["tts_speech"] for c in fp32.tts(source_speech_token=tokens, flow_embedding=emb, stream=True)], 1)
    b = torch.cat([c["tts_speech"] for c in fp16.tts(source_speech_token=tokens, flow_embedding=emb, stream=True)], 1)
    assert a.shape == b.shape == (1, 40 * 2 * 480) and b.dtype == torch.float32
    assert bool(torch.isfinite(b).all()) and float((a - b).abs().max()) < 0.05
