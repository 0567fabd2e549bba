"""FP16-vs-FP32 check on the v1 fixture models, its noise/RNG handling, fault detection and the CLI."""

from __future__ import annotations

import contextlib
import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cosytrain.evaluation import fp16_batches as B
from cosytrain.evaluation import fp16_check as C
from cosytrain.evaluation import fp16_cli as CLI
from cosytrain.evaluation import fp16_figures as F
from cosytrain.evaluation import fp16_stages as S
from cosytrain.modeldir import build_from_fixture_config
from tests.conftest import load_fixture

FIXTURES = {"llm": "v1_llm", "flow": "v1_flow", "hift": "hift_v1"}


@functools.lru_cache(maxsize=None)
def _built(part: str) -> torch.nn.Module:
    fx = load_fixture(FIXTURES.get(part, part))
    module = build_from_fixture_config(fx["config"])
    module.load_state_dict(fx["state_dict"], strict=True)
    return module.eval()


@pytest.fixture(scope="module")
def parts() -> dict[str, torch.nn.Module]:
    return {p: _built(p) for p in FIXTURES}


@pytest.fixture(scope="module")
def batch() -> dict:
    # v1_llm: 100 text tokens, 40 speech tokens; v1_flow vocabulary 64
    return B.synthetic_batch(3, text_vocab=100, speech_vocab=40, min_tokens=10, max_tokens=14, seed=5)


@pytest.fixture(scope="module")
def report(parts, batch) -> C.FP16Report:
    old = torch.get_num_threads()  # module scope: runs before the function-scoped thread fixtures
    torch.set_num_threads(1)
    try:
        return C.run_fp16_check(batch, **parts, num_utterances=2, keep_samples=True)
    finally:
        torch.set_num_threads(old)


def test_fixture_models_pass_within_default_tolerances(report) -> None:
    figs = report.figures
    assert figs["passed"], F.format_table(figs)
    assert set(figs["stages"]) == {"llm", "flow", "hift"}
    assert figs["num_utterances"] == 2
    assert figs["autocast"] == {"device_type": "cpu", "dtype": "float16", "note": C.autocast_spec("cpu").note}
    llm, flow, hift = figs["stages"]["llm"], figs["stages"]["flow"], figs["stages"]["hift"]
    assert llm["positions"] > 20 and flow["frames"] > 20 and hift["samples"] == flow["frames"] * 256
    # FP16 really ran (not a silent FP32 run): small but non-zero differences everywhere
    assert 0 < llm["kl_mean"] < 1e-5 and llm["top1_agreement"] == 1.0
    assert 0 < flow["mel_l1"] < 0.01 and flow["cosine"] > 0.9999
    assert 0 < hift["lsd_db"] < 0.5 and 0 < hift["mcd_db"] < 0.5
    assert hift["source_max_abs_diff"] == 0.0 and hift["mel_source"] == "flow_fp32"
    assert report.samples["mel_fp32"].shape == report.samples["mel_fp16"].shape
    assert report.samples["wav_fp32"].dim() == 1 and report.samples["sample_rate"] == 22050
    json.dumps(figs)  # plain data only


class _NoAutocast(S.AutocastSpec):
    """A 'FP16' run that is FP32: every difference must then be exactly zero."""

    def fp16(self):
        return torch.autocast(device_type=self.device_type, enabled=False)


def test_same_seeds_and_noise_make_an_fp32_rerun_identical(parts, batch, monkeypatch) -> None:
    monkeypatch.setattr(C, "autocast_spec", lambda device: _NoAutocast("cpu"))
    # if the flow's initial noise or the vocoder's source noise differed, these would not be 0
    stages = C.run_fp16_check(batch, **parts, num_utterances=1).figures["stages"]
    assert stages["llm"]["kl_mean"] == 0.0 and stages["llm"]["top1_agreement"] == 1.0
    assert stages["flow"]["mel_l1"] == 0.0
    assert stages["hift"]["lsd_db"] == 0.0 and stages["hift"]["wav_max_abs"] == 0.0


def test_flow_noise_is_replayed_even_without_seeding(parts, batch, monkeypatch) -> None:
    monkeypatch.setattr(C, "autocast_spec", lambda device: _NoAutocast("cpu"))
    monkeypatch.setattr(S, "_seed_all", lambda seed: None)
    stages = C.run_fp16_check(batch, flow=parts["flow"], num_utterances=1).figures["stages"]
    assert stages["flow"]["mel_l1"] == 0.0  # the FP32 run's initial noise went into the second run


