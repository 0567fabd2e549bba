"""Reading upstream-layout model directories: yaml choice, generation, strict weights, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosytrain.modeldir import (
    ModelDirError,
    find_config,
    load_model_dir,
    open_model_dir,
    state_dict_generation,
)
from tests.conftest import load_manifest
from tests.inference import _tiny_v1 as tiny


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return tiny.make_model_dir(tmp_path / "model")


def test_loads_strictly_with_the_weights_given(model_dir: Path) -> None:
    directory, parts = load_model_dir(model_dir)
    assert directory.generation == "v1" and directory.config_path.name == "cosyvoice.yaml"
    for part in ("llm", "flow", "hift"):
        expected = tiny.state(part)
        got = parts[part].state_dict()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert not parts[part].training


def test_config_picked_in_automodel_order(model_dir: Path) -> None:
    # a stray cosyvoice2.yaml / cosyvoice3.yaml beside cosyvoice.yaml: upstream AutoModel takes cosyvoice.yaml
    (model_dir / "cosyvoice3.yaml").write_text("llm: !new:os.system\n")
    (model_dir / "cosyvoice2.yaml").write_text("not: [valid\n")
    assert find_config(model_dir).name == "cosyvoice.yaml"
    assert open_model_dir(model_dir).generation == "v1"
    (model_dir / "cosyvoice.yaml").unlink()
    assert find_config(model_dir).name == "cosyvoice2.yaml"


def test_v1_config_under_a_v2_name_is_refused(model_dir: Path) -> None:
    (model_dir / "cosyvoice.yaml").rename(model_dir / "cosyvoice2.yaml")
    with pytest.raises(ModelDirError, match=r"CosyVoice 1\).*cosyvoice2.yaml as CosyVoice 2") as err:
        open_model_dir(model_dir)
    assert "\n" not in str(err.value)


def test_missing_weights_file_is_one_line(model_dir: Path) -> None:
    (model_dir / "flow.pt").unlink()
    with pytest.raises(ModelDirError, match=r"flow\.pt: not found") as err:
        load_model_dir(model_dir)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelDirError, match="no cosyvoice.yaml"):
        find_config(model_dir.parent)


def test_hift_generator_prefix_is_stripped(model_dir: Path) -> None:
    torch.save({f"generator.{k}": v for k, v in tiny.state("hift").items()}, model_dir / "hift.pt")
    _, parts = load_model_dir(model_dir, parts=("hift",))
    assert torch.equal(parts["hift"].state_dict()["conv_pre.bias"], tiny.state("hift")["conv_pre.bias"])


def test_non_tensor_entries_are_ignored(model_dir: Path) -> None:
    # upstream's training loop saves epoch/step beside the weights
    torch.save({**tiny.state("llm"), "epoch": 3, "step": 100}, model_dir / "llm.pt")
    load_model_dir(model_dir, parts=("llm",))


def test_shape_mismatch_names_the_keys(model_dir: Path) -> None:
    weights = tiny.state("llm")
    weights["speech_embedding.weight"] = torch.zeros(41, 32)
    del weights["llm_decoder.bias"]
    torch.save(weights, model_dir / "llm.pt")
    with pytest.raises(ModelDirError) as err:
        load_model_dir(model_dir, parts=("llm",))
    message = str(err.value)
    assert "speech_embedding.weight" in message and "[40, 32]" in message and "[41, 32]" in message
    assert "llm_decoder.bias" in message and "\n" not in message


def test_weights_of_another_generation_are_named(model_dir: Path) -> None:
    v2 = {k: torch.zeros(1) for k in list(load_manifest("v2_llm")["keys"])[:40]}
    torch.save(v2, model_dir / "llm.pt")
    with pytest.raises(ModelDirError, match=r"look like CosyVoice 2 \(llm\.model\.model\.") as err:
        load_model_dir(model_dir, parts=("llm",))
    assert "CosyVoice 1" in str(err.value)


@pytest.mark.parametrize("gen", ["v1", "v2", "v3"])
def test_state_dict_generation_on_official_layouts(gen: str) -> None:
    for part in ("llm", "flow", "hift"):
        keys = load_manifest(f"{gen}_{part}")["keys"]
        meta = {k: torch.empty(v["shape"], device="meta") for k, v in keys.items()}
        assert state_dict_generation(part, meta)[0] == gen, part


def test_pickled_code_in_weights_is_refused(model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Boom()}, model_dir / "llm.pt")
    with pytest.raises(ModelDirError, match="weights_only"):
        load_model_dir(model_dir, parts=("llm",))
    assert not marker.exists()


@pytest.mark.parametrize("hostile", [
    "llm: !!python/object/apply:os.system ['touch {marker}']\n",
    "llm: !new:os.system\n  command: touch {marker}\n",
    "__x: !apply:os.system ['touch {marker}']\n",
])
def test_hostile_yaml_is_refused_without_running_anything(model_dir: Path, tmp_path: Path, hostile: str) -> None:
    marker = tmp_path / "pwned"
    text = (model_dir / "cosyvoice.yaml").read_text()
    text = text.replace("llm: !new:", "llm_: !new:", 1)  # the hostile line is the llm now
    (model_dir / "cosyvoice.yaml").write_text(hostile.format(marker=marker) + text)
    with pytest.raises(ModelDirError, match="os.system") as err:
        open_model_dir(model_dir)
    assert "\n" not in str(err.value)
    assert not marker.exists()
