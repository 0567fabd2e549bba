"""Speaker embeddings for ``prepare``: upstream's ONNX CAM++ (campplus), or a built-in stand-in.

The ONNX path reproduces upstream ``tools/extract_embedding.py``: 16 kHz audio, Kaldi fbank with 80
bins and dither 0, the per-utterance mean subtracted, input ``[1, T, 80]`` -> a 192-dim embedding.
CAM++ pools over time without a length input, so zero-padding would change the result; batches here
only group utterances with the same number of frames, which leaves every output as upstream's.

The built-in embedding is a **stand-in**: the mean and standard deviation of the (un-normalised) fbank
over the utterance, standardised with statistics fitted on the corpus and mapped to 192 dimensions
by a fixed seeded random projection. It separates the speakers of a corpus well enough to condition a
toy model; it is not a speaker-verification model and not interchangeable with campplus vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

EMBED_DIM = 192
NUM_MEL_BINS = 80
BUILTIN_KIND = "cosytrain-builtin-fbank-stats-embedding-v1"


def kaldi_fbank(audio16k: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``torchaudio.compliance.kaldi.fbank(num_mel_bins=80, dither=0, sample_frequency=16000)`` -> [T, 80]."""
    import torchaudio.compliance.kaldi as kaldi

    x = torch.as_tensor(audio16k, dtype=torch.float32).reshape(1, -1)
    if x.shape[1] < 400:  # one 25 ms frame at least
        x = torch.nn.functional.pad(x, (0, 400 - x.shape[1]))
    return kaldi.fbank(x, num_mel_bins=NUM_MEL_BINS, dither=0, sample_frequency=16000)


def campplus_features(audio16k: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Upstream's campplus input for one utterance: mean-normalised fbank [T, 80]."""
    feat = kaldi_fbank(audio16k)
    return feat - feat.mean(dim=0, keepdim=True)


class SpeakerEmbedder(Protocol):
    dim: int

    def embed_batch(self, audios16k: Sequence[np.ndarray]) -> list[list[float]]: ...


class OnnxCampplus:
    """Upstream ``campplus.onnx`` through onnxruntime (CPU, as upstream runs it)."""

    def __init__(self, path: str | Path, batch_size: int = 8, providers: Sequence[str] | None = None):
        from cosytrain.data.speech_tokenizer import _ort_session

        self.path = str(path)
        self.session = _ort_session(path, providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size = max(1, int(batch_size))
        self.dim = EMBED_DIM

    def embed_batch(self, audios16k: Sequence[np.ndarray]) -> list[list[float]]:
        feats = [campplus_features(a).numpy() for a in audios16k]
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(feats):
            groups.setdefault(f.shape[0], []).append(i)
        out: list[list[float] | None] = [None] * len(feats)
        for idx in groups.values():
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                x = np.stack([feats[i] for i in chunk]).astype(np.float32)
                y = np.asarray(self.session.run(None, {self.input_name: x})[0]).reshape(len(chunk), -1)
                for i, row in zip(chunk, y):
                    out[i] = row.astype(np.float32).tolist()
        return out  # type: ignore[return-value]


def fbank_stats(audio16k: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Mean and std over time of the raw fbank: [160], the built-in embedding's input."""
    feat = kaldi_fbank(audio16k)
    return torch.cat([feat.mean(0), feat.std(0, unbiased=False)])


class BuiltinSpeakerEmbedding:
    """Stand-in embedding: standardised fbank statistics through a fixed seeded random projection."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, proj: np.ndarray):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.proj = torch.as_tensor(proj, dtype=torch.float32)
        self.dim = int(self.proj.shape[1])

    @classmethod
    def fit(cls, stats: torch.Tensor, dim: int = EMBED_DIM, seed: int = 0) -> "BuiltinSpeakerEmbedding":
        """Fit the standardisation on per-utterance stats [N, 160]; the projection depends only on ``seed``."""
        stats = stats.to(torch.float32)
        mean = stats.mean(0)
        std = stats.std(0).clamp_min(1e-4) if stats.shape[0] > 1 else torch.ones_like(mean)
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(stats.shape[1], dim, generator=g) / stats.shape[1] ** 0.5
        return cls(mean.numpy(), std.numpy(), proj.numpy())

    def embed_stats(self, stats: torch.Tensor) -> list[float]:
        return (((stats - self.mean) / self.std) @ self.proj).tolist()

    def embed_batch(self, audios16k: Sequence[np.ndarray]) -> list[list[float]]:
        return [self.embed_stats(fbank_stats(a)) for a in audios16k]

    def save(self, path: str | Path) -> None:
        import io

        from cosytrain.data.shards import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, kind=np.array(BUILTIN_KIND), mean=self.mean.numpy(), std=self.std.numpy(),
                 proj=self.proj.numpy())
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "BuiltinSpeakerEmbedding":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"built-in speaker embedding {path} not found; run prepare with "
                                    "--campplus builtin to fit one")
        with np.load(path, allow_pickle=False) as z:
            if "kind" not in z or str(z["kind"]) != BUILTIN_KIND:
                raise ValueError(f"{path} is not a cosytrain built-in speaker embedding file ({BUILTIN_KIND})")
            return cls(z["mean"], z["std"], z["proj"])


def load_speaker_embedder(spec: str | Path, onnx_batch_size: int = 8) -> SpeakerEmbedder:
    p = Path(spec)
    if p.suffix == ".onnx":
        return OnnxCampplus(p, batch_size=onnx_batch_size)
    if p.suffix == ".npz":
        return BuiltinSpeakerEmbedding.load(p)
    raise ValueError(f"speaker embedding {spec!r}: expected an upstream campplus .onnx, a built-in .npz, or 'builtin'")
