"""Files of an export that upstream and other users rely on: file modes, and the speakers in spk2info.pt."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from cosytrain.export import export_model
from tests.inference import _tiny_v1 as tiny


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _llm_run(tmp_path: Path, speakers: dict[str, torch.Tensor] | None = None) -> Path:
    """A v1 llm checkpoint whose run config names a data folder with ``spk2embedding.pt``."""
    config = tiny.write_run_config(tmp_path / "run", ("llm",))
    if speakers is not None:
        data = tmp_path / "data"
        data.mkdir()
        (data / "data.list").write_text("")
        torch.save(speakers, data / "spk2embedding.pt")
        tree = yaml.safe_load(config.read_text())
        tree["data"]["init_args"]["train_data"] = str(data / "data.list")
        config.write_text(yaml.safe_dump(tree, sort_keys=False))
    return tiny.make_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt", {"llm": tiny.perturbed("llm", 1)}, 0, 1)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_export_has_the_modes_of_a_plain_write(tmp_path: Path, umask: int) -> None:
    """Not the 0700/0600 of temporary names: others on a shared cluster can read the model."""
    base = tiny.make_model_dir(tmp_path / "base")
    ckpt = _llm_run(tmp_path)
    old = os.umask(umask)
    try:
        out = export_model([ckpt], tmp_path / "out", base=base, check=False).output
    finally:
        os.umask(old)
    assert _mode(out) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"cosytrain.json", "llm.pt", "flow.pt", "hift.pt", "cosyvoice.yaml"}
    for path in files:
        assert _mode(path) == 0o666 & ~umask, path.name


def test_atomic_file_writes_have_the_modes_of_a_plain_write(tmp_path: Path) -> None:
    from cosytrain.utils.atomic import atomic_torch_save, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "fp16_check.json", "{}\n")
        atomic_torch_save({"w": torch.ones(1)}, tmp_path / "last.ckpt")
        (tmp_path / "plain.json").write_text("{}\n")
    finally:
        os.umask(old)
    for name in ("fp16_check.json", "last.ckpt"):
        assert _mode(tmp_path / name) == _mode(tmp_path / "plain.json") == 0o644, name


def test_spk2info_merges_the_training_speakers_into_the_base(tmp_path: Path) -> None:
    """A multi-speaker SFT over a base: the base's speakers stay, the trained ones are added (a trained
    speaker of the same name replaces the base's entry), so upstream's inference_sft knows them all."""
    base = tiny.make_model_dir(tmp_path / "base")  # spk2info.pt: {"spk": ones}
    torch.save({"spk": {"embedding": torch.ones(1, 192)}, "kept": {"embedding": torch.zeros(1, 192),
                                                                   "extra": torch.ones(3)}}, base / "spk2info.pt")
    trained = {"alice": torch.full((192,), 0.5), "spk": torch.full((192,), 2.0)}
    out = export_model([_llm_run(tmp_path, trained)], tmp_path / "out", base=base, check=False).output
    table = torch.load(out / "spk2info.pt", weights_only=True)
    assert sorted(table) == ["alice", "kept", "spk"]
    torch.testing.assert_close(table["alice"]["embedding"], torch.full((1, 192), 0.5))
    torch.testing.assert_close(table["spk"]["embedding"], torch.full((1, 192), 2.0))  # the trained voice
    assert torch.equal(table["kept"]["extra"], torch.ones(3))  # base entries as they were
    meta = json.loads((out / "cosytrain.json").read_text())["spk2info"]
    assert meta["speakers"] == 3 and meta["from_training"] == 2 and meta["from_base"] == 1
    assert meta["replaced_base_speakers"] == ["spk"]
