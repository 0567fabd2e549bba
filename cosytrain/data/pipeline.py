"""Processor stages with upstream's behaviour (``cosyvoice/dataset/processor.py``), composable.

Every stage is a generator ``stage(samples, **options) -> samples`` so a pipeline is a list of
``functools.partial`` objects applied in order (``compose``), as upstream's ``data_pipeline``. The
sample dicts carry upstream's keys (``utt``, ``text``, ``text_token``, ``speech``, ``sample_rate``,
``speech_token``, ``speech_feat``, ``pitch_feat``, ``utt_embedding``, ``spk_embedding``) and
``padding`` turns a list of samples into a batch with upstream's key names.

Bad input never raises out of a stage: the sample is dropped and counted in ``skipped`` (a
``collections.Counter`` reason -> count) so the training loop can log it. The per-row checks are
written once, on a small "facts" dict (``row_facts`` / ``check_facts``), so that the dataset's
planning pass (which must know every utterance's length before any batch is built, see
``dataset.py``) and the streaming ``filter`` stage reject exactly the same rows.

Deviations from upstream, each marked ``# upstream:`` where it happens:
* audio is decoded with soundfile (torchaudio 2.9 cannot load) and resampled with
  ``torchaudio.functional.resample`` (same kernel as ``transforms.Resample``);
* ``dynamic_batch`` never yields an empty batch (upstream does when the first sample alone is over
  the frame budget, and its ``padding`` then crashes);
* ``padding`` orders a batch by ``speech_feat`` length; upstream's v1-era code sorted by
  ``speech_feat.size(1)`` (= 80 mel bins for everyone), i.e. not at all;
* ``truncate`` and ``shuffle`` draw from a ``random.Random`` passed in, not the global ``random``,
  so a resumed run replays the same choices;
* ``pitch_feat`` is float32 (upstream float64);
* ``compute_fbank`` can trim ``speech_feat``/``speech_token`` to ``token_mel_ratio`` alignment as an
  earlier upstream revision did (``token_mel_ratio=0`` turns it off, the current upstream default).

Why one module over 450 lines: it is upstream's ``processor.py``, stage for stage, with the shared
per-row checks the stages and the dataset's planning pass must agree on; kept whole so it can be
read against upstream's file and so the checks cannot drift from the stages that apply them.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from cosytrain.errors import ConfigurationError

log = logging.getLogger(__name__)

Sample = dict[str, Any]
Stage = Callable[..., Iterator[Any]]


class DataError(ConfigurationError):
    """A data list, shard set or data option that cannot be used; the message names the path and fix.

    A ``ConfigurationError``: the command-line front ends print it as one line (exit code 2).
    """


class SkipSample(Exception):
    """Raised inside a stage for one bad sample; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _count(skipped: Optional[Counter], reason: str, sample: Optional[Sample] = None, detail: str = "") -> None:
    if skipped is not None:
        skipped[reason] += 1
    log.debug("skip %s (%s) %s", sample.get("utt") if sample else "?", reason, detail)


# ------------------------------------------------------------------------------- feature functions


def feature_functions() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(mel_spectrogram, compute_f0) from ``cosytrain.data.features``: the one import point."""
    from cosytrain.data.features import compute_f0, mel_spectrogram

    return mel_spectrogram, compute_f0


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class FeatureConfig:
    """What turns a decoded row into training features; defaults are v1's ``feat_extractor``."""

    sample_rate: int = 22050
    n_fft: int = 1024
    num_mels: int = 80
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: Optional[float] = 8000.0
    center: bool = False
    min_sample_rate: int = 16000
    num_frames: int = -1  # v2/v3 compute_fbank: pad speech up to a multiple of this many samples
    token_mel_ratio: int = 0  # >0: trim feat/token to feat == ratio * tokens (not in vocoder mode)
    vocoder: bool = False  # adds speech + pitch_feat, truncates to truncate_length
    truncate_length: int = 24576
    normalize_embedding: bool = True

    def mel(self, speech: torch.Tensor) -> torch.Tensor:
        mel_fn, _ = feature_functions()
        return mel_fn(speech, n_fft=self.n_fft, num_mels=self.num_mels, sampling_rate=self.sample_rate,
                      hop_size=self.hop_size, win_size=self.win_size, fmin=self.fmin, fmax=self.fmax,
                      center=self.center)


