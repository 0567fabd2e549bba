"""The real speech-tokenizer architectures (the ``s3tokenizer`` package's PyTorch v1/v2/v3 models) with
random weights, and an ONNX export of them with upstream's interface (``feats`` [B, 128, T] float32,
``feats_length`` [B] int32 -> token ids [B, T']), for tests and ``bench/tokenizer_padding.py``. No
weights are downloaded (``pip install s3tokenizer`` brings the model code only).

Usage: ``python tools/s3tokenizer_random.py OUT_DIR [--full]`` writes ``speech_tokenizer_random_{v1,v2,v3}.onnx``.

s3tokenizer's own forward is not exportable as is (v1 takes the mask length from the data with
``.item()``, v2/v3 carry complex rotary tables), so ``ExportableS3`` runs the same submodules with the
same math but takes lengths from shapes and rotary tables as real cos/sin; tests hold its tokens equal
to s3tokenizer's ``quantize``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VERSIONS = ("v1", "v1_25hz", "v2", "v3")


def build_s3(version: str, small: bool = True, seed: int = 0) -> nn.Module:
    """s3tokenizer's model for ``version`` (official sizes, or 256 wide / 2 layers), random weights."""
    from s3tokenizer.model import ModelConfig, S3Tokenizer
    from s3tokenizer.model_v2 import ModelConfig as ConfigV2
    from s3tokenizer.model_v2 import S3TokenizerV2
    from s3tokenizer.model_v3 import ModelConfigV3, S3TokenizerV3

    size = dict(n_audio_state=256, n_audio_head=4, n_audio_layer=2) if small else {}
    torch.manual_seed(seed)
    if version in ("v1", "v1_25hz"):
        name = "speech_tokenizer_v1" if version == "v1" else "speech_tokenizer_v1_25hz"
        model = S3Tokenizer(name, ModelConfig(**size, **({"n_codebook_size": 512} if small else {})))
    elif version == "v2":
        model = S3TokenizerV2("speech_tokenizer_v2_25hz", ConfigV2(**size))
    elif version == "v3":
        model = S3TokenizerV3("speech_tokenizer_v3_25hz", ModelConfigV3(**size))
    else:
        raise ValueError(version)
    # PyTorch's default initialisation (seeded) for the encoder; random biases and norms so no part is
    # trivially zero or one; then the quantiser is set to give many distinct tokens (an untrained VQ
    # codebook is all zeros, and an unscaled FSQ projection rounds everything to one code)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        book = model.quantizer._codebook
        if hasattr(book, "embed") and book.embed is not None:
            # codes drawn from the encoder's own (normalised) outputs, as k-means would place them
            g = torch.Generator().manual_seed(seed)
            n = book.embed.shape[0] // 150 + 2  # 600 frames give at least 150 hidden vectors each
            hidden, _ = model.encoder(torch.randn(n, 128, 600, generator=g), torch.full((n,), 600))
            pool = F.normalize(hidden.reshape(-1, hidden.shape[-1]), dim=-1)
            pick = torch.randperm(pool.shape[0], generator=g)[:book.embed.shape[0]]
            book.embed.copy_(pool[pick] + 0.01 * torch.randn(book.embed.shape, generator=g))
        if hasattr(book, "project_down"):
            book.project_down.weight.mul_(4.0)
    return model.eval()


def _rotary(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s3tokenizer.model_v2.apply_rotary_emb`` with the table as real [T, D, 2] (cos, sin)."""
    cos = freqs_cis[..., 0].unsqueeze(0).unsqueeze(2).to(xq.dtype)
    sin = freqs_cis[..., 1].unsqueeze(0).unsqueeze(2).to(xq.dtype)
    d = xq.shape[-1] // 2
    xq_r = torch.cat((-xq[..., d:], xq[..., :d]), dim=-1)
    xk_r = torch.cat((-xk[..., d:], xk[..., :d]), dim=-1)
    return xq * cos + xq_r * sin, xk * cos + xk_r * sin


def _mask(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, 1, T] non-pad mask with T taken from ``like``'s last dimension (a graph op, not a constant)."""
    pos = torch.ones_like(like[:1, :1, :], dtype=torch.int64).cumsum(-1) - 1
    return pos < lengths.to(torch.int64).view(-1, 1, 1)


class ExportableS3(nn.Module):
    """Feats + lengths -> token ids, through s3tokenizer's submodules (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        enc = model.encoder
        self.v1 = hasattr(enc, "positional_embedding")
        if not self.v1:
            self.register_buffer("freqs", torch.view_as_real(enc.freqs_cis).contiguous(), persistent=False)

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        import s3tokenizer.model_v2 as M2
        from s3tokenizer.utils import mask_to_bias

        enc = self.model.encoder
        x_len = feats_length.to(torch.int64)
        x = F.gelu(enc.conv1(feats * _mask(x_len, feats)))
        x_len = (x_len + 2 - 1 * (3 - 1) - 1) // enc.stride + 1
        x = F.gelu(enc.conv2(x * _mask(x_len, x)))
        x_len = (x_len + 2 - 1 * (3 - 1) - 1) // 2 + 1
        mask = _mask(x_len, x)
        x = x.permute(0, 2, 1)
        bias = mask_to_bias(mask, x.dtype)
        if self.v1:
            x = (x + enc.positional_embedding[:x.shape[1], :]).to(x.dtype)
            for block in enc.blocks:
                x = block(x, bias.unsqueeze(1))
        else:
            real = M2.apply_rotary_emb
            M2.apply_rotary_emb = _rotary  # the attention looks it up at call time
            try:
                for block in enc.blocks:
                    x = block(x, bias.unsqueeze(1), mask.transpose(1, 2), self.freqs[:x.shape[1]])
            finally:
                M2.apply_rotary_emb = real
        codes = self.model.quantizer.encode(x)
        return codes.to(torch.int64) * mask.squeeze(1).to(torch.int64)


def export_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (from ``build_s3``) as an ONNX speech tokenizer with upstream's interface."""
    feats = torch.randn(2, 128, 301)
    lens = torch.tensor([301, 173], dtype=torch.int32)
    with torch.inference_mode():
        torch.onnx.export(ExportableS3(model).eval(), (feats, lens), str(path), input_names=["feats", "feats_length"],
                          output_names=["indices"], opset_version=17, dynamo=False,
                          dynamic_axes={"feats": {0: "batch", 2: "time"}, "feats_length": {0: "batch"},
                                        "indices": {0: "batch", 1: "tokens"}})
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python tools/s3tokenizer_random.py OUT_DIR [--full]", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for version in ("v1", "v2", "v3"):
        model = build_s3(version, small="--full" not in args)
        print(export_onnx(model, out / f"speech_tokenizer_random_{version}.onnx"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