def test_data_that_does_not_fit_the_model_is_named(parts, batch) -> None:
    wrong = dict(batch, speech_token=batch["speech_token"] + 64)  # past v1_flow's 64-token vocabulary
    figs = C.run_fp16_check(wrong, flow=parts["flow"], num_utterances=1).figures
    assert "speech_token holds ids up to" in figs["errors"]["flow"]
    assert "flow's speech vocabulary" in figs["errors"]["flow"]


def test_rng_state_and_training_mode_are_restored(parts, batch) -> None:
    flow = parts["flow"]
    flow.train()
    flow.decoder.estimator.eval()  # a mixed state must come back as it was
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    try:
        C.run_fp16_check(batch, flow=flow, num_utterances=1)
        assert (random.random(), np.random.rand(), torch.rand(1)) == expected
        assert flow.training and not flow.decoder.estimator.training and flow.encoder.training
        assert "initial_noise" not in vars(flow.decoder)  # the replay patch is gone
    finally:
        flow.eval()


def _under_autocast() -> bool:
    return torch.is_autocast_enabled("cpu")


@contextlib.contextmanager
def _fault(module: torch.nn.Module, fn):
    """A forward hook that changes the output only under autocast: an FP16-only bug."""
    handle = module.register_forward_hook(lambda m, a, out: fn(out) if _under_autocast() else None)
    try:
        yield
    finally:
        handle.remove()


def test_fp16_only_faults_fail_their_stage(parts, batch) -> None:
    with _fault(parts["flow"].decoder.estimator, lambda out: out + 0.5):
        figs = C.run_fp16_check(batch, flow=parts["flow"], num_utterances=1).figures
    assert not figs["passed"] and figs["stages"]["flow"]["mel_l1"] > 0.05
    assert any(f.startswith("flow/mel_l1") for f in figs["failures"])

    with _fault(parts["llm"].llm_decoder, lambda out: out.masked_fill(out > 0, float("inf"))):
        figs = C.run_fp16_check(batch, llm=parts["llm"], num_utterances=1).figures
    assert figs["stages"]["llm"]["nonfinite"] > 0 and not figs["passed"]

    mel = {"speech_feat": batch["speech_feat"][:1], "speech_feat_len": batch["speech_feat_len"][:1]}
    with _fault(parts["hift"].conv_post, lambda out: out * 1.5):
        figs = C.run_fp16_check(mel, hift=parts["hift"], num_utterances=1).figures
    assert figs["stages"]["hift"]["mel_source"] == "batch"
    assert any(f.startswith("hift/lsd_db") for f in figs["failures"]), F.format_table(figs)


def test_exceptions_fp16_only_fail_others_are_reported(batch) -> None:
    class Broken(torch.nn.Module):
        def __init__(self, only_fp16: bool) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.only_fp16 = only_fp16

        def inference(self, **kwargs):
            if torch.is_autocast_enabled("cpu") or not self.only_fp16:
                raise RuntimeError("boom")
            return torch.zeros(1, 80, 5), None

    figs = C.run_fp16_check(batch, flow=Broken(only_fp16=True), num_utterances=1).figures
    assert figs["stages"]["flow"] == {"error": "raised only under FP16 autocast: RuntimeError: boom"}
    assert not figs["passed"] and figs["skipped"]["hift"] == "no vocoder"

    figs = C.run_fp16_check(batch, flow=Broken(only_fp16=False), num_utterances=1).figures
    assert figs["errors"] == {"flow": "RuntimeError: boom"} and "flow" not in figs["stages"]
    assert figs["passed"]  # not an FP16 finding, but visible
    assert "flow: NOT CHECKED" in F.format_table(figs) and "INCOMPLETE: flow" in F.format_table(figs)


def test_tolerances_overrides_and_unknown_keys() -> None:
    tol = F.resolve_tolerances({"flow/mel_l1": 1.0, "llm/kl_mean": None})
    assert tol["flow/mel_l1"] == 1.0 and tol["llm/kl_mean"] is None
    with pytest.raises(ValueError, match="unknown FP16 tolerance 'flow/l1'"):
        F.resolve_tolerances({"flow/l1": 1.0})
    stages = {"llm": {"top1_agreement": 0.5, "kl_mean": float("nan")}, "flow": {"cosine": 0.9999}}
    failures = F.check_tolerances(stages, F.resolve_tolerances())
    assert len(failures) == 2 and failures[0].startswith("llm/top1_agreement = 0.5 < 0.95")
    assert "not finite" in failures[1]