@dataclass(frozen=True)
class FilterConfig:
    """Upstream ``filter`` options (lengths in 10 ms frames of the source audio) plus input checks."""

    min_length: float = 0.0
    max_length: float = 40960.0
    token_min_length: int = 1
    token_max_length: int = 200
    min_output_input_ratio: float = 0.0005
    max_output_input_ratio: float = 1.0
    speech_token_size: Optional[int] = None  # ids must lie in [0, speech_token_size)
    embedding_dim: int = 192


# ----------------------------------------------------------------------------------- row checking


def decode_wav(audio_data: Any) -> tuple[torch.Tensor, int]:
    """Whole-file bytes -> (1, N) float32 mono in [-1, 1] and its sample rate. Raises SkipSample."""
    import soundfile as sf

    if not isinstance(audio_data, (bytes, bytearray, memoryview)) or len(audio_data) == 0:
        raise SkipSample("undecodable_audio", "no audio bytes")
    try:
        wav, sr = sf.read(io.BytesIO(bytes(audio_data)), dtype="float32", always_2d=True)
    except Exception as ex:  # noqa: BLE001 - any decoder error means this row is unusable
        raise SkipSample("undecodable_audio", str(ex).splitlines()[0] if str(ex) else type(ex).__name__)
    if wav.shape[0] == 0:
        raise SkipSample("empty_audio")
    if not np.isfinite(wav).all():
        raise SkipSample("nonfinite_audio")
    # upstream: torchaudio.load + mean over channels
    return torch.from_numpy(np.ascontiguousarray(wav.mean(axis=1, dtype=np.float32))).unsqueeze(0), int(sr)


def _embedding_facts(value: Any) -> tuple[int, bool]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return -1, False
    if arr.ndim != 1:
        return -1, False
    return int(arr.shape[0]), bool(np.isfinite(arr).all())


def row_facts(sample: Sample) -> dict[str, Any]:
    """What the checks need to know about one row, as plain JSON-able values.

    ``sample`` holds either the decoded ``speech``/``sample_rate`` or the raw ``audio_data`` bytes
    (then it is decoded here, once). Nothing here depends on options, so facts can be cached.
    """
    facts: dict[str, Any] = {"utt": str(sample.get("utt", "")), "audio_error": None}
    try:
        if "speech" in sample and "sample_rate" in sample:
            speech, sr = sample["speech"], int(sample["sample_rate"])
        else:
            speech, sr = decode_wav(sample.get("audio_data"))
        facts["num_samples"], facts["sample_rate"] = int(speech.shape[-1]), sr
    except SkipSample as ex:
        facts["audio_error"], facts["num_samples"], facts["sample_rate"] = ex.reason, 0, 0
    text = sample.get("text")
    facts["text"] = text if isinstance(text, str) else ""
    tokens = sample.get("speech_token")
    try:
        arr = np.asarray(tokens if tokens is not None else [], dtype=np.int64).reshape(-1)
        facts["speech_token_len"] = int(arr.size)
        facts["speech_token_min"] = int(arr.min()) if arr.size else 0
        facts["speech_token_max"] = int(arr.max()) if arr.size else 0
    except (TypeError, ValueError, OverflowError):
        facts["speech_token_len"], facts["speech_token_min"], facts["speech_token_max"] = -1, 0, 0
    for key in ("utt_embedding", "spk_embedding"):
        facts[f"{key}_dim"], facts[f"{key}_finite"] = _embedding_facts(sample.get(key))
    return facts


def source_frames_10ms(facts: dict[str, Any]) -> float:
    """Upstream's filter length unit: 10 ms frames of the audio as stored."""
    return facts["num_samples"] / facts["sample_rate"] * 100 if facts["sample_rate"] else 0.0


