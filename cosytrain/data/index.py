"""``ShardIndex``: the usable rows of a shard set as three compact arrays, built from facts, not audio.

For every shard, ``index_build.collect_shards`` delivers its facts (``shard_facts.FACT_DTYPE``) and
text-token lengths, from the cache or freshly computed by this rank's processes or another rank's.
``check_reasons`` and ``planned_frames`` are the vectorised twins of ``pipeline.check_facts`` and
``pipeline.expected_feat_frames`` (tests hold them equal row for row), so a million rows are checked
in a few numpy passes instead of a million Python calls. What stays in memory per usable row is
``shard_of``/``row_of``/``frames_of``: 12 bytes (10 M utterances: 120 MB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from cosytrain.data import index_build
from cosytrain.data.index_build import BuildStats, ShardEntry, collect_shards, shard_keys
from cosytrain.data.pipeline import DataError, FeatureConfig, FilterConfig
from cosytrain.data.shard_facts import AUDIO_ERRORS

log = logging.getLogger(__name__)

# reason codes of check_reasons, in pipeline.check_facts' order of precedence (0 = usable)
REASONS = (None, "undecodable_audio", "empty_audio", "nonfinite_audio", "empty_text", "bad_speech_token",
           "empty_speech_token", "speech_token_out_of_range", "bad_embedding", "too_short", "too_long",
           "too_few_text_tokens", "too_many_text_tokens", "text_audio_ratio", "low_sample_rate",
           "too_short_for_stft")
_CODE = {r: i for i, r in enumerate(REASONS) if r}
INDEX_VERSION = 1  # of the whole-index cache file (and of what the checks decide)


def resampled_lengths(num_samples: np.ndarray, orig: np.ndarray, new: int) -> np.ndarray:
    """``pipeline.resampled_length`` for arrays: torchaudio's ``ceil(new * n / orig)`` in float32."""
    num_samples = num_samples.astype(np.int64)
    orig = orig.astype(np.int64)
    g = np.gcd(np.maximum(orig, 1), int(new))
    o, n = np.maximum(orig, 1) // g, int(new) // g
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.ceil((n * num_samples / o).astype(np.float32)).astype(np.int64)
    return np.where(orig == new, num_samples, out)


