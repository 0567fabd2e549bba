"""Malformed data and configuration: each kind is skipped-and-counted or ONE clear error line.

This file is the single table of those promises (docs/reliability.md copies it); finer unit tests of
the same stages live in tests/data (pipeline, dataset, datamodule) and tests/tasks (CLI).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosytrain.data.datamodule import CosyDataModule
from cosytrain.data.pipeline import DataError
from cosytrain.tasks.lightning_cli import main
from tests.data.test_pipeline import SR, make_row, wav_bytes, write_shard
from tests.tasks.test_cli import BASE

GOOD = ["g1", "g2"]
DM = dict(speech_token_size=4096, shuffle_size=8, sort_size=4, max_frames_in_batch=250)


def _row(**kw: Any) -> Callable[[Path], list[str]]:
    """A shard holding one bad row named ``bad``."""
    return lambda folder: [write_shard(folder / "bad.parquet", [make_row("bad", **kw)])]


def _shard_bytes(make: Callable[[bytes], bytes]) -> Callable[[Path], list[str]]:
    def build(folder: Path) -> list[str]:
        good = Path(write_shard(folder / "tmpl.parquet", [make_row("x")])).read_bytes()
        (folder / "bad.parquet").write_bytes(make(good))
        return [str(folder / "bad.parquet")]
    return build


def _missing_column(folder: Path) -> list[str]:
    pq.write_table(pa.table({"utt": ["bad"], "text": ["hello"]}), str(folder / "bad.parquet"))
    return [str(folder / "bad.parquet")]


_NAN_WAV = wav_bytes(0.5, samples=np.full(SR // 2, np.nan, dtype=np.float32), subtype="FLOAT")

# kind -> (how to make it, skip reason counted by CosyDataModule.skipped, extra datamodule options)
DATA_ROWS: dict[str, tuple[Callable[[Path], list[str]], str, dict[str, Any]]] = {
    "audio bytes not audio": (_row(audio_data=b"not a wav file"), "undecodable_audio", {}),
    "audio truncated": (_row(audio_data=wav_bytes(0.5)[:30]), "undecodable_audio", {}),
    "audio samples NaN": (_row(audio_data=_NAN_WAV), "nonfinite_audio", {}),
    "audio below 16 kHz": (_row(sr=8000), "low_sample_rate", {}),
    "utterance too long": (_row(seconds=3.0), "too_long", {"max_length": 200}),
    "text empty": (_row(text="  "), "empty_text", {}),
    "speech token >= vocabulary": (_row(speech_token=[1, 2, 4096]), "speech_token_out_of_range", {}),
    "speech token negative": (_row(speech_token=[1, -3, 2]), "speech_token_out_of_range", {}),
    "speech tokens empty": (_row(speech_token=[]), "empty_speech_token", {}),
    "embedding wrong length": (_row(emb_dim=191), "bad_embedding", {}),
    "embedding inf": (_row(spk_embedding=[float("inf")] * 192), "bad_embedding", {}),
    "shard truncated": (_shard_bytes(lambda b: b[:-40]), "corrupt_shard", {}),
    "shard not parquet": (_shard_bytes(lambda b: b"garbage" * 10), "corrupt_shard", {}),
    "shard missing a column": (_missing_column, "corrupt_shard", {}),
    "shard listed but absent": (lambda folder: [str(folder / "absent.parquet")], "corrupt_shard", {}),
}


@pytest.mark.parametrize("kind", list(DATA_ROWS))
def test_bad_data_is_skipped_and_counted(tmp_path: Path, kind: str) -> None:
    make, reason, options = DATA_ROWS[kind]
    good = write_shard(tmp_path / "good.parquet", [make_row("g1"), make_row("g2", seconds=0.6)])
    (tmp_path / "data.list").write_text("".join(p + "\n" for p in [good, *make(tmp_path)]))
    dm = CosyDataModule(train_data=str(tmp_path / "data.list"), **{**DM, **options})
    dm.setup("fit")
    assert sorted(u for batch in dm.train_dataloader() for u in batch["utts"]) == GOOD
    assert Counter(dm.skipped) == Counter({reason: 1})


def _empty_list(folder: Path) -> Path:
    (folder / "data.list").write_text("\n")
    return folder / "data.list"


def _all_bad(folder: Path) -> Path:
    write_shard(folder / "s.parquet", [make_row("a", text=""), make_row("b", speech_token=[])])
    (folder / "data.list").write_text(str(folder / "s.parquet") + "\n")
    return folder / "data.list"


def _latin1_list(folder: Path) -> Path:
    good = write_shard(folder / "good.parquet", [make_row("g1")])
    (folder / "data.list").write_bytes(good.encode() + b"\n" + str(folder).encode() + b"/caf\xe9.parquet\n")
    return folder / "data.list"


@pytest.mark.parametrize("make,fragment", [
    (lambda folder: folder / "nowhere" / "data.list", "nowhere/data.list"),
    (_empty_list, "data.list"),
    (_all_bad, "no usable utterance"),
    (_latin1_list, r"data.list:2: not UTF-8 \(byte 0xe9"),
], ids=["data list missing", "data list empty", "no usable row at all", "data list not UTF-8"])
def test_unusable_data_set_is_one_error(tmp_path: Path, make: Callable[[Path], Path], fragment: str) -> None:
    with pytest.raises(DataError, match=fragment) as err:
        CosyDataModule(train_data=str(make(tmp_path)), **DM).setup("fit")
    assert "\n" not in str(err.value)


CONFIG_ROWS: dict[str, tuple[list[str], str]] = {
    "unknown key": (["--trainer.max_stepz", "3"], "max_stepz"),
    "wrong type": (["--trainer.max_steps", "many"], "trainer.max_steps"),
    "unknown precision": (["--trainer.precision", "15-mixed"], "precision"),
    "class not importable": (["--model.init_args.llm.class_path", "nowhere.Model"], "nowhere"),
    "unknown optimizer": (["--model.init_args.train_conf", "{optim: sgdx}"], "sgdx"),
    "unknown scheduler": (["--model.init_args.train_conf", "{optim: adam, scheduler: nope}"], "nope"),
    "init_from not a model dir": (["--model.init_args.init_from", "/nonexistent/dir"], "/nonexistent/dir/llm.pt"),
    "freeze prefix matches nothing": (["--model.init_args.freeze", "[llm.nothing]"], "llm.nothing"),
    "accumulation set twice": (["--trainer.accumulate_grad_batches", "2", "--model.init_args.train_conf",
                                "{optim: adam, accum_grad: 4}"], "set twice"),
    "data list missing": (["--data", "cosytrain.data.datamodule.CosyDataModule", "--data.init_args.train_data",
                           "/nonexistent/data.list"], "/nonexistent/data.list"),
    "ckpt_path missing": (["--ckpt_path", "/nonexistent/x.ckpt"], "/nonexistent/x.ckpt"),
    "config file not YAML": (["--config", "{broken}"], "broken.yaml"),
    "config file not UTF-8": (["--config", "{latin1}"], "latin1.yaml:3: not UTF-8 (byte 0xe9 at column 8)"),
}


@pytest.mark.parametrize("kind", list(CONFIG_ROWS))
def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    extra, fragment = CONFIG_ROWS[kind]
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "broken.yaml").write_text("trainer: [unclosed\n")
    (tmp_path / "latin1.yaml").write_bytes(b"# edited on an old Windows box\ntrainer:\n  # caf\xe9 au lait\n")
    extra = [a.replace("{broken}", str(tmp_path / "broken.yaml")).replace("{latin1}", str(tmp_path / "latin1.yaml"))
             for a in extra]
    code = main(["fit", "--config", str(tmp_path / "base.yaml"), "--trainer.max_steps", "1", "--trainer.logger",
                 "false", "--trainer.default_root_dir", str(tmp_path / "run"), *extra])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cosytrain fit:")]
    assert code == 2 and len(lines) == 1, lines
    assert fragment in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_model_dir_config_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A model directory's cosyvoice.yaml edited in a legacy encoding: one UpstreamConfigError naming the line."""
    from cosytrain.modeldir import UpstreamConfigError, load_upstream_config

    (tmp_path / "cosyvoice.yaml").write_bytes(b"sample_rate: 22050\n# r\xe9glages\n")
    with pytest.raises(UpstreamConfigError) as err:
        load_upstream_config(tmp_path)
    assert "cosyvoice.yaml:2: not UTF-8 (byte 0xe9 at column 4)" in str(err.value) and "\n" not in str(err.value)
