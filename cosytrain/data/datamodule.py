"""``CosyDataModule``: the data side of a recipe, configured from YAML through LightningCLI.

Every option is a plain value with a documented default (v1's ``feat_extractor`` and upstream's
example config), so ``data: {init_args: {...}}`` in a recipe is all it takes. Batches are dicts with
upstream's key names (see ``pipeline.collate``). The data position (epoch, batches consumed) is
part of the Lightning checkpoint, twice on purpose: through ``state_dict`` here and through the
train loader being stateful (Lightning's fit loop), so resuming with ``ckpt_path`` continues the
stream exactly where it stopped. How ranks get equal batch counts: see ``dataset.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl

from cosytrain.data.dataset import (CosyIterableDataset, CosyLoader, ResumableCosyLoader, StreamOptions,
                                    read_data_list)
from cosytrain.data.index import ShardIndex
from cosytrain.data.pipeline import DataError, FeatureConfig, FilterConfig

log = logging.getLogger(__name__)


class CosyDataModule(pl.LightningDataModule):
    """Parquet shards -> padded batches for the llm, flow or (``vocoder=True``) hift.

    Args:
        train_data: ``data.list`` of training shards (one path per line).
        val_data: ``data.list`` of validation shards; none means no validation loader.
        sample_rate: training sample rate (v1 22050, v2/v3 24000); audio is resampled to it.
        n_fft, num_mels, hop_size, win_size, fmin, fmax, center: mel options (``feat_extractor``).
        num_frames: v2/v3 pad the audio to a multiple of this many samples (960) before the mel;
            -1 (v1) does not pad.
        token_mel_ratio: when > 0, trim ``speech_feat``/``speech_token`` so feat = ratio x tokens
            (v2/v3 flow training needs exactly that); 0 leaves both untouched.
        text_tokenizer: ``byte`` (toy runs), ``phone`` / ``phoneme`` (espeak-ng's phonemes of English: the demo),
            ``whisper`` (v1), ``qwen`` (v2) or ``qwen3`` (v3) (``data/text_tokenizer.py``).
        text_tokenizer_path: the whisper vocabulary file or the CosyVoice-BlankEN folder.
        min_length, max_length: keep utterances of this many 10 ms frames (upstream ``filter``).
        token_min_length, token_max_length: keep utterances with this many text tokens.
        min_output_input_ratio, max_output_input_ratio: text tokens per 10 ms frame bounds.
        speech_token_size: speech token ids must be below this (v1 4096, v2/v3 6561); None skips.
        embedding_dim: required length of ``utt_embedding``/``spk_embedding`` (campplus: 192).
        normalize_embedding: L2-normalise embeddings (upstream ``parse_embedding(normalize=True)``).
        shuffle_size, sort_size: buffer sizes of the sample shuffle and the length sort.
        batch_type: ``dynamic`` (by ``max_frames_in_batch`` padded mel frames) or ``static``.
        batch_size: utterances per batch for ``static``.
        max_frames_in_batch: padded mel frames per batch for ``dynamic``.
        use_spk_embedding: ``embedding`` = speaker embedding (SFT) instead of utterance embedding.
        num_workers, pin_memory, prefetch_factor: DataLoader options (a fresh loader per epoch).
        seed: data order seed (shard order, shuffle buffers, vocoder crops), mixed with the epoch.
        vocoder: hift training: random ``truncate_length`` crops, adds ``speech``/``pitch_feat``.
        truncate_length: vocoder crop length in samples (a multiple of ``hop_size``).
        even_batches: ``pad`` (ranks with fewer batches repeat some) or ``drop`` (cut to fewest).
        index_cache_dir: folder for per-shard facts (lengths, checks) and text-token lengths per tokenizer,
            keyed by shard path, size and mtime, so only the first launch indexes (ranks split that work
            through this folder: on several nodes put it on a file system they share); ``auto`` =
            ``$COSYTRAIN_HOME/index_cache`` (else ``~/.cache/cosytrain/index_cache``); None disables it.
        index_workers: processes per rank that index shards on the first launch; None = the CPUs of the
            node divided by its ranks (at most 8). Shards written by ``prepare`` need little of this
            (their facts are columns); shards from upstream's tools are scanned.
        row_cache_mb: decoded rows a rank keeps in memory while streaming (split between its loader
            workers); rows still to be used in the epoch are kept, the one needed last is evicted.
        min_sample_rate: audio below this rate is skipped rather than upsampled (upstream 16000).
        curriculum_epochs, curriculum_max_frames: short utterances first: the first ``curriculum_epochs``
            epochs train only on utterances of at most ``curriculum_max_frames`` mel frames (the unit of
            ``max_frames_in_batch``); 0 = every utterance from the start. Validation is not affected.
    """

    def __init__(
        self,
        train_data: Optional[str] = None,
        val_data: Optional[str] = None,
        sample_rate: int = 22050,
        n_fft: int = 1024,
        num_mels: int = 80,
        hop_size: int = 256,
        win_size: int = 1024,
        fmin: float = 0.0,
        fmax: Optional[float] = 8000.0,
        center: bool = False,
        num_frames: int = -1,
        token_mel_ratio: int = 0,
        text_tokenizer: str = "byte",
        text_tokenizer_path: Optional[str] = None,
        min_length: float = 0.0,
        max_length: float = 40960.0,
        token_min_length: int = 1,
        token_max_length: int = 200,
        min_output_input_ratio: float = 0.0005,
        max_output_input_ratio: float = 1.0,
        speech_token_size: Optional[int] = 4096,
        embedding_dim: int = 192,
        normalize_embedding: bool = True,
        shuffle_size: int = 1000,
        sort_size: int = 500,
        batch_type: str = "dynamic",
        batch_size: int = 16,
        max_frames_in_batch: int = 2000,
        use_spk_embedding: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: Optional[int] = None,
        seed: int = 1986,
        vocoder: bool = False,
        truncate_length: int = 24576,
        even_batches: str = "pad",
        index_cache_dir: Optional[str] = "auto",
        min_sample_rate: int = 16000,
        index_workers: Optional[int] = None,
        row_cache_mb: int = 256,
        curriculum_epochs: int = 0,
        curriculum_max_frames: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, path in (("train_data", train_data), ("val_data", val_data)):
            if path is not None and not Path(path).is_file():
                raise DataError(f"{name}: data list {path} not found; run `python -m cosytrain prepare` to make it")
        self.train_data, self.val_data = train_data, val_data
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        if index_cache_dir == "auto":
            from cosytrain.utils.paths import cache_home

            index_cache_dir = str(cache_home() / "index_cache")
        self.index_cache_dir = index_cache_dir
        if index_workers is not None and index_workers < 1:
            raise DataError(f"index_workers must be >= 1 (or None for automatic), got {index_workers}")
        if row_cache_mb < 1:
            raise DataError(f"row_cache_mb must be >= 1, got {row_cache_mb}")
        self.index_workers, self.row_cache_mb = index_workers, int(row_cache_mb)
        feat = FeatureConfig(sample_rate=sample_rate, n_fft=n_fft, num_mels=num_mels, hop_size=hop_size,
                             win_size=win_size, fmin=fmin, fmax=fmax, center=center, min_sample_rate=min_sample_rate,
                             num_frames=num_frames, token_mel_ratio=token_mel_ratio, vocoder=vocoder,
                             truncate_length=truncate_length, normalize_embedding=normalize_embedding)
        filt = FilterConfig(min_length=min_length, max_length=max_length, token_min_length=token_min_length,
                            token_max_length=token_max_length, min_output_input_ratio=min_output_input_ratio,
                            max_output_input_ratio=max_output_input_ratio, speech_token_size=speech_token_size,
                            embedding_dim=embedding_dim)
        self.options = StreamOptions(feat=feat, filt=filt, text_tokenizer=text_tokenizer,
                                     text_tokenizer_path=text_tokenizer_path, shuffle=True, shuffle_size=shuffle_size,
                                     sort_size=sort_size, batch_type=batch_type, batch_size=batch_size,
                                     max_frames_in_batch=max_frames_in_batch, use_spk_embedding=use_spk_embedding,
                                     seed=seed, even_batches=even_batches, curriculum_epochs=curriculum_epochs,
                                     curriculum_max_frames=curriculum_max_frames)
        self.train_dataset: Optional[CosyIterableDataset] = None
        self.val_dataset: Optional[CosyIterableDataset] = None
        self._train_loader: Optional[ResumableCosyLoader] = None
        self._pending_state: Optional[dict[str, Any]] = None
        self._rank: Optional[tuple[int, int]] = None

    # ------------------------------------------------------------------ setup
    def set_rank(self, rank: int, world_size: int) -> None:
        """Pin the rank/world size (tests, custom launchers); else the trainer's or torch.distributed's."""
        self._rank = (int(rank), int(world_size))
        for ds in (self.train_dataset, self.val_dataset):
            if ds is not None:
                ds.set_rank(*self._rank)

    def _lists(self) -> list[tuple[str, str]]:
        return [(name, path) for name, path in (("train", self.train_data), ("val", self.val_data)) if path]

    def prepare_data(self) -> None:
        """Nothing: indexing happens in ``setup`` on every rank, each taking its share of the shards,
        so no rank waits at Lightning's barrier (which times out) while rank 0 indexes a big corpus."""

    def _rank_and_world(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _index_workers(self) -> int:
        if self.index_workers is not None:
            return int(self.index_workers)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (
            int(self.trainer.num_devices) if self.trainer is not None else 1)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(8, cpus // max(1, local)))

    def _dataset(self, path: str, shuffle: bool) -> CosyIterableDataset:
        # validation: the same rows in the same order every time, all of them (no curriculum)
        opts = self.options if shuffle else dataclasses.replace(self.options, shuffle=False, curriculum_epochs=0)
        rank, world = self._rank_and_world()
        shards = read_data_list(path)
        index = ShardIndex.build(shards, opts, self.index_cache_dir, source=path, rank=rank, world_size=world,
                                 workers=self._index_workers())
        ds = CosyIterableDataset(shards, opts, source=path, index=index, row_cache_bytes=self.row_cache_mb << 20)
        if self._rank is not None or self.trainer is not None:
            ds.set_rank(rank, world)
        return ds

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            if not self.train_data:
                raise DataError("CosyDataModule: train_data is not set; give the path of a data.list")
            self.train_dataset = self._dataset(self.train_data, shuffle=True)
        if stage in (None, "fit", "validate") and self.val_data and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_data, shuffle=False)

    # ------------------------------------------------------------ dataloaders
    def _trainer_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def train_dataloader(self) -> ResumableCosyLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        # Lightning's training fetcher pulls one batch ahead of the one being trained on; a plain
        # loop (no trainer) does not, so the consumed count needs no correction there.
        attached = self.trainer is not None
        loader = ResumableCosyLoader(self.train_dataset, self.num_workers, self.pin_memory, self.prefetch_factor,
                                     epoch_fn=self._trainer_epoch if attached else None, name="train",
                                     lookahead=1 if attached else 0)
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> CosyLoader | list:
        if self.val_data and self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        return CosyLoader(self.val_dataset, self.num_workers, self.pin_memory, self.prefetch_factor,
                          epoch_fn=lambda: 0, name="val")

    # ------------------------------------------------------------- position
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train": self._train_loader.state_dict()}
        return {"train": dict(self._pending_state)} if self._pending_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train") if state_dict else None
        if self._train_loader is not None and state:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_state = dict(state) if state else None

    @property
    def skipped(self) -> dict[str, int]:
        """Rows skipped by reason: whole data set at planning, plus this rank's last train epoch."""
        if self._train_loader is not None:
            return dict(self._train_loader.skipped_report())
        if self.train_dataset is not None:
            return dict(self.train_dataset.index.skipped)
        return dict(Counter())


class DemoDataModule(CosyDataModule):
    """``CosyDataModule`` over the embedded demo corpus, synthesised and prepared on first use.

    A fresh machine needs no download and no extra step: the first run builds the corpus into the
    cache (``$COSYTRAIN_HOME/demo`` or ``~/.cache/cosytrain/demo``, about a minute on 2 cores; a file
    lock serialises DDP ranks), later runs reuse it. The last ``val_shards`` shards are held out for
    validation (the demo's last shard is 48 utterances, every voice present).

    Args:
        token_rate: 50 (v1) or 25 (v2/v3) speech tokens per second.
        root: the cache folder; default as above.
        val_shards: shards held out for validation (0: no validation loader).
        num_utts: a reduced corpus of the first N planned utterances (quick tests); None = all.
        **kwargs: any ``CosyDataModule`` option (mel parameters, batching, tokenizer, ...).
    """

    def __init__(self, token_rate: int = 50, root: Optional[str] = None, val_shards: int = 1,
                 num_utts: Optional[int] = None, **kwargs: Any) -> None:
        from cosytrain.data.demo_corpus import ensure_demo_corpus, split_data_list

        data_list = ensure_demo_corpus(root, token_rate=token_rate, num_utts=num_utts)
        train, val = split_data_list(data_list, val_shards)
        super().__init__(train_data=str(train), val_data=str(val) if val else None, **kwargs)
