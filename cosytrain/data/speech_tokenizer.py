"""Speech tokenizers for ``prepare``: upstream's ONNX S3 tokenizers, or a built-in k-means stand-in.

Both take 16 kHz mono float audio and return one token sequence per utterance at the model's token
rate (50 Hz for CosyVoice 1, 25 Hz for CosyVoice 2/3).

Batching pads the log-mels; the tokenizers mask padding (convolution inputs, attention, FSMN memory),
so each utterance's tokens equal a one-at-a-time run: shown on the real v1/v2/v3 architectures (the
``s3tokenizer`` package's models with random weights, and their ONNX export through this module) in
``tests/data/test_s3_tokenizer.py``. The hidden states of a padded batch differ from a lone run's by
float summation order (1e-6 to 1e-5 at the official sizes), so a value sitting that close to a
quantiser boundary could in principle flip a token; none did in the measured utterances
(``bench/tokenizer_padding.py``, figures in ``bench/README.md``), and ``batch_size=1`` is upstream's
call exactly.

The ONNX path reproduces upstream ``tools/extract_speech_token.py``: whisper's 128-bin log-mel
(n_fft 400, hop 160, Hann, slaney mel, log10, clamp to max-8, (x+4)/4), inputs ``feats`` [B,128,T]
float32 and ``feats_length`` [B] int32. Upstream refuses audio over 30 s (the tokenizer's whisper
encoder has 30 s of positions); here such audio is cut into 30 s windows whose tokens are concatenated.

The built-in tokenizer is a **stand-in** for when the upstream model files are not at hand: k-means
over standardised log-mel frames pooled to the token rate, fitted on the corpus itself. Its tokens
are acoustic clusters, not the supervised semantic tokens upstream's LLM was trained on, so they are
for exercising the pipeline and for from-scratch toy models, not for fine-tuning released weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
WINDOW_S = 30
BUILTIN_KIND = "cosytrain-builtin-kmeans-tokenizer-v1"

_MEL_CACHE: dict[int, torch.Tensor] = {}


def to_16k(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resample like upstream (``torchaudio.transforms.Resample`` defaults) to 16 kHz float32."""
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if sample_rate != SAMPLE_RATE:
        import torchaudio.functional as AF

        x = AF.resample(x, orig_freq=int(sample_rate), new_freq=SAMPLE_RATE)
    return x.numpy()


def _mel_filters(n_mels: int) -> torch.Tensor:
    """[n_mels, 201] slaney-scale, slaney-normalised filters: what whisper's ``mel_filters.npz`` holds
    (it was made with ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=n)``)."""
    if n_mels not in _MEL_CACHE:
        from cosytrain.data.features import slaney_mel_filterbank

        _MEL_CACHE[n_mels] = slaney_mel_filterbank(SAMPLE_RATE, N_FFT, n_mels)
    return _MEL_CACHE[n_mels]


