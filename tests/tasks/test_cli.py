"""``python -m cosytrain fit|validate|test``: configs, overrides, one-line errors, resume into the run folder."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from cosytrain.tasks.lightning_cli import main, one_line
from tests.tasks._toy import read_scalars

BASE = """
trainer:
  accelerator: cpu
  max_steps: 50
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
model:
  class_path: cosytrain.tasks.speech_task.LLMTask
  init_args:
    llm:
      class_path: tests.tasks._toy.ToyPart
      init_args: {vocab: 16, dim: 8}
    train_conf: {optim: adam, optim_conf: {lr: 0.01}, scheduler: constantlr, grad_clip: 5}
data:
  class_path: tests.tasks._toy.ToyDataModule
  init_args: {num_batches: 2}
"""


@pytest.fixture()
def cfg(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


def _stderr_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cosytrain")]


def test_fit_with_override_saves_resolved_config(tmp_path, cfg):
    run = tmp_path / "run"
    assert main(["fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 2
    assert saved["model"]["init_args"]["llm"]["class_path"] == "tests.tasks._toy.ToyPart"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_several_configs_later_wins_and_resume_last_continues_in_run_folder(tmp_path, cfg):
    run = tmp_path / "run"
    over = tmp_path / "over.yaml"
    over.write_text(f"trainer:\n  max_steps: 3\n  default_root_dir: {run}\n  precision: 16-mixed\n")
    assert main(["fit", "--config", str(cfg), "--config", str(over)]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert main(["fit", "--config", str(cfg), "--config", str(over), "--trainer.max_steps", "5",
                 "--ckpt_path", "last"]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5 and "CosyMixedPrecision" in ckpt
    assert [s for s, _ in read_scalars(run)["train/loss"]] == [1, 2, 3, 4, 5]


def test_print_config(capsys, cfg):
    assert main(["fit", "--config", str(cfg), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "cosytrain.tasks.speech_task.LLMTask"
    assert printed["trainer"]["max_steps"] == 50


@pytest.mark.parametrize("extra,needle", [
    (["--trainer.max_stepz", "2"], "max_stepz"),
    (["--trainer.max_steps", "abc"], "trainer.max_steps"),
    (["--model.init_args.llm.init_args.dimm", "2"], "dimm"),
    (["--model.init_args.train_conf.foo", "1"], "foo"),
])
def test_bad_override_is_one_line_exit_2(capsys, cfg, extra, needle):
    assert main(["fit", "--config", str(cfg), *extra]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and needle in lines[0], lines


def test_unknown_key_in_config_file_is_one_line_exit_2(capsys, tmp_path, cfg):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    assert main(["fit", "--config", str(cfg), "--config", str(bad)]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "max_stepz" in lines[0], lines


def test_validate_subcommand(tmp_path, cfg):
    assert main(["validate", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "v")]) == 0


def test_one_line_summarises_nested_jsonargparse_error():
    msg = ('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
           "    - Problem with given class_path 'a.B':\n        Parser key \"llm\":\n"
           "          Problem with given class_path 'c.D':\n            Option 'dimm' is not accepted\n"
           "    - Expected a <class 'NoneType'>\n  Given value type: x\n")
    assert one_line(msg) == "model.llm: Option 'dimm' is not accepted (in c.D)"


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,manifest", [("llm_v1", "v1_llm"), ("flow_v1", "v1_flow")])
def test_official_model_confs_build_upstream_state_dicts(name, manifest):
    """conf/model/*_v1.yaml are upstream's cosyvoice.yaml sections: same keys and shapes (built on meta)."""
    from jsonargparse import ArgumentParser
    from tests.conftest import load_manifest

    want = load_manifest(manifest)["keys"]
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_argument("--part", type=torch.nn.Module)
    cfg = parser.parse_object({"part": yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())})
    with torch.device("meta"):
        part = parser.instantiate_classes(cfg).part  # instantiate() is newer than the lowest jsonargparse allowed
    got = {k: list(v.shape) for k, v in part.state_dict().items()}
    assert got == {k: v["shape"] for k, v in want.items()}


@pytest.mark.parametrize("overlay", ["strategy/deepspeed_zero2.yaml", "strategy/deepspeed_zero3.yaml",
                                     "strategy/ddp.yaml"])
def test_strategy_overlays_parse(capsys, cfg, overlay):
    assert main(["fit", "--config", str(cfg), "--config", str(REPO / "conf" / overlay), "--print_config"]) == 0
    # deepspeed's import logs "Setting accelerator to CPU" to stdout on a machine without CUDA
    out = "\n".join(line for line in capsys.readouterr().out.splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d ", line))
    printed = yaml.safe_load(out)["trainer"]
    if "deepspeed" in overlay:
        assert printed["strategy"]["class_path"] == "cosytrain.tasks.deepspeed.CosyDeepSpeedStrategy"
        assert printed["strategy"]["init_args"]["stage"] == (2 if "zero2" in overlay else 3)
        assert printed["precision"] == "bf16-mixed" and printed["gradient_clip_val"] is None


@pytest.fixture(scope="module")
def demo_list(tmp_path_factory):
    from cosytrain.data.demo_corpus import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("demo"), num_utts=4)


def _recipe_args(run, data_list, *extra):
    """The default recipe on a 4-utterance demo corpus (one shard, so no held-out validation shard)."""
    return ["fit", "--config", str(REPO / "recipes" / "sft.yaml"),
            "--trainer", str(REPO / "conf" / "trainer" / "smoke_cpu.yaml"),
            "--trainer.default_root_dir", str(run), "--data.init_args.root", str(data_list.parents[1]),
            "--data.init_args.num_utts", "4", "--data.init_args.val_shards", "0",
            "--data.init_args.max_frames_in_batch", "300", *extra]


def test_default_recipe_runs_three_fp16_steps(tmp_path, demo_list):
    """recipes/sft.yaml (demo corpus + small v1 LLM + flow), 3 real FP16 steps on CPU."""
    run = tmp_path / "run"
    assert main(_recipe_args(run, demo_list)) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"llm", "flow"}
    assert "CosyMixedPrecision" in ckpt
    scalars = read_scalars(run)
    for tag in ("train/llm_loss", "train/llm_acc", "train/flow_loss", "train/loss_scale"):
        assert len(scalars[tag]) == 3 and all(v == v for _, v in scalars[tag]), tag


def test_default_recipe_resumes_mid_epoch_exactly(tmp_path, demo_list):
    """Real parts (dropout, the flow's random t/noise/prompt masks) + real data, FP32: 4 steps ==
    2 steps + `--ckpt_path last` + 2 steps, mid-epoch."""
    fp32 = ("--trainer.precision", "32-true", "--trainer.limit_val_batches", "0")
    assert main(_recipe_args(tmp_path / "a", demo_list, *fp32, "--trainer.max_steps", "4")) == 0
    assert main(_recipe_args(tmp_path / "b", demo_list, *fp32, "--trainer.max_steps", "2")) == 0
    assert main(_recipe_args(tmp_path / "b", demo_list, *fp32, "--trainer.max_steps", "4", "--ckpt_path", "last")) == 0
    a, b = read_scalars(tmp_path / "a"), read_scalars(tmp_path / "b")
    for tag in ("train/llm_loss", "train/flow_loss"):
        assert [s for s, _ in b[tag]] == [1, 2, 3, 4]
        assert b[tag] == a[tag], tag


class BuggyPart(torch.nn.Module):
    """A part whose constructor has a genuine bug (or raises a deliberate configuration error)."""

    def __init__(self, kind: str = "type") -> None:
        super().__init__()
        if kind == "type":
            len(5)  # TypeError: a bug, not a configuration mistake
        if kind == "key":
            {}["missing"]  # KeyError: a bug
        if kind == "config":
            from cosytrain.errors import ConfigurationError

            raise ConfigurationError("kind='config' is not allowed here; set kind: none")


def _buggy_args(cfg, kind: str) -> list[str]:
    return ["fit", "--config", str(cfg), "--model.init_args.llm", "tests.tasks.test_cli.BuggyPart",
            "--model.init_args.llm.init_args.kind", kind]


@pytest.mark.parametrize("kind,error", [("type", TypeError), ("key", KeyError)])
def test_a_bug_in_model_code_keeps_its_traceback(capsys, cfg, kind, error):
    """A genuine bug raised while the model is built is not turned into a one-line config error: the
    bug's own exception escapes (Python prints its traceback, exit code 1) with the frame that raised it."""
    import traceback

    with pytest.raises(error) as info:
        main(_buggy_args(cfg, kind))
    last = traceback.extract_tb(info.value.__traceback__)[-1]  # the line that raised it, in the part
    assert last.filename == __file__ and last.name == "__init__"
    assert last.line in ("len(5)  # TypeError: a bug, not a configuration mistake", '{}["missing"]  # KeyError: a bug')
    assert not _stderr_lines(capsys)  # no one-line "cosytrain fit: ..." summary hiding it


def test_configuration_error_in_model_code_is_one_line_and_traceback_on_request(capsys, cfg, monkeypatch):
    assert main(_buggy_args(cfg, "config")) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("cosytrain")]
    assert lines == ["cosytrain fit: kind='config' is not allowed here; set kind: none"] and "Traceback" not in err
    monkeypatch.setenv("COSYTRAIN_TRACEBACK", "1")
    assert main(_buggy_args(cfg, "config")) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise ConfigurationError("kind=\'config\'' in err
    assert err.strip().splitlines()[-1] == lines[0]
