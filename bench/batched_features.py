"""Log-mel features per utterance (as the data pipeline computes them) vs one batched call per batch.

The pipeline's ``compute_fbank`` runs ``cosytrain.data.features.mel_spectrogram`` on each utterance in
the loader. The alternative is one call per padded batch, on the training device: each waveform is
reflect-padded on its own first (so every frame an utterance owns sees exactly its own samples), the
batch is zero-padded to its longest, and the STFT, magnitude, filterbank and log run once. This script
times both on the same utterances, variants alternating round by round, and checks the batched
frames against the per-utterance ones (max abs difference over each utterance's own frames).

    python bench/batched_features.py [--batch 16] [--seconds 2,6] [--sample_rate 22050] [--repeats 15]
                                     [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from cosytrain.data.features import mel_spectrogram

# upstream v1's feat_extractor (22.05 kHz): n_fft 1024, 80 mels, hop 256, win 1024, fmin 0, fmax 8000
MEL = dict(n_fft=1024, num_mels=80, hop_size=256, win_size=1024, fmin=0, fmax=8000)


def per_utterance(wavs: list[torch.Tensor], sample_rate: int) -> list[torch.Tensor]:
    return [mel_spectrogram(w.unsqueeze(0), sampling_rate=sample_rate, **MEL)[0] for w in wavs]


def batched(wavs: list[torch.Tensor], sample_rate: int) -> list[torch.Tensor]:
    pad = (MEL["n_fft"] - MEL["hop_size"]) // 2
    padded = [F.pad(w.view(1, 1, -1), (pad, pad), mode="reflect").view(-1) for w in wavs]
    longest = max(p.numel() for p in padded)
    y = torch.stack([F.pad(p, (0, longest - p.numel())) for p in padded])
    # mel_spectrogram pads (n_fft-hop)/2 again; undo that by cutting it back off the batch's spectrogram
    spec = torch.stft(y, MEL["n_fft"], hop_length=MEL["hop_size"], win_length=MEL["win_size"],
                      window=torch.hann_window(MEL["win_size"], device=y.device), center=False,
                      normalized=False, onesided=True, return_complex=True)
    spec = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    from cosytrain.data.features import slaney_mel_filterbank

    basis = slaney_mel_filterbank(sample_rate, MEL["n_fft"], MEL["num_mels"], MEL["fmin"], MEL["fmax"]).to(y.device)
    mel = torch.log(torch.clamp(torch.matmul(basis, spec), min=1e-5))
    frames = [(p.numel() - MEL["n_fft"]) // MEL["hop_size"] + 1 for p in padded]
    return [mel[i, :, :n] for i, n in enumerate(frames)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", default="2,6", help="utterance lengths spread over this range")
    ap.add_argument("--sample_rate", type=int, default=22050)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lo, hi = (float(x) for x in args.seconds.split(","))
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(lo, hi, args.batch)
    wavs = [(0.3 * torch.randn(int(s * args.sample_rate), generator=g)).clamp(-1, 1).to(args.device) for s in lengths]
    variants = {"per-utterance": per_utterance, "batched": batched}
    times: dict[str, list[float]] = {k: [] for k in variants}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.repeats + 2):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn(wavs, args.sample_rate)
            sync()
            times[name].append(time.perf_counter() - t0)
    ref, got = per_utterance(wavs, args.sample_rate), batched(wavs, args.sample_rate)
    assert [r.shape for r in ref] == [g.shape for g in got], "frame counts differ"
    diff = max(float((r - g).abs().max()) for r, g in zip(ref, got))
    base = statistics.median(times["per-utterance"][2:])
    print(f"log-mel of {args.batch} utterances ({lo:g}-{hi:g} s, {args.sample_rate} Hz), {args.device},"
          f" {platform.processor() or platform.machine()} ({os.cpu_count()} cpus, {args.threads} torch threads),"
          f" median of {args.repeats}, variants alternating")
    print(f"{'variant':14s} {'ms/batch':>9s} {'x per-utt':>9s} {'max |dmel|':>10s}")
    for name in variants:
        med = statistics.median(times[name][2:])
        print(f"{name:14s} {med * 1e3:9.1f} {base / med:9.2f} {0.0 if name == 'per-utterance' else diff:10.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