def whisper_log_mel(audio16k: np.ndarray | torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's ``log_mel_spectrogram`` for one 16 kHz clip: [n_mels, len // 160]."""
    x = torch.as_tensor(audio16k, dtype=torch.float32).reshape(-1)
    if x.numel() < N_FFT // 2 + 1:  # reflect padding needs a few samples; pad silence instead
        x = torch.nn.functional.pad(x, (0, N_FFT // 2 + 1 - x.numel()))
    stft = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel = _mel_filters(n_mels) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def num_frames(num_samples_16k: int) -> int:
    return max(num_samples_16k // HOP, 1)


def windows_16k(audio16k: np.ndarray, window_s: int = WINDOW_S) -> list[np.ndarray]:
    """Cut audio into consecutive windows of at most ``window_s`` seconds (the last one shorter)."""
    n = window_s * SAMPLE_RATE
    if len(audio16k) <= n:
        return [audio16k]
    return [audio16k[i:i + n] for i in range(0, len(audio16k), n)]


class SpeechTokenizer(Protocol):
    token_rate: int

    def tokenize_batch(self, audios16k: Sequence[np.ndarray]) -> list[list[int]]: ...


class _WindowBatches:
    """What the ONNX and PyTorch tokenizers share: 30-s windows in padded batches of ``batch_size``."""

    token_rate: int
    batch_size: int

    @property
    def stride(self) -> int:
        return 100 // self.token_rate

    def _tokenize_mels(self, mels: list[torch.Tensor]) -> list[list[int]]:
        raise NotImplementedError

    def tokenize_batch(self, audios16k: Sequence[np.ndarray]) -> list[list[int]]:
        """Cut every utterance into its 30-s windows, run those sorted by length in batches, re-join."""
        pieces: list[tuple[int, torch.Tensor]] = []
        for u, audio in enumerate(audios16k):
            for w in windows_16k(np.asarray(audio, np.float32)):
                pieces.append((u, whisper_log_mel(w, 128)))
        order = sorted(range(len(pieces)), key=lambda k: pieces[k][1].shape[1])  # less padding per batch
        tokens: list[list[int] | None] = [None] * len(pieces)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            for k, toks in zip(idx, self._tokenize_mels([pieces[k][1] for k in idx])):
                tokens[k] = toks
        result: list[list[int]] = [[] for _ in audios16k]
        for (u, _), toks in zip(pieces, tokens):
            result[u].extend(toks or [])
        return result


def _pad_mels(mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded float32 ``(B, n_mels, T_max)`` batch and the int32 frame counts."""
    lens = torch.tensor([m.shape[1] for m in mels], dtype=torch.int32)
    feats = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
    return feats.to(torch.float32).contiguous(), lens


# ------------------------------------------------------------------------------------------ ONNX


def _ort_session(path: str | Path, providers: Sequence[str] | None = None):
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} not found; pass the upstream model file's path")
    opt = onnxruntime.SessionOptions()
    opt.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    opt.intra_op_num_threads = 1
    opt.inter_op_num_threads = 1
    avail = onnxruntime.get_available_providers()
    provs = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in avail]
    return onnxruntime.InferenceSession(str(path), sess_options=opt, providers=provs or ["CPUExecutionProvider"])


class OnnxSpeechTokenizer(_WindowBatches):
    """Upstream ``speech_tokenizer_v1.onnx`` / ``v2.onnx`` / ``v3.onnx`` through onnxruntime.

    Batches pad the log-mel with zeros and pass the true ``feats_length``; each output row is cut to
    ``ceil(frames / stride)`` tokens, the stride (2 for v1's 50 Hz, 4 for v2/v3's 25 Hz) read off the
    longest item. Use ``batch_size=1`` to call the model exactly as upstream does.
    """

    def __init__(self, path: str | Path, batch_size: int = 8, providers: Sequence[str] | None = None):
        self.path = str(path)
        self.session = _ort_session(path, providers)
        inputs = self.session.get_inputs()
        if len(inputs) < 2:
            raise ValueError(f"{path}: a speech tokenizer takes (feats, feats_length); this model has "
                             f"inputs {[i.name for i in inputs]}")
        self.feats_name, self.len_name = inputs[0].name, inputs[1].name
        self.batch_size = max(1, int(batch_size))
        self.token_rate = self._probe_rate()

    def _run(self, feats: np.ndarray, lens: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.feats_name: feats, self.len_name: lens})[0]
        return np.asarray(out).reshape(feats.shape[0], -1)

    def _probe_rate(self) -> int:
        frames = 400
        out = self._run(np.zeros((1, 128, frames), np.float32), np.array([frames], np.int32))
        stride = max(1, round(frames / max(out.shape[1], 1)))
        return 100 // stride

    def _tokenize_mels(self, mels: list[torch.Tensor]) -> list[list[int]]:
        feats, lens = _pad_mels(mels)
        out = self._run(feats.numpy(), lens.numpy())
        return [out[i, :math.ceil(n / self.stride)].astype(np.int64).tolist() for i, n in enumerate(lens.tolist())]


# ---------------------------------------------------------------------------- PyTorch (GPU) path


class S3TorchSpeechTokenizer(_WindowBatches):
    """Upstream's tokenizer run as a PyTorch model on a device: the way to tokenize a big corpus on a GPU.

    The model is the ``s3tokenizer`` package's re-implementation of the v1/v2/v3 tokenizers
    (``pip install s3tokenizer``), loaded from upstream's ONNX file (``from_onnx``, its
    ``onnx2torch`` weight conversion; no download). Input features are the same whisper log-mel and
    30-s windows as ``OnnxSpeechTokenizer``; windows are sorted by length and padded in batches of
    ``batch_size``, which the tokenizer's masking makes invisible (tests show batched == one at a time
    on the real architecture, and == the ONNX path).
    """

    def __init__(self, model: "torch.nn.Module", token_rate: int, device: str = "cpu", batch_size: int = 32):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.token_rate = int(token_rate)
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "cuda", batch_size: int = 32) -> "S3TorchSpeechTokenizer":
        """Upstream's ``speech_tokenizer_v1.onnx`` / ``v2`` / ``v3`` as an s3tokenizer model on ``device``."""
        try:
            import s3tokenizer
        except ImportError:
            raise ValueError("a speech tokenizer on a device needs `pip install s3tokenizer` (or leave "
                             "--speech_tokenizer_device unset to use onnxruntime)") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found; pass the upstream model file's path")
        model = s3tokenizer.load_model(str(path))  # a file path: no download; v2/v3 picked from the name
        return cls(model, 50 if type(model).__name__ == "S3Tokenizer" else 25, device, batch_size)

    def _tokenize_mels(self, mels: list[torch.Tensor]) -> list[list[int]]:
        feats, lens = _pad_mels(mels)
        with torch.inference_mode():
            codes, code_len = self.model.quantize(feats.to(self.device), lens.to(self.device))
        codes, code_len = codes.cpu(), code_len.cpu()
        return [codes[i, :int(code_len[i])].to(torch.int64).tolist() for i in range(len(mels))]


# -------------------------------------------------------------------------------------- built-in


def _pool(feat: torch.Tensor, stride: int) -> torch.Tensor:
    """[D, T] -> [ceil(T/stride), D] by averaging groups of frames (the last group may be short)."""
    d, t = feat.shape
    n = math.ceil(t / stride)
    pad = n * stride - t
    x = torch.nn.functional.pad(feat, (0, pad), mode="replicate") if pad else feat
    return x.reshape(d, n, stride).mean(-1).T.contiguous()


def builtin_frames(audio16k: np.ndarray, token_rate: int, n_mels: int = 128) -> torch.Tensor:
    """The built-in tokenizer's input: whisper log-mel pooled to ``token_rate`` -> [num_tokens, n_mels]."""
    if 100 % token_rate:
        raise ValueError(f"token_rate {token_rate} must divide 100 (50 for CosyVoice 1, 25 for 2/3)")
    return _pool(whisper_log_mel(audio16k, n_mels), 100 // token_rate)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Plain Lloyd k-means with k-means++ seeding; deterministic for a given ``seed`` and input."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least codebook_size={k} frames, the corpus gave {n}; "
                         "use a smaller --codebook_size or more audio")
    x2 = (x * x).sum(1)
    centers = [x[torch.randint(n, (1,), generator=g)].reshape(-1)]
    dist = (x - centers[0]).pow(2).sum(1)
    for _ in range(1, k):
        probs = dist.clamp_min(0) + 1e-12
        i = torch.multinomial(probs / probs.sum(), 1, generator=g)
        centers.append(x[i].reshape(-1))
        dist = torch.minimum(dist, (x - centers[-1]).pow(2).sum(1))
    c = torch.stack(centers)
    for _ in range(iters):
        d = x2[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
        assign = d.argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # move empty clusters to the points worst served so far
            far = d.gather(1, assign[:, None]).reshape(-1).topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c


class BuiltinSpeechTokenizer:
    """Stand-in tokenizer: nearest k-means centroid of each standardised, pooled log-mel frame."""

    def __init__(self, centroids: np.ndarray, mean: np.ndarray, std: np.ndarray, token_rate: int, n_mels: int):
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.token_rate = int(token_rate)
        self.n_mels = int(n_mels)

    @property
    def codebook_size(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def fit(cls, frames: torch.Tensor, token_rate: int, codebook_size: int = 256, n_mels: int = 128,
            seed: int = 0, iters: int = 25) -> "BuiltinSpeechTokenizer":
        """Fit on pooled frames [N, n_mels] (from :func:`builtin_frames` over the corpus)."""
        frames = frames.to(torch.float32)
        mean = frames.mean(0)
        std = frames.std(0).clamp_min(1e-5)
        c = kmeans((frames - mean) / std, codebook_size, iters=iters, seed=seed)
        return cls(c.numpy(), mean.numpy(), std.numpy(), token_rate, n_mels)

    @classmethod
    def fit_labelled(cls, frames: torch.Tensor, labels: torch.Tensor, token_rate: int, codebook_size: int,
                     n_mels: int = 128) -> "BuiltinSpeechTokenizer":
        """Centroid k = the mean standardised frame labelled k (e.g. by a phone alignment): a nearest-class-mean
        classifier that gives new audio the ids of the labels, for models trained on those labels; ids never
        seen get a centroid no frame is near."""
        frames = frames.to(torch.float32)
        mean = frames.mean(0)
        std = frames.std(0).clamp_min(1e-5)
        z = (frames - mean) / std
        counts = torch.bincount(labels.long(), minlength=codebook_size)[:codebook_size].to(torch.float32)
        sums = torch.zeros(codebook_size, z.shape[1]).index_add_(0, labels.long(), z)
        centroids = torch.full((codebook_size, z.shape[1]), 1e4)
        seen = counts > 0
        centroids[seen] = sums[seen] / counts[seen, None]
        return cls(centroids.numpy(), mean.numpy(), std.numpy(), token_rate, n_mels)

    def tokenize_frames(self, frames: torch.Tensor) -> list[int]:
        z = (frames - self.mean) / self.std
        d = (z * z).sum(1, keepdim=True) - 2 * z @ self.centroids.T + (self.centroids ** 2).sum(1)[None]
        return d.argmin(1).tolist()

    def tokenize_batch(self, audios16k: Sequence[np.ndarray]) -> list[list[int]]:
        return [self.tokenize_frames(builtin_frames(a, self.token_rate, self.n_mels)) for a in audios16k]

    def save(self, path: str | Path) -> None:
        from cosytrain.data.shards import atomic_write_bytes
        import io

        buf = io.BytesIO()
        np.savez(buf, kind=np.array(BUILTIN_KIND), centroids=self.centroids.numpy(), mean=self.mean.numpy(),
                 std=self.std.numpy(), token_rate=np.array(self.token_rate), n_mels=np.array(self.n_mels))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "BuiltinSpeechTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"built-in tokenizer {path} not found; run prepare with "
                                    "--speech_tokenizer builtin to fit one")
        with np.load(path, allow_pickle=False) as z:  # arrays only: nothing executable in the file
            if "kind" not in z or str(z["kind"]) != BUILTIN_KIND:
                raise ValueError(f"{path} is not a cosytrain built-in tokenizer file ({BUILTIN_KIND})")
            return cls(z["centroids"], z["mean"], z["std"], int(z["token_rate"]), int(z["n_mels"]))


def load_speech_tokenizer(spec: str | Path, onnx_batch_size: int = 8, device: str | None = None,
                          token_rate: int | None = None) -> SpeechTokenizer:
    """``*.onnx`` -> upstream model via onnxruntime (CUDA provider when onnxruntime-gpu is installed), or
    with ``device`` as s3tokenizer's PyTorch model on that device; ``*.npz`` -> a fitted built-in tokenizer;
    ``*.ctm`` -> tokens from a phone alignment at ``token_rate`` (``alignment_tokens.py``)."""
    p = Path(spec)
    if p.suffix == ".ctm":
        from cosytrain.data.alignment_tokens import AlignmentSpeechTokenizer

        if token_rate is None:
            raise ValueError(f"speech tokenizer {spec!r}: an alignment needs the token rate (50 or 25 Hz)")
        return AlignmentSpeechTokenizer.load(p, token_rate)
    if p.suffix == ".onnx":
        if device:
            return S3TorchSpeechTokenizer.from_onnx(p, device=device, batch_size=onnx_batch_size)
        return OnnxSpeechTokenizer(p, batch_size=onnx_batch_size)
    if p.suffix == ".npz":
        return BuiltinSpeechTokenizer.load(p)
    raise ValueError(f"speech tokenizer {spec!r}: expected an upstream .onnx file, a built-in .npz, a phone"
                     " alignment .ctm, or 'builtin'")
