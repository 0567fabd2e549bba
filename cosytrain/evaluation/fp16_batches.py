"""The utterances the FP16-vs-FP32 check (:mod:`cosytrain.evaluation.fp16_check`) runs on.

Padded batches with upstream keys: the first utterances of given batches (:func:`take_utterances`), a
seeded synthetic batch when no data is given (:func:`synthetic_batch`), and, for the command line, a
model directory's mel options and the first utterances of a ``data.list`` through cosytrain's own
data pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from cosytrain.modeldir import METADATA_FILE

__all__ = ["DEFAULT_SEED", "batch_size", "take_utterances", "synthetic_batch"]

DEFAULT_SEED = 1234


# --------------------------------------------------------------------------------------------------
# Utterances
# --------------------------------------------------------------------------------------------------


def batch_size(batch: Mapping[str, Any]) -> int:
    """Utterances in a padded batch (the first dimension of its token/feature tensors)."""
    for key in ("speech_token", "text_token", "speech_feat", "embedding"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError(f"batch has none of speech_token/text_token/speech_feat/embedding (keys: {sorted(batch)})")


def _slice_batch(batch: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The first ``k`` utterances of a padded batch (every per-utterance tensor/list cut along dim 0)."""
    size = batch_size(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[:k].detach().cpu().clone()
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[key] = list(value[:k])
        else:
            out[key] = value
    return out


def take_utterances(batches: Mapping[str, Any] | Sequence[Mapping[str, Any]], num_utterances: int) -> list[dict]:
    """The first ``num_utterances`` utterances of one batch or a sequence of batches, as CPU batches."""
    if isinstance(batches, Mapping):
        batches = [batches]
    if num_utterances < 1:
        raise ValueError(f"num_utterances must be at least 1, got {num_utterances}")
    taken: list[dict] = []
    left = num_utterances
    for batch in batches:
        if left <= 0:
            break
        if not isinstance(batch, Mapping):
            raise TypeError(f"a batch must be a dict with upstream keys, got {type(batch).__name__}")
        k = min(left, batch_size(batch))
        taken.append(_slice_batch(batch, k))
        left -= k
    if not taken:
        raise ValueError("no utterances to check: the batches are empty")
    return taken


def _rows(batches: Sequence[Mapping[str, Any]]) -> Iterator[tuple[Mapping[str, Any], int]]:
    for batch in batches:
        for i in range(batch_size(batch)):
            yield batch, i


def _length(batch: Mapping[str, Any], key: str, i: int) -> int:
    lens = batch.get(f"{key}_len")
    return int(lens[i]) if lens is not None else int(batch[key].shape[1])


def synthetic_batch(num_utterances: int = 4, *, text_vocab: int = 100, speech_vocab: int = 40,
                    embedding_dim: int = 192, sample_rate: int = 22050, n_fft: int = 1024, num_mels: int = 80,
                    hop_size: int = 256, win_size: int = 1024, fmin: float = 0.0, fmax: Optional[float] = 8000.0,
                    frames_per_token: float = 22050 / 256 / 50, min_tokens: int = 16, max_tokens: int = 28,
                    seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """A deterministic padded batch with upstream keys when no data is given.

    Tokens and x-vectors are seeded random; ``speech_feat`` is the real log-mel of a voiced-looking
    test signal (a harmonic tone with a gliding pitch plus a little noise), so the flow gets a
    prompt mel with realistic values. ``frames_per_token`` = mel frames per speech token (v1 about
    1.72, v2/v3 ``token_mel_ratio`` 2).
    """
    from cosytrain.data.features import mel_spectrogram

    gen = torch.Generator().manual_seed(seed)
    n_speech = torch.randint(min_tokens, max_tokens + 1, (num_utterances,), generator=gen)
    n_text = torch.clamp(n_speech // 3, min=2)
    n_feat = torch.floor(n_speech.double() * frames_per_token).long()
    text = torch.zeros(num_utterances, int(n_text.max()), dtype=torch.long)
    speech = torch.zeros(num_utterances, int(n_speech.max()), dtype=torch.long)
    feats = torch.zeros(num_utterances, int(n_feat.max()), num_mels)
    for i in range(num_utterances):
        text[i, :n_text[i]] = torch.randint(0, text_vocab, (int(n_text[i]),), generator=gen)
        speech[i, :n_speech[i]] = torch.randint(0, speech_vocab, (int(n_speech[i]),), generator=gen)
        length = int(n_feat[i]) * hop_size
        t = torch.arange(length, dtype=torch.float64) / sample_rate
        f0 = 110.0 + 60.0 * float(torch.rand((), generator=gen)) + 40.0 * t / max(float(t[-1]), 1e-3)
        phase = 2 * math.pi * torch.cumsum(f0 / sample_rate, 0)
        wav = sum(0.3 / h * torch.sin(h * phase) for h in range(1, 8))
        wav = wav + 0.003 * torch.randn(length, generator=gen, dtype=torch.float64)
        mel = mel_spectrogram(wav.float().unsqueeze(0), n_fft, num_mels, sample_rate, hop_size, win_size, fmin, fmax)
        frames = min(int(n_feat[i]), mel.shape[-1])
        feats[i, :frames] = mel[0, :, :frames].t()
        n_feat[i] = frames
    embedding = torch.randn(num_utterances, embedding_dim, generator=gen)
    return {
        "utts": [f"synthetic_{i}" for i in range(num_utterances)],
        "text_token": text, "text_token_len": n_text.int(),
        "speech_token": speech, "speech_token_len": n_speech.int(),
        "speech_feat": feats, "speech_feat_len": n_feat.int(),
        "embedding": embedding,
    }



# --------------------------------------------------------------------------------------------------
# A model directory's data for the command line
# --------------------------------------------------------------------------------------------------


def _kwargs_of(node: Any) -> dict[str, Any]:
    kwargs = getattr(node, "kwargs", None)
    return {k: v for k, v in (kwargs or {}).items() if isinstance(v, (int, float, str, type(None)))}


def _feature_conf(config: Mapping[str, Any], hift: Optional[nn.Module], generation: str) -> dict[str, Any]:
    """Mel options: the config's ``feat_extractor`` (upstream ``!name:...mel_spectrogram``), else defaults."""
    v1 = generation == "v1"
    conf = {"n_fft": 1024 if v1 else 1920, "num_mels": 80, "sampling_rate": 22050 if v1 else 24000,
            "hop_size": 256 if v1 else 480, "win_size": 1024 if v1 else 1920, "fmin": 0,
            "fmax": None if generation == "v3" else 8000, "center": False}
    conf.update({k: v for k, v in _kwargs_of(config.get("feat_extractor")).items() if k in conf})
    if hift is not None and getattr(hift, "sampling_rate", None):
        conf["sampling_rate"] = int(hift.sampling_rate)
    return conf


def _card_tokenizer(model_dir: Path) -> Optional[str]:
    """The text tokenizer the export recorded (``run_text_tokenizer`` in cosytrain.json), if any."""
    try:
        value = json.loads((model_dir / METADATA_FILE).read_text(encoding="utf-8")).get("run_text_tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _data_batches(args: argparse.Namespace, parts: Mapping[str, nn.Module], generation: str,
                  feat: Mapping[str, Any]) -> list[dict]:
    """The first ``--num_utterances`` utterances of ``--data`` through cosytrain's own pipeline, with the
    model's mel options, in file order (no shuffling), so repeated checks see the same utterances."""
    from cosytrain.data.datamodule import CosyDataModule

    flow = parts.get("flow")
    ratio = int(getattr(flow, "token_mel_ratio", 0) or 0)
    tokenizer = args.text_tokenizer or _card_tokenizer(Path(args.model_dir)) or \
        {"v1": "whisper", "v2": "qwen", "v3": "qwen3"}[generation]
    tokenizer_path = args.text_tokenizer_path
    if tokenizer_path is None and tokenizer in ("qwen", "qwen3"):
        tokenizer_path = str(Path(args.model_dir) / "CosyVoice-BlankEN")
    dm = CosyDataModule(val_data=args.data, sample_rate=int(feat["sampling_rate"]), n_fft=int(feat["n_fft"]),
                        num_mels=int(feat["num_mels"]), hop_size=int(feat["hop_size"]),
                        win_size=int(feat["win_size"]), fmin=float(feat["fmin"]),
                        fmax=None if feat["fmax"] is None else float(feat["fmax"]), center=bool(feat["center"]),
                        num_frames=-1 if generation == "v1" else 960, token_mel_ratio=ratio,
                        text_tokenizer=tokenizer, text_tokenizer_path=tokenizer_path, speech_token_size=None,
                        batch_type="static", batch_size=args.num_utterances, shuffle_size=1, sort_size=1)
    dm.setup("validate")
    batches, count = [], 0
    for batch in dm.val_dataloader():
        batches.append(batch)
        count += batch_size(batch)
        if count >= args.num_utterances:
            break
    if not batches:
        raise ValueError(f"{args.data}: no utterances survived the data pipeline's filters")
    return batches


def _synthetic_for(parts: Mapping[str, nn.Module], feat: Mapping[str, Any], n: int, seed: int) -> dict[str, Any]:
    llm, flow = parts.get("llm"), parts.get("flow")
    vocab = [int(v) for v in (getattr(llm, "speech_token_size", None), getattr(flow, "vocab_size", None)) if v]
    text_vocab = 100
    if llm is not None:
        emb = getattr(llm, "text_embedding", None)
        text_vocab = int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else text_vocab
        text_vocab = min(text_vocab, 1000)
    spk = getattr(llm, "spk_embed_affine_layer", None) or getattr(flow, "spk_embed_affine_layer", None)
    ratio = getattr(flow, "token_mel_ratio", None)
    frames = float(ratio) if ratio else feat["sampling_rate"] / feat["hop_size"] / 50
    return synthetic_batch(n, text_vocab=text_vocab, speech_vocab=min(vocab) if vocab else 40,
                           embedding_dim=int(spk.in_features) if isinstance(spk, nn.Linear) else 192,
                           sample_rate=int(feat["sampling_rate"]), n_fft=int(feat["n_fft"]),
                           num_mels=int(feat["num_mels"]), hop_size=int(feat["hop_size"]),
                           win_size=int(feat["win_size"]), fmin=float(feat["fmin"]),
                           fmax=None if feat["fmax"] is None else float(feat["fmax"]), frames_per_token=frames,
                           seed=seed)
