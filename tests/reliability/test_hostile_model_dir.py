"""A hostile model directory -- code in its yaml, a weights file that is a pickle running code -- is
refused by every way cosytrain reads one, and nothing in it runs (a marker file would appear)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from cosytrain.modeldir import ModelDirError, load_model_dir, open_model_dir
from tests.inference import _tiny_v1 as tiny

YAML_PAYLOADS = {
    "apply os.system": "llm: !apply:os.system ['touch {marker}']\n",
    "new subprocess.Popen": "llm: !new:subprocess.Popen\n  args: [touch, '{marker}']\n",
    "python/object/apply": "llm: !!python/object/apply:os.system ['touch {marker}']\n",
    "name builtins.exec": "__x: !name:builtins.exec\n  source: open('{marker}', 'w')\n",
}


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model_dir(tmp_path_factory.mktemp("clean") / "model")


def _copy(clean_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_dir, tmp_path / "model"))


def _hostile_yaml(model_dir: Path, payload: str, marker: Path) -> None:
    text = (model_dir / "cosyvoice.yaml").read_text()
    text = text.replace("llm: !new:", "llm_unused: !new:", 1)  # the payload takes the llm's place
    (model_dir / "cosyvoice.yaml").write_text(payload.format(marker=marker) + text)


class _TouchOnLoad:
    """Unpickling this calls ``Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _SystemOnLoad:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _readers() -> dict[str, Callable[[Path], object]]:
    from cosytrain.export import export_model

    def automodel(model_dir: Path) -> object:
        from cosytrain.inference.auto import AutoModel

        return AutoModel(model_dir=model_dir)

    return {
        "open_model_dir": open_model_dir,
        "load_model_dir": load_model_dir,
        "export --base": lambda d: export_model([], d.parent / "out", base=d, check=False),
        "AutoModel": automodel,
    }


@pytest.mark.parametrize("reader", ["open_model_dir", "load_model_dir", "export --base", "AutoModel"])
@pytest.mark.parametrize("payload", list(YAML_PAYLOADS))
def test_code_in_the_yaml_is_refused_and_never_runs(clean_dir: Path, tmp_path: Path, payload: str,
                                                     reader: str) -> None:
    model_dir = _copy(clean_dir, tmp_path)
    marker = tmp_path / "pwned"
    _hostile_yaml(model_dir, YAML_PAYLOADS[payload], marker)
    with pytest.raises((ModelDirError, ValueError)) as err:
        _readers()[reader](model_dir)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [_TouchOnLoad, _SystemOnLoad], ids=["Path.touch", "os.system"])
@pytest.mark.parametrize("part", ["llm", "flow", "hift"])
def test_pickled_code_in_weights_is_refused_by_load_model_dir(clean_dir: Path, tmp_path: Path, part: str,
                                                               payload: type) -> None:
    model_dir = _copy(clean_dir, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(1), "x": payload(marker)}, model_dir / f"{part}.pt")
    with pytest.raises(ModelDirError, match="weights_only") as err:
        load_model_dir(model_dir, parts=(part,))
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_pickled_code_in_weights_is_refused_by_init_from(clean_dir: Path, tmp_path: Path) -> None:
    from cosytrain.tasks.speech_task import SpeechTask

    model_dir = _copy(clean_dir, tmp_path)
    marker = tmp_path / "pwned"
    torch.save(_TouchOnLoad(marker), model_dir / "llm.pt")
    with pytest.raises(ModelDirError) as err:  # one line naming the file and the refused callable
        SpeechTask(llm=tiny.build("llm"), init_from=str(model_dir)).load_init_from()  # what setup() runs
    assert "llm.pt" in str(err.value) and "GLOBAL" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("via", ["--ckpt_path", "--model.init_args.init_from"])
def test_pickled_code_through_the_cli_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   via: str) -> None:
    """``fit --ckpt_path`` / ``init_from`` with a file holding code: refused in one line, exit 2, nothing run."""
    from cosytrain.tasks.lightning_cli import main
    from tests.tasks.test_cli import BASE

    marker = tmp_path / "pwned"
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "dir").mkdir()
    torch.save({"state_dict": {}, "global_step": 1, "x": _SystemOnLoad(marker)}, tmp_path / "evil.ckpt")
    torch.save({"embed.weight": torch.zeros(16, 8), "x": _SystemOnLoad(marker)}, tmp_path / "dir" / "llm.pt")
    target = tmp_path / ("evil.ckpt" if via == "--ckpt_path" else "dir")
    code = main(["fit", "--config", str(tmp_path / "base.yaml"), "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path / "run"), via, str(target)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cosytrain fit:")]
    assert code == 2 and len(lines) == 1 and "posix.system" in lines[0], lines
    assert not marker.exists()


def test_checkpoint_io_loads_weights_only_whatever_lightning_asks(tmp_path: Path) -> None:
    """Lightning before 2.6 (setup.cfg allowed 2.4) loads ``ckpt_path`` with ``weights_only=False``: the
    pickle ran (seen with 2.5.0). cosytrain's CheckpointIO, which every Trainer it builds uses, refuses it."""
    import pickle

    from cosytrain.tasks.checkpoint_io import AtomicCheckpointIO

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": _SystemOnLoad(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt", weights_only=False)
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "ok.ckpt")
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "ok.ckpt")["global_step"] == 3