def check_facts(facts: dict[str, Any], text_len: int, fcfg: FilterConfig, feat: FeatureConfig) -> Optional[str]:
    """None when the row is usable, else the reason it is skipped (the counter key)."""
    if facts["audio_error"]:
        return facts["audio_error"]
    if not facts["text"].strip():
        return "empty_text"
    n_tok = facts["speech_token_len"]
    if n_tok < 0:
        return "bad_speech_token"
    if n_tok == 0:
        return "empty_speech_token"
    if facts["speech_token_min"] < 0 or (fcfg.speech_token_size is not None
                                         and facts["speech_token_max"] >= fcfg.speech_token_size):
        return "speech_token_out_of_range"
    for key in ("utt_embedding", "spk_embedding"):
        if facts[f"{key}_dim"] != fcfg.embedding_dim or not facts[f"{key}_finite"]:
            return "bad_embedding"
    # upstream filter(): lengths in 10 ms frames of the source audio, token counts, their ratio
    num_frames = source_frames_10ms(facts)
    if num_frames < fcfg.min_length:
        return "too_short"
    if num_frames > fcfg.max_length:
        return "too_long"
    if text_len < fcfg.token_min_length:
        return "too_few_text_tokens"
    if text_len > fcfg.token_max_length:
        return "too_many_text_tokens"
    if num_frames != 0 and not (fcfg.min_output_input_ratio <= text_len / num_frames
                                <= fcfg.max_output_input_ratio):
        return "text_audio_ratio"
    # upstream resample(): rows below min_sample_rate are dropped rather than upsampled
    if facts["sample_rate"] != feat.sample_rate and facts["sample_rate"] < feat.min_sample_rate:
        return "low_sample_rate"
    n = feature_input_length(facts, feat)
    if n <= (feat.n_fft - feat.hop_size) // 2 or n + 2 * ((feat.n_fft - feat.hop_size) // 2) < feat.n_fft:
        return "too_short_for_stft"
    if expected_feat_frames(facts, feat) <= 0:
        return "too_short"
    return None


def resampled_length(num_samples: int, orig: int, new: int) -> int:
    """Output length of ``torchaudio.functional.resample`` (its own formula, float32 included)."""
    if orig == new:
        return num_samples
    g = math.gcd(int(orig), int(new))
    o, n = int(orig) // g, int(new) // g
    return int(torch.ceil(torch.as_tensor(n * num_samples / o)).long())


def feature_input_length(facts: dict[str, Any], feat: FeatureConfig) -> int:
    """Samples that reach the mel extractor: resampled, truncated/padded, padded to ``num_frames``."""
    n = resampled_length(facts["num_samples"], facts["sample_rate"], feat.sample_rate)
    if feat.vocoder:
        n = feat.truncate_length
    if feat.num_frames > 0:
        n = int(math.ceil(n / feat.num_frames)) * feat.num_frames
    return n