def test_flat_figures_card_section_and_checkpoint_lookup(report) -> None:
    flat = F.flat_figures(report.figures)
    assert flat["fp16/passed"] == 1.0 and flat["fp16/flow/mel_l1"] == report.figures["stages"]["flow"]["mel_l1"]
    card = F.model_card_section(report.figures)
    assert card["passed"] is True and card["stages"] == report.figures["stages"]
    ckpt = {"callbacks": {F.CALLBACK_STATE_KEY: {"last_figures": report.figures, "validations": 3}}}
    assert F.figures_from_checkpoint(ckpt) == report.figures
    assert F.figures_from_checkpoint({"callbacks": {}}) is None
    assert "PASSED" in F.format_table(report.figures)


def test_cli_on_a_model_directory(tmp_path: Path, capsys) -> None:
    from tests.inference import _tiny_v1 as tiny

    model_dir = tiny.make_model_dir(tmp_path / "model")
    (model_dir / "cosytrain.json").write_text(json.dumps({"format": 1, "generation": "v1"}))
    assert CLI.main(["--model_dir", str(model_dir), "--num_utterances", "1", "--parts", "flow,hift"]) == 0
    out = capsys.readouterr().out
    assert "flow   mel_l1" in out and "PASSED" in out
    written = json.loads((model_dir / "fp16_check.json").read_text())
    assert written["passed"] and written["source"].startswith("synthetic")
    assert set(written["stages"]) == {"flow", "hift"} and written["errors"] == {}
    card = json.loads((model_dir / "cosytrain.json").read_text())
    assert card["generation"] == "v1" and card["fp16_check"]["stages"] == written["stages"]

    # an impossible bound fails with exit status 1; a bad option is a one-line error (status 2)
    assert CLI.main(["--model_dir", str(model_dir), "--num_utterances", "1", "--parts", "hift",
                   "--tolerance", "hift/lsd_db=0", "--no_update_card"]) == 1
    assert "FAILED: hift/lsd_db" in capsys.readouterr().out
    assert json.loads((model_dir / "cosytrain.json").read_text()) == card  # --no_update_card left it alone
    assert CLI.main(["--model_dir", str(model_dir), "--tolerance", "flow/l1=1"]) == 2
    assert "unknown FP16 tolerance" in capsys.readouterr().err
    assert CLI.main(["--model_dir", str(tmp_path / "missing")]) == 2


def test_cli_reads_utterances_through_the_data_pipeline(tmp_path: Path, capsys, demo_corpus) -> None:
    from tests.inference import _tiny_v1 as tiny

    data_list = demo_corpus[1]  # the full demo corpus, built once per session (tests/conftest.py)
    model_dir = tiny.make_model_dir(tmp_path / "model", front_end=False)
    (model_dir / "cosytrain.json").write_text(json.dumps({"run_text_tokenizer": "byte"}))
    # the demo's 256-token codebook does not fit the fixture flow's 64: named, not an IndexError
    assert CLI.main(["--model_dir", str(model_dir), "--data", str(data_list), "--num_utterances", "1",
                   "--parts", "flow,hift"]) == 2
    written = json.loads((model_dir / "fp16_check.json").read_text())
    assert "flow's speech vocabulary has 64" in written["errors"]["flow"]
    assert written["stages"]["hift"]["mel_source"] == "batch" and written["stages"]["hift"]["lsd_db"] < 1.5
    assert written["source"] == str(data_list.resolve())
    assert "INCOMPLETE: flow" in capsys.readouterr().out


@pytest.mark.parametrize("gen", ["v2", "v3"])
def test_cosyvoice2_and_3_fixture_models_pass(gen: str, tmp_path: Path) -> None:
    """The same check over the v2/v3 parts (Qwen LLM, causal flow or DiT, 24 kHz / causal HiFT)."""
    from tests.models.test_llm_v2 import build_fixture_model, make_qwen_dir

    fx = load_fixture(f"{gen}_llm")
    llm = build_fixture_model(fx, make_qwen_dir(tmp_path / "qwen", fx["qwen2_config"], weights=False))
    flow, hift = _built(f"{gen}_flow"), _built(f"hift_{gen}")
    # 24 kHz v2/v3 mel (n_fft 1920, hop 480), 2 mel frames per 25 Hz token; flow vocabulary 64, llm 60 speech ids
    batch = B.synthetic_batch(2, text_vocab=100, speech_vocab=60, sample_rate=24000, n_fft=1920, hop_size=480,
                              win_size=1920, frames_per_token=2, min_tokens=12, max_tokens=16, seed=7)
    report = C.run_fp16_check(batch, llm=llm, flow=flow, hift=hift, num_utterances=2)
    assert set(report.figures["stages"]) == {"llm", "flow", "hift"}, report.figures.get("errors")
    assert report.figures["passed"], report.figures["failures"]
