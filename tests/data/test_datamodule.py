"""CosyDataModule: YAML-friendly init, batch contract, position in checkpoints, Lightning resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from cosytrain.data.datamodule import CosyDataModule
from cosytrain.data.pipeline import DataError
from tests.data.test_pipeline import make_row, write_corpus, write_shard

SMALL = dict(shuffle_size=8, sort_size=4, max_frames_in_batch=250, seed=3)


@pytest.fixture(scope="module")
def lists(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[str]]:
    root = tmp_path_factory.mktemp("dm")
    train, utts = write_corpus(root / "train", sizes=[7, 4, 9])
    val, _ = write_corpus(root / "val", sizes=[3])
    return train, val, utts


def test_batches_follow_the_contract(lists) -> None:
    train, val, utts = lists
    dm = CosyDataModule(train_data=train, val_data=val, **SMALL)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sorted(u for b in batches for u in b["utts"]) == sorted(utts)
    b = batches[0]
    assert set(b) == {"utts", "text", "text_token", "text_token_len", "speech_token", "speech_token_len",
                      "speech_feat", "speech_feat_len", "utt_embedding", "spk_embedding", "embedding"}
    B = len(b["utts"])
    assert b["speech_feat"].dtype == torch.float32 and b["speech_feat"].shape[0] == B and b["speech_feat"].shape[2] == 80
    assert b["embedding"].shape == (B, 192) and b["text_token"].dtype == torch.int64
    assert b["speech_token_len"].dtype == torch.int32 and b["speech_feat_len"].dtype == torch.int32
    val_batches = list(dm.val_dataloader())
    assert len({u for vb in val_batches for u in vb["utts"]}) == 3
    assert [vb["utts"] for vb in dm.val_dataloader()] == [vb["utts"] for vb in val_batches]  # fixed order
    assert dm.skipped == {}


def test_length_curriculum_shortens_early_training_epochs_only(lists) -> None:
    train, val, utts = lists
    dm = CosyDataModule(train_data=train, val_data=val, **SMALL)
    dm.setup("fit")
    frames = dm.train_dataset.index.frames_of
    cap = int(sorted(frames)[len(frames) // 2])
    short = CosyDataModule(train_data=train, val_data=val, curriculum_epochs=1, curriculum_max_frames=cap, **SMALL)
    short.setup("fit")

    def seen(module: CosyDataModule, epoch: int) -> list[str]:
        loader = module.train_dataloader()
        loader.set_epoch(epoch)
        return sorted(u for b in loader for u in b["utts"])

    first = seen(short, 0)
    assert 0 < len(first) < len(utts) and all(u in utts for u in first)
    assert seen(short, 1) == seen(dm, 1) == sorted(utts)  # after the curriculum: every utterance
    # validation always sees every held-out utterance, whatever the epoch
    assert [b["utts"] for b in short.val_dataloader()] == [b["utts"] for b in dm.val_dataloader()]


def test_vocoder_mode_and_spk_embedding(lists) -> None:
    train, _, _ = lists
    dm = CosyDataModule(train_data=train, vocoder=True, truncate_length=256 * 20, use_spk_embedding=True, **SMALL)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["speech"].shape == (len(b["utts"]), 256 * 20)
    assert b["pitch_feat"].shape == b["speech_feat"].shape[:2] == (len(b["utts"]), 20)
    assert torch.equal(b["embedding"], b["spk_embedding"])


def test_state_dict_resume_through_fresh_datamodule(lists) -> None:
    train, _, _ = lists

    def fresh() -> CosyDataModule:
        dm = CosyDataModule(train_data=train, **SMALL)
        dm.set_rank(1, 2)
        dm.setup("fit")
        return dm

    reference = [b["utts"] for b in fresh().train_dataloader()]
    dm = fresh()
    it = iter(dm.train_dataloader())
    head = [next(it)["utts"] for _ in range(2)]
    state = dm.state_dict()
    other = fresh()
    other.load_state_dict(state)
    rest = [b["utts"] for b in other.train_dataloader()]
    assert head + rest == reference


def test_skipped_counter_and_errors(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.parquet", [make_row("a"), make_row("b", speech_token=[5000]), make_row("c", text="")])
    (tmp_path / "data.list").write_text("s.parquet\n")
    dm = CosyDataModule(train_data=str(tmp_path / "data.list"), speech_token_size=4096, **SMALL)
    dm.setup("fit")
    assert dm.skipped == {"speech_token_out_of_range": 1, "empty_text": 1}
    with pytest.raises(DataError, match="missing.list"):
        CosyDataModule(train_data=str(tmp_path / "missing.list"))
    with pytest.raises(DataError, match="no usable utterance"):
        CosyDataModule(train_data=str(tmp_path / "data.list"), speech_token_size=10).setup("fit")
    with pytest.raises(DataError, match="train_data"):
        CosyDataModule().setup("fit")


def test_init_args_parse_from_yaml_like_config(lists) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CosyDataModule, "data")
    cfg = parser.parse_object({"data": {"train_data": lists[0], "sample_rate": 24000, "fmax": None,
                                        "text_tokenizer": "byte", "batch_type": "static", "batch_size": 4}})
    dm = CosyDataModule(**cfg.data.as_dict())
    assert dm.options.feat.sample_rate == 24000 and dm.options.feat.fmax is None and dm.options.batch_size == 4


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, tuple[str, ...]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(batch["utts"])))
        return (self.w - batch["speech_feat"].mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(train: str, root: Path, ckpt_path: str | None = None, every: int | None = None) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{epoch}-{step}"),
                 ModelCheckpoint(dirpath=root / "epoch_end", every_n_epochs=1, save_top_k=-1,
                                 filename="{epoch}-{step}")] if every else []
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks,
                         default_root_dir=root)
    model = _Recorder()
    trainer.fit(model, datamodule=CosyDataModule(train_data=train, **SMALL), ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resume_mid_epoch_continues_the_stream(lists, tmp_path: Path) -> None:
    train, _, _ = lists
    full = _fit(train, tmp_path / "full", every=1)
    n0 = sum(1 for e, _ in full if e == 0)
    assert n0 > 3 and [u for e, u in full if e == 0] != [u for e, u in full if e == 1]
    # mid epoch 0, after the last batch of epoch 0, mid epoch 1, and at the end of epoch 0
    cases = [(step, next((tmp_path / "full").glob(f"*-step={step}.ckpt"))) for step in (3, n0, n0 + 2)]
    cases.append((n0, next((tmp_path / "full" / "epoch_end").glob("epoch=0-*.ckpt"))))
    for step, ckpt in cases:
        resumed = _fit(train, tmp_path / "resumed", ckpt_path=str(ckpt))
        assert full[:step] + resumed == full, str(ckpt)


def test_index_is_cached_so_later_runs_decode_nothing(tmp_path, monkeypatch):
    """The default ``index_cache_dir='auto'``: the first setup indexes every shard once and caches the
    facts under $COSYTRAIN_HOME/index_cache; a later run plans its batches from the cache alone."""
    import cosytrain.data.index_build as B

    monkeypatch.setenv("COSYTRAIN_HOME", str(tmp_path / "home"))
    train, _ = write_corpus(tmp_path / "train", sizes=[5, 6])
    first = CosyDataModule(train_data=train, speech_token_size=None)
    assert first.index_cache_dir == str(tmp_path / "home" / "index_cache")
    first.prepare_data()  # nothing on rank 0 alone any more: every rank indexes its share in setup
    assert not (tmp_path / "home" / "index_cache").exists()
    first.setup("fit")
    assert len(list((tmp_path / "home" / "index_cache").glob("*.facts.npz"))) == 2

    def no_decoding(path, **kw):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(B, "read_shard_facts", no_decoding)
    monkeypatch.setattr(B, "_read_texts", no_decoding)
    later = CosyDataModule(train_data=train, speech_token_size=None)
    later.setup("fit")
    assert len(later.train_dataset.index) == len(first.train_dataset.index) == 11