def expected_feat_frames(facts: dict[str, Any], feat: FeatureConfig) -> int:
    """``speech_feat`` frames this row will have, known before decoding (the planner's length)."""
    n = feature_input_length(facts, feat)
    pad = int((feat.n_fft - feat.hop_size) / 2)  # matcha's reflect pad
    total = n + 2 * pad + (2 * (feat.n_fft // 2) if feat.center else 0)
    frames = 1 + (total - feat.n_fft) // feat.hop_size
    if feat.token_mel_ratio > 0 and not feat.vocoder:
        frames = min(frames // feat.token_mel_ratio, facts["speech_token_len"]) * feat.token_mel_ratio
    return int(frames)


# ------------------------------------------------------------------------------------------ stages


def compose(source: Iterable[Any], stages: Sequence[Stage]) -> Iterator[Any]:
    """Apply ``stages`` in order, as upstream's chained ``Processor``s."""
    data: Iterable[Any] = source
    for stage in stages:
        data = stage(data)
    return iter(data)


def parquet_opener(paths: Iterable[str], skipped: Optional[Counter] = None) -> Iterator[Sample]:
    """Rows of each shard as dicts; a shard that cannot be read is skipped and counted."""
    from cosytrain.data.shards import ReadStats, read_shard_rows

    for path in paths:
        stats = ReadStats()
        yield from read_shard_rows(path, stats=stats)
        if stats.bad and skipped is not None:
            skipped["corrupt_shard"] += len(stats.bad)


def tokenize(data: Iterable[Sample], tokenizer: Any) -> Iterator[Sample]:
    """``text`` -> ``text_token`` (and ``instruct`` -> ``instruct_token``, as upstream for v3).

    As upstream, a row with an ``instruct`` value gets ``instruct_token`` even when it is empty
    (then no tokens); ``collate`` pads rows without one to length 0.
    """
    for sample in data:
        text = sample.get("text")
        sample["text_token"] = tokenizer.encode(text) if isinstance(text, str) else []
        if isinstance(sample.get("instruct"), str):
            sample["instruct_token"] = tokenizer.encode(sample["instruct"]) if sample["instruct"] else []
        yield sample


def decode_audio(data: Iterable[Sample], skipped: Optional[Counter] = None) -> Iterator[Sample]:
    """``audio_data`` bytes -> ``speech`` (1, N) float32 + ``sample_rate`` (upstream does this in filter)."""
    for sample in data:
        try:
            sample["speech"], sample["sample_rate"] = decode_wav(sample.get("audio_data"))
        except SkipSample as ex:
            _count(skipped, ex.reason, sample)
            continue
        sample.pop("audio_data", None)
        yield sample


def filter(data: Iterable[Sample], fcfg: FilterConfig = FilterConfig(), feat: FeatureConfig = FeatureConfig(),
           skipped: Optional[Counter] = None) -> Iterator[Sample]:  # noqa: A001 - upstream's name
    """Drop rows failing upstream's length filters or the input checks (see ``check_facts``), and
    preference rows whose rejected tokens are empty (upstream) or out of range."""
    for sample in data:
        reason = check_facts(row_facts(sample), len(sample.get("text_token") or []), fcfg, feat)
        if reason is None and REJECT_COLUMN in sample:
            reason = _check_reject(sample[REJECT_COLUMN], fcfg)
        if reason is not None:
            _count(skipped, reason, sample)
            continue
        yield sample


REJECT_COLUMN = "reject_speech_token"  # DPO shards: upstream's column of the rejected speech tokens


def _check_reject(tokens: Any, fcfg: FilterConfig) -> Optional[str]:
    try:
        arr = np.asarray(tokens if tokens is not None else [], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        return "bad_reject_speech_token"
    if arr.size == 0:
        return "empty_reject_speech_token"
    if arr.min() < 0 or (fcfg.speech_token_size is not None and arr.max() >= fcfg.speech_token_size):
        return "reject_speech_token_out_of_range"
    return None


def resample(data: Iterable[Sample], resample_rate: int = 22050, min_sample_rate: int = 16000,
             skipped: Optional[Counter] = None) -> Iterator[Sample]:
    """Resample to ``resample_rate``; peak-normalise only when the peak exceeds 1 (upstream)."""
    import torchaudio.functional as AF

    for sample in data:
        sr = int(sample["sample_rate"])
        if sr != resample_rate:
            if sr < min_sample_rate:
                _count(skipped, "low_sample_rate", sample)
                continue
            sample["speech"] = AF.resample(sample["speech"], orig_freq=sr, new_freq=resample_rate)
            sample["sample_rate"] = resample_rate
        peak = sample["speech"].abs().max()
        if peak > 1:
            sample["speech"] = sample["speech"] / peak
        yield sample


def truncate(data: Iterable[Sample], truncate_length: int = 24576,
             rng: Optional[Callable[[Sample], random.Random]] = None) -> Iterator[Sample]:
    """Vocoder training: a random ``truncate_length`` window, or zero-pad up to it (upstream)."""
    for sample in data:
        wav = sample["speech"]
        if wav.shape[1] > truncate_length:
            r = rng(sample) if rng is not None else random.Random()
            start = r.randint(0, wav.shape[1] - truncate_length)
            wav = wav[:, start:start + truncate_length]
        else:
            wav = torch.cat([wav, torch.zeros(1, truncate_length - wav.shape[1], dtype=wav.dtype)], dim=1)
        sample["speech"] = wav
        yield sample


def compute_fbank(data: Iterable[Sample], feat: FeatureConfig = FeatureConfig(),
                  skipped: Optional[Counter] = None) -> Iterator[Sample]:
    """``speech_feat`` (T', num_mels): the mel transposed to time-major, as upstream."""
    for sample in data:
        try:
            speech = sample["speech"]
            if feat.num_frames > 0:  # upstream v2/v3: align speech to whole speech-token blocks
                blocks = int(math.ceil(speech.shape[1] / feat.num_frames))
                speech = torch.cat([speech, torch.zeros(1, blocks * feat.num_frames - speech.shape[1],
                                                        dtype=speech.dtype)], dim=1)
                sample["speech"] = speech
            mel = feat.mel(speech).squeeze(0).transpose(0, 1).contiguous()
            if feat.token_mel_ratio > 0 and not feat.vocoder:
                ratio = feat.token_mel_ratio
                n_tok = min(mel.shape[0] // ratio, len(sample["speech_token"]))
                mel = mel[:ratio * n_tok]
                sample["speech_token"] = list(sample["speech_token"])[:n_tok]
            if mel.shape[0] == 0 or not torch.isfinite(mel).all():
                raise SkipSample("feature_error", "empty or non-finite mel")
        except SkipSample as ex:
            _count(skipped, ex.reason, sample)
            continue
        except Exception as ex:  # noqa: BLE001 - a feature failure drops this sample, not the run
            _count(skipped, "feature_error", sample, str(ex))
            continue
        sample["speech_feat"] = mel
        yield sample


def compute_f0(data: Iterable[Sample], sample_rate: int = 22050, hop_size: int = 256,
               f0_fn: Optional[Callable[..., torch.Tensor]] = None,
               skipped: Optional[Counter] = None) -> Iterator[Sample]:
    """``pitch_feat`` (T',): F0 per mel frame for the vocoder's F0 loss."""
    if f0_fn is None:
        _, f0_fn = feature_functions()
    for sample in data:
        try:
            pitch = f0_fn(sample["speech"], sample_rate, hop_size, sample["speech_feat"].shape[0])
            pitch = torch.as_tensor(pitch, dtype=torch.float32).reshape(-1)
            if pitch.shape[0] != sample["speech_feat"].shape[0] or not torch.isfinite(pitch).all():
                raise ValueError("pitch length or values are wrong")
        except Exception as ex:  # noqa: BLE001
            _count(skipped, "feature_error", sample, str(ex))
            continue
        sample["pitch_feat"] = pitch
        yield sample


def parse_embedding(data: Iterable[Sample], normalize: bool = True) -> Iterator[Sample]:
    """utt/spk embeddings -> float32 tensors, L2-normalised when ``normalize`` (upstream: True)."""
    for sample in data:
        for key in ("utt_embedding", "spk_embedding"):
            emb = torch.as_tensor(np.asarray(sample[key], dtype=np.float32))
            sample[key] = F.normalize(emb, dim=0) if normalize else emb
        yield sample


def shuffle(data: Iterable[Any], shuffle_size: int = 10000, rng: Optional[random.Random] = None) -> Iterator[Any]:
    """Fill a buffer of ``shuffle_size``, shuffle it, emit it whole; then the remainder (upstream)."""
    rng = rng if rng is not None else random.Random()
    buf: list[Any] = []
    for sample in data:
        buf.append(sample)
        if len(buf) >= shuffle_size:
            rng.shuffle(buf)
            yield from buf
            buf = []
    rng.shuffle(buf)
    yield from buf


def feat_length(sample: Sample) -> int:
    return int(sample["speech_feat"].size(0))


def sort(data: Iterable[Any], sort_size: int = 500, key: Callable[[Any], int] = feat_length) -> Iterator[Any]:
    """Sort each window of ``sort_size`` by length so batches hold similar lengths (upstream)."""
    buf: list[Any] = []
    for sample in data:
        buf.append(sample)
        if len(buf) >= sort_size:
            buf.sort(key=key)
            yield from buf
            buf = []
    buf.sort(key=key)
    yield from buf


def static_batch(data: Iterable[Any], batch_size: int = 16) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for sample in data:
        buf.append(sample)
        if len(buf) >= batch_size:
            yield buf
            buf = []
    if buf:
        yield buf


def dynamic_batch(data: Iterable[Any], max_frames_in_batch: int = 12000,
                  key: Callable[[Any], int] = feat_length) -> Iterator[list[Any]]:
    """Grow a batch while (longest length) x (count) stays within ``max_frames_in_batch``."""
    buf: list[Any] = []
    longest = 0
    for sample in data:
        frames = key(sample)
        longest_after = max(longest, frames)
        if buf and longest_after * (len(buf) + 1) > max_frames_in_batch:
            # upstream: also yields here when buf is empty, i.e. an empty batch; never do that
            yield buf
            buf, longest = [sample], frames
        else:
            buf.append(sample)
            longest = longest_after
    if buf:
        yield buf


def batch(data: Iterable[Any], batch_type: str = "dynamic", batch_size: int = 16, max_frames_in_batch: int = 12000,
          key: Callable[[Any], int] = feat_length) -> Iterator[list[Any]]:
    if batch_type == "static":
        return static_batch(data, batch_size)
    if batch_type == "dynamic":
        return dynamic_batch(data, max_frames_in_batch, key)
    raise DataError(f"batch_type must be 'static' or 'dynamic', got {batch_type!r}")


def _pad_1d(seqs: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([s.shape[0] for s in seqs], dtype=torch.int32)
    return pad_sequence([s.to(dtype) for s in seqs], batch_first=True, padding_value=0), lens


def collate(samples: Sequence[Sample], use_spk_embedding: bool = False, gan: bool = False) -> dict[str, Any]:
    """One list of processed samples -> one batch with upstream's key names and dtypes."""
    order = sorted(range(len(samples)), key=lambda i: -samples[i]["speech_feat"].shape[0])  # stable
    s = [samples[i] for i in order]
    out: dict[str, Any] = {"utts": [x["utt"] for x in s], "text": [x["text"] for x in s]}
    tok = lambda v: torch.as_tensor(np.asarray(v, dtype=np.int64)).reshape(-1)  # noqa: E731
    out["text_token"], out["text_token_len"] = _pad_1d([tok(x["text_token"]) for x in s], torch.int64)
    out["speech_token"], out["speech_token_len"] = _pad_1d([tok(x["speech_token"]) for x in s], torch.int64)
    out["speech_feat"], out["speech_feat_len"] = _pad_1d([x["speech_feat"] for x in s], torch.float32)
    out["utt_embedding"] = torch.stack([x["utt_embedding"] for x in s]).float()
    out["spk_embedding"] = torch.stack([x["spk_embedding"] for x in s]).float()
    if any("instruct_token" in x for x in s):
        # upstream emits instruct keys only when EVERY row has them, so one plain row dropped the
        # instructions of the whole batch; rows without one get length 0 instead, which upstream's
        # CosyVoice3LM (and ours) reads as "no instruction" for that row alone
        out["instruct_token"], out["instruct_token_len"] = _pad_1d([tok(x.get("instruct_token", [])) for x in s],
                                                                   torch.int64)
    if all(REJECT_COLUMN in x for x in s):  # upstream padding(dpo=True)
        out[REJECT_COLUMN], out[REJECT_COLUMN + "_len"] = _pad_1d([tok(x[REJECT_COLUMN]) for x in s], torch.int64)
    if gan:
        out["speech"], out["speech_len"] = _pad_1d([x["speech"].reshape(-1) for x in s], torch.float32)
        out["pitch_feat"], out["pitch_feat_len"] = _pad_1d([x["pitch_feat"] for x in s], torch.float32)
    out["embedding"] = out["spk_embedding"] if use_spk_embedding else out["utt_embedding"]
    return out


def padding(data: Iterable[list[Sample]], use_spk_embedding: bool = False, gan: bool = False) -> Iterator[dict[str, Any]]:
    """Batches of samples -> padded batch dicts (upstream ``padding``); empty batches are dropped."""
    for samples in data:
        if samples:
            yield collate(samples, use_spk_embedding=use_spk_embedding, gan=gan)


def sample_stages(tokenizer: Any, fcfg: FilterConfig, feat: FeatureConfig, skipped: Optional[Counter] = None,
                  truncate_rng: Optional[Callable[[Sample], random.Random]] = None,
                  f0_fn: Optional[Callable[..., torch.Tensor]] = None) -> list[Stage]:
    """The per-utterance part of upstream's data_pipeline (or data_pipeline_gan when vocoder)."""
    from functools import partial

    stages: list[Stage] = [
        partial(tokenize, tokenizer=tokenizer),
        partial(decode_audio, skipped=skipped),
        partial(filter, fcfg=fcfg, feat=feat, skipped=skipped),
        partial(resample, resample_rate=feat.sample_rate, min_sample_rate=feat.min_sample_rate, skipped=skipped),
    ]
    if feat.vocoder:
        stages.append(partial(truncate, truncate_length=feat.truncate_length, rng=truncate_rng))
    stages.append(partial(compute_fbank, feat=feat, skipped=skipped))
    if feat.vocoder:
        stages.append(partial(compute_f0, sample_rate=feat.sample_rate, hop_size=feat.hop_size, f0_fn=f0_fn,
                              skipped=skipped))
    stages.append(partial(parse_embedding, normalize=feat.normalize_embedding))
    return stages
