"""Fixtures of the upstream oracle tier: the oracle, the small runs and their exports (once per session)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.upstream._oracle import Oracle, make_oracle

# tokens fed to upstream's token2wav: v1 needs more than its 100-token hop + 20 overlap to stream in chunks
TOKENS = {"v1": 250, "v2": 90, "v3": 90}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/upstream/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.upstream)


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    return make_oracle()


@pytest.fixture(scope="session")
def prompt_wav(demo_corpus: Any) -> Path:
    """A real demo utterance (22.05 kHz) as the zero-shot prompt."""
    wavs = sorted((Path(demo_corpus[0]) / "wavs").rglob("*.wav"))
    assert wavs, f"no wav in the demo corpus at {demo_corpus[0]}"
    return wavs[0]


@pytest.fixture(scope="session")
def data_25hz(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Any) -> Path:
    """25 Hz shards of a reduced demo corpus (8 utterances) for the v2/v3 runs."""
    from cosytrain.data.demo_corpus import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("demo25"), num_utts=8, token_rate=25)


@pytest.fixture(scope="session")
def tiny_exports(oracle: Oracle, tmp_path_factory: pytest.TempPathFactory, demo_corpus: Any,
                 data_25hz: Path) -> dict[str, dict[str, Path]]:
    """gen -> kind -> model directory (see ``_tiny_runs``); trained and exported once per session."""
    import torch

    from tests.upstream import _tiny_runs

    runs, out = tmp_path_factory.mktemp("oracle_runs"), tmp_path_factory.mktemp("oracle_exports")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = {}
        for gen in ("v1", "v2", "v3"):
            trained = _tiny_runs.train(gen, runs, Path(demo_corpus[0]), data_25hz)
            result[gen] = {**_tiny_runs.export_kinds(gen, trained, out), "_runs": trained}
        return result
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def finetune_exports(tiny_exports: dict[str, dict[str, Path]], data_25hz: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA SFT and DPO (with LoRA) of the tiny v2 recipes on the v2 ``run`` export, exported (tests/_finetune_runs)."""
    from tests import _finetune_runs

    runs = tmp_path_factory.mktemp("finetune_runs")
    base = tiny_exports["v2"]["run"]
    return {"lora": _finetune_runs.lora_export(base, data_25hz, runs),
            "dpo": _finetune_runs.dpo_export(base, data_25hz, runs)}


@pytest.fixture(scope="session")
def tiny_verdicts(oracle: Oracle, tiny_exports: dict[str, dict[str, Path]], finetune_exports: dict[str, Path],
                  prompt_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``<gen>_<kind>`` -> upstream's verdict on that export (and ``v2_lora``/``v2_dpo`` on the fine-tuned
    ones), all from ONE oracle process."""
    dirs = [{"name": f"{gen}_{kind}", "path": str(path), "tokens": TOKENS[gen], "auto": True}
            for gen, kinds in tiny_exports.items() for kind, path in kinds.items() if not kind.startswith("_")]
    dirs += [{"name": f"v2_{kind}", "path": str(path), "tokens": TOKENS["v2"], "auto": False}
             for kind, path in finetune_exports.items()]
    return oracle.run("check_model_dirs", {"dirs": dirs, "prompt_wav": str(prompt_wav),
                                           "out_dir": str(tmp_path_factory.mktemp("oracle_wavs"))})