def feature_input_lengths(facts: np.ndarray, feat: FeatureConfig) -> np.ndarray:
    n = resampled_lengths(facts["num_samples"], facts["sample_rate"], feat.sample_rate)
    if feat.vocoder:
        n = np.full_like(n, feat.truncate_length)
    if feat.num_frames > 0:
        n = -(-n // feat.num_frames) * feat.num_frames
    return n


def planned_frames(facts: np.ndarray, feat: FeatureConfig) -> np.ndarray:
    """``pipeline.expected_feat_frames`` for every row: the ``speech_feat`` frames batching plans with."""
    n = feature_input_lengths(facts, feat)
    pad = int((feat.n_fft - feat.hop_size) / 2)
    total = n + 2 * pad + (2 * (feat.n_fft // 2) if feat.center else 0)
    frames = 1 + (total - feat.n_fft) // feat.hop_size
    if feat.token_mel_ratio > 0 and not feat.vocoder:
        r = feat.token_mel_ratio
        frames = np.minimum(frames // r, facts["speech_token_len"].astype(np.int64)) * r
    return frames


def check_reasons(facts: np.ndarray, text_len: np.ndarray, fcfg: FilterConfig, feat: FeatureConfig) -> np.ndarray:
    """Reason code per row (``REASONS``; 0 = usable), exactly as ``pipeline.check_facts`` decides."""
    n = facts.shape[0]
    code = np.zeros(n, np.uint8)

    def flag(mask: np.ndarray, reason: str) -> None:
        code[(code == 0) & mask] = _CODE[reason]

    for i, reason in enumerate(AUDIO_ERRORS):
        if reason:
            flag(facts["audio_error"] == i, reason)
    flag(facts["text_blank"], "empty_text")
    tok_len = facts["speech_token_len"]
    flag(tok_len < 0, "bad_speech_token")
    flag(tok_len == 0, "empty_speech_token")
    bad_range = facts["speech_token_min"] < 0
    if fcfg.speech_token_size is not None:
        bad_range |= facts["speech_token_max"] >= fcfg.speech_token_size
    flag(bad_range, "speech_token_out_of_range")
    bad_emb = np.zeros(n, bool)
    for key in ("utt_embedding", "spk_embedding"):
        bad_emb |= (facts[f"{key}_dim"] != fcfg.embedding_dim) | ~facts[f"{key}_finite"]
    flag(bad_emb, "bad_embedding")
    sr = facts["sample_rate"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        num_frames = np.where(sr > 0, facts["num_samples"] / np.where(sr > 0, sr, 1) * 100, 0.0)
        ratio = np.where(num_frames != 0, text_len / np.where(num_frames != 0, num_frames, 1), 0.0)
    flag(num_frames < fcfg.min_length, "too_short")
    flag(num_frames > fcfg.max_length, "too_long")
    flag(text_len < fcfg.token_min_length, "too_few_text_tokens")
    flag(text_len > fcfg.token_max_length, "too_many_text_tokens")
    flag((num_frames != 0) & ~((fcfg.min_output_input_ratio <= ratio) & (ratio <= fcfg.max_output_input_ratio)),
         "text_audio_ratio")
    flag((facts["sample_rate"] != feat.sample_rate) & (facts["sample_rate"] < feat.min_sample_rate),
         "low_sample_rate")
    m = feature_input_lengths(facts, feat)
    half = (feat.n_fft - feat.hop_size) // 2
    flag((m <= half) | (m + 2 * half < feat.n_fft), "too_short_for_stft")
    flag(planned_frames(facts, feat) <= 0, "too_short")
    return code


@dataclass
class ShardIndex:
    """Usable rows of a shard set: parallel arrays (shard, row, planned frames) plus skip counts.

    ``row_group_starts[s]``: first row of each row group of shard ``s``; ``shard_rows[s]``: its rows.
    """

    shards: list[str]
    shard_of: np.ndarray  # int32
    row_of: np.ndarray  # int32
    frames_of: np.ndarray  # int32
    row_group_starts: list[np.ndarray]
    skipped: Counter = field(default_factory=Counter)
    total_rows: int = 0
    shard_rows: Optional[np.ndarray] = None
    stats: Optional[BuildStats] = None

    @classmethod
    def from_entries(cls, shards: Sequence[str], entries: Iterable[tuple[int, ShardEntry]], opts: "object",
                     source: str = "data list", stats: Optional[BuildStats] = None) -> "ShardIndex":
        """Assemble the index from ``(shard number, entry)`` pairs in any order (``opts``: a
        ``StreamOptions``); each entry is reduced to its usable rows as it arrives, so the facts of
        the whole corpus are never in memory at once."""
        feat, filt = opts.feat, opts.filt  # type: ignore[attr-defined]
        reduced: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        starts: list[np.ndarray] = [np.zeros(1, np.int64)] * len(shards)
        shard_rows = np.zeros(len(shards), np.int64)
        skipped: Counter = Counter()
        for s, e in entries:
            if e.error is not None:
                skipped["corrupt_shard"] += 1
                log.warning("skipping shard %s: %s", shards[s], e.error)
                reduced[s] = (np.zeros(0, np.int32), np.zeros(0, np.int32))
                continue
            shard_rows[s] = e.facts.shape[0]
            groups = np.asarray(e.row_groups, np.int64)
            if groups.size:
                starts[s] = np.cumsum(groups) - groups
            code = check_reasons(e.facts, e.text_len.astype(np.int64), filt, feat)
            for c, k in zip(*np.unique(code[code > 0], return_counts=True)):
                skipped[REASONS[int(c)]] += int(k)
            rows = np.flatnonzero(code == 0)
            reduced[s] = (rows.astype(np.int32), planned_frames(e.facts[rows], feat).astype(np.int32))
        missing = [shards[s] for s in range(len(shards)) if s not in reduced]
        if missing:
            raise DataError(f"{source}: the index has no entry for {missing[0]} (and {len(missing) - 1} more)")
        sizes = [reduced[s][0].size for s in range(len(shards))]
        shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), sizes)
        row_of = np.concatenate([reduced[s][0] for s in range(len(shards))]) if shards else np.zeros(0, np.int32)
        frames_of = np.concatenate([reduced[s][1] for s in range(len(shards))]) if shards else np.zeros(0, np.int32)
        total = int(shard_rows.sum())
        index = cls(list(shards), shard_of, row_of, frames_of, starts, skipped, total, shard_rows, stats)
        if len(index) == 0:
            raise DataError(f"{source}: no usable utterance in {len(shards)} shard(s) "
                            f"(skipped: {dict(skipped) or 'none'}); check the shards and the filter options")
        if skipped:
            log.warning("%s: %d of %d rows usable; skipped %s", source, len(index), total, dict(skipped))
        return index

    @classmethod
    def build(cls, shards: Sequence[str], opts: "object", cache_dir: Optional[str] = None,
              source: str = "data list", rank: int = 0, world_size: int = 1, workers: int = 1) -> "ShardIndex":
        """Index ``shards`` (see ``index_build``): rank ``rank`` of ``world_size`` shares the work of the
        first launch through ``cache_dir``; ``workers`` processes index in parallel on this rank.

        The finished index is also cached whole (``<key>.index.npz``, keyed by every shard's key, the
        tokenizer and the options the checks and lengths depend on), so a later launch or a resume
        stats the shards and reads one file.
        """
        t0 = time.perf_counter()
        tok_kind, tok_path = opts.text_tokenizer, opts.text_tokenizer_path  # type: ignore[attr-defined]
        keys = shard_keys(shards)
        whole = None
        if cache_dir is not None:
            tok_id = index_build.tokenizer_identity(tok_kind, tok_path)
            raw = json.dumps([INDEX_VERSION, keys, tok_id, repr(opts.feat), repr(opts.filt)])  # type: ignore
            whole = Path(cache_dir) / f"{hashlib.sha1(raw.encode()).hexdigest()}.index.npz"
            index = cls._load_whole(whole, shards)
            if index is not None:
                index.stats = BuildStats(loaded=len(shards), seconds=time.perf_counter() - t0)
                if index.skipped:
                    log.warning("%s: %d of %d rows usable; skipped %s", source, len(index), index.total_rows,
                                dict(index.skipped))
                return index
        stats = BuildStats()
        entries = collect_shards(shards, tok_kind, tok_path, cache_dir, rank=rank, world_size=world_size,
                                 workers=workers, stats=stats, keys=keys)
        index = cls.from_entries(shards, entries, opts, source, stats)
        log.info("%s: indexed %d shard(s) here, %d from the cache, %d waited for (%.1fs)", source,
                 len(stats.indexed), stats.loaded, stats.waited, stats.seconds)
        if whole is not None:
            index._save_whole(whole)
        return index

    def _save_whole(self, path: Path) -> None:
        from cosytrain.utils.atomic import atomic_open

        starts = [np.asarray(a, np.int64) for a in self.row_group_starts]
        try:
            with atomic_open(path, "wb") as f:
                np.savez(f, shard_of=self.shard_of, row_of=self.row_of, frames_of=self.frames_of,
                         shard_rows=self.rows_per_shard(), starts=np.concatenate(starts),
                         starts_len=np.asarray([a.size for a in starts], np.int64),
                         meta=np.array(json.dumps({"skipped": dict(self.skipped), "total": self.total_rows})))
        except OSError as ex:
            log.warning("cannot cache the index in %s (%s); later launches rebuild it from the shard caches",
                        path.parent, ex)

    @classmethod
    def _load_whole(cls, path: Path, shards: Sequence[str]) -> Optional["ShardIndex"]:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("shard_of", "row_of", "frames_of", "shard_rows", "starts", "starts_len")}
                meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError, EOFError):
            return None
        if arrays["shard_rows"].size != len(shards):
            return None
        starts = np.split(arrays["starts"], np.cumsum(arrays["starts_len"])[:-1])
        return cls(list(shards), arrays["shard_of"], arrays["row_of"], arrays["frames_of"], starts,
                   Counter(meta["skipped"]), int(meta["total"]), arrays["shard_rows"])

    def __len__(self) -> int:
        return int(self.shard_of.shape[0])

    def rows_per_shard(self) -> np.ndarray:
        if self.shard_rows is None:
            self.shard_rows = np.zeros(len(self.shards), np.int64)
            np.maximum.at(self.shard_rows, self.shard_of, self.row_of.astype(np.int64) + 1)
        return self.shard_rows

    def nbytes(self) -> int:
        return int(self.shard_of.nbytes + self.row_of.nbytes + self.frames_of.nbytes
                   + sum(a.nbytes for a in self.row_group_starts))

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for arr in (self.shard_of, self.row_of, self.frames_of):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update("\n".join(self.shards).encode())
        return h.hexdigest()[:16]

