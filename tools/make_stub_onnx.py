"""Tiny stand-in ONNX models with upstream's front-end interfaces, for tests without the real files.

* speech tokenizer: inputs ``feats`` [B, 128, T] float32 (whisper log-mel) and ``feats_length`` [B]
  int32, output [B, ceil(T / stride)] int64 token ids, like upstream ``speech_tokenizer_v*.onnx``
  (stride 2 = 50 Hz as v1, stride 4 = 25 Hz as v2/v3). Tokens past an item's length are 0.
* campplus: input ``input`` [B, T, 80] float32 (mean-normalised Kaldi fbank), output [B, 192].

The weights are seeded random numbers: the models compute something simple but input-dependent, so
a test can compare an ONNX wrapper's output with the same torch module applied to the same features.

Usage: ``python tools/make_stub_onnx.py OUT_DIR`` writes ``speech_tokenizer_stub_v1.onnx``,
``speech_tokenizer_stub_v2.onnx`` and ``campplus_stub.onnx``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


class StubSpeechTokenizer(nn.Module):
    def __init__(self, stride: int = 2, codebook: int = 64, n_mels: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stride = stride
        self.proj = nn.Parameter(torch.randn(codebook, n_mels, generator=g))

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        x = feats[:, :, :: self.stride]  # [B, n_mels, ceil(T / stride)]
        tokens = torch.einsum("cm,bmt->bct", self.proj, x).argmax(1)
        n_tok = torch.div(feats_length.to(torch.int64) + self.stride - 1, self.stride, rounding_mode="floor")
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < n_tok[:, None]
        return tokens * mask.to(tokens.dtype)


class StubCampplus(nn.Module):
    def __init__(self, dim: int = 192, n_mels: int = 80, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(n_mels * 2, dim, generator=g) / (2 * n_mels) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mean and std over time, like the statistics pooling of the real model.
        stats = torch.cat([x.mean(1), x.std(1)], dim=-1)
        return stats @ self.w


def export_speech_tokenizer(path: str | Path, stride: int = 2, seed: int = 0) -> StubSpeechTokenizer:
    model = StubSpeechTokenizer(stride=stride, seed=seed).eval()
    feats = torch.randn(2, 128, 101)
    lens = torch.tensor([101, 60], dtype=torch.int32)
    torch.onnx.export(model, (feats, lens), str(path), input_names=["feats", "feats_length"],
                      output_names=["indices"], dynamic_axes={"feats": {0: "batch", 2: "time"},
                                                              "feats_length": {0: "batch"},
                                                              "indices": {0: "batch", 1: "tokens"}},
                      opset_version=17, dynamo=False)
    return model


def export_campplus(path: str | Path, seed: int = 0) -> StubCampplus:
    model = StubCampplus(seed=seed).eval()
    torch.onnx.export(model, (torch.randn(1, 57, 80),), str(path), input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch", 1: "time"},
                                                             "output": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python tools/make_stub_onnx.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    export_speech_tokenizer(out / "speech_tokenizer_stub_v1.onnx", stride=2)
    export_speech_tokenizer(out / "speech_tokenizer_stub_v2.onnx", stride=4)
    export_campplus(out / "campplus_stub.onnx")
    print(f"wrote stub ONNX models to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
