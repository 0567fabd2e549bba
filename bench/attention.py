"""Attention step time: cosytrain's ``RelPositionMultiHeadedAttention`` against plain reference code.

The same model (the small CosyVoice-1 LLM, ``conf/model/llm_v1_small.yaml``: a Conformer text
encoder and a Transformer LM, both with ESPnet relative-position self-attention) and the same batch
run one training step (forward + backward, no optimizer) with three interchangeable attention
implementations holding the same weights:

* ``cosytrain``: the model as built (``cosytrain/models/transformer/attention.py``: scores against
  2T-1 relative positions, then the Transformer-XL shift; scores and softmax in FP32).
* ``naive``: the same math written plainly here: the relative-position scores are GATHERED with an
  explicit index ``T-1-i+j`` instead of shifted, then matmul -> masked softmax -> matmul.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the position term as an
  additive mask (what a fused kernel could give; no FP32 softmax guarantee under autocast).

Before timing, each variant's loss and gradients are compared with ``cosytrain``'s in eval mode
(dropout off), so a faster variant that computes something else is caught. Rows alternate between
variants round by round (fair under a noisy, shared CPU); the median step time is reported, and
the ratio column is against ``naive`` measured in the same run.

    python bench/attention.py [--batch 8] [--speech_lens 100,300,600] [--text_len 40] [--repeats 7]
                              [--device auto] [--precision 32-true|16-mixed|bf16-mixed] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from cosytrain.models.transformer.attention import RelPositionMultiHeadedAttention

REPO = Path(__file__).resolve().parents[1]


def _training_shaped(module: RelPositionMultiHeadedAttention, key: torch.Tensor, pos_emb: torch.Tensor,
                     cache: torch.Tensor) -> bool:
    return cache.size(0) == 0 and pos_emb.size(1) in (key.size(1), 2 * key.size(1) - 1)


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if mask.size(2) == 0:
        return scores, None
    blocked = mask.unsqueeze(1).eq(0)[:, :, :, : scores.size(-1)]
    return scores.masked_fill(blocked, -float("inf")), blocked


class NaiveRelPositionAttention(RelPositionMultiHeadedAttention):
    """Same parameters and math; relative-position scores by an explicit gather (no shift trick)."""

    def forward(self, query, key, value, mask=torch.ones((0, 0, 0), dtype=torch.bool), pos_emb=torch.empty(0),
                cache=torch.zeros((0, 0, 0, 0))):
        if not _training_shaped(self, key, pos_emb, cache):
            return super().forward(query, key, value, mask, pos_emb, cache)
        b, t1, t2 = query.size(0), query.size(1), key.size(1)
        q = self.linear_q(query).view(b, t1, self.h, self.d_k)
        k = self.linear_k(key).view(b, t2, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(value).view(b, t2, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        if p.size(2) != t2:  # 2*T-1 positions, ordered from +(T-1) down to -(T-1): relative i-j sits at T-1-i+j
            i = torch.arange(t1, device=q.device).unsqueeze(1)
            j = torch.arange(t2, device=q.device).unsqueeze(0)
            index = (t2 - 1 - i + j).expand(bd.size(0), bd.size(1), t1, t2)
            bd = torch.gather(bd, -1, index)
        scores, blocked = _masked((ac.float() + bd.float()) / math.sqrt(self.d_k), mask)
        attn = torch.softmax(scores, dim=-1)
        if blocked is not None:
            attn = attn.masked_fill(blocked, 0.0)
        x = torch.matmul(self.dropout(attn.to(v.dtype)), v)
        return self.linear_out(x.transpose(1, 2).reshape(b, t1, self.h * self.d_k)), torch.cat((k, v), dim=-1)


class SdpaRelPositionAttention(RelPositionMultiHeadedAttention):
    """The content term through fused SDPA, the position term (shifted as upstream) as its additive mask."""

    def forward(self, query, key, value, mask=torch.ones((0, 0, 0), dtype=torch.bool), pos_emb=torch.empty(0),
                cache=torch.zeros((0, 0, 0, 0))):
        if not _training_shaped(self, key, pos_emb, cache):
            return super().forward(query, key, value, mask, pos_emb, cache)
        b, t1 = query.size(0), query.size(1)
        q, k, v = self.forward_qkv(query, key, value)
        q = q.transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        if bd.size(-1) != k.size(2):
            bd = self.rel_shift(bd)
        bias, _ = _masked(bd / math.sqrt(self.d_k), mask)
        x = F.scaled_dot_product_attention((q + self.pos_bias_u).transpose(1, 2), k, v, attn_mask=bias.to(q.dtype),
                                           dropout_p=self.dropout.p if self.training else 0.0)
        return self.linear_out(x.transpose(1, 2).reshape(b, t1, self.h * self.d_k)), torch.cat((k, v), dim=-1)


VARIANTS: dict[str, type] = {"cosytrain": RelPositionMultiHeadedAttention, "naive": NaiveRelPositionAttention,
                             "sdpa": SdpaRelPositionAttention}


def build_llm() -> torch.nn.Module:
    import yaml

    from cosytrain.tasks.part_config import instantiate_part

    return instantiate_part(yaml.safe_load((REPO / "conf" / "model" / "llm_v1_small.yaml").read_text()))


def set_attention(model: torch.nn.Module, cls: type) -> int:
    """Switch every relative-position attention module to ``cls`` in place (same parameters)."""
    n = 0
    for module in model.modules():
        if isinstance(module, RelPositionMultiHeadedAttention):
            module.__class__ = cls
            n += 1
    return n


def make_batch(batch: int, text_len: int, speech_len: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    # lengths spread over [60 %, 100 %] of the maximum, as a dynamic batch sorted by length would be
    text_lens = torch.linspace(0.6 * text_len, text_len, batch).round().long().flip(0)
    speech_lens = torch.linspace(0.6 * speech_len, speech_len, batch).round().long().flip(0)
    return {
        "text_token": torch.randint(1, 256, (batch, text_len), generator=g).to(device),
        "text_token_len": text_lens.int().to(device),
        "speech_token": torch.randint(0, 256, (batch, speech_len), generator=g).to(device),
        "speech_token_len": speech_lens.int().to(device),
        "embedding": torch.randn(batch, 192, generator=g).to(device),
    }


def _autocast(device: torch.device, precision: str):
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def step(model: torch.nn.Module, batch: dict, device: torch.device, precision: str) -> torch.Tensor:
    with _autocast(device, precision):
        loss = model(batch, device)["loss"]
    loss.backward()
    return loss.detach()


def agreement(model: torch.nn.Module, batch: dict, device: torch.device, precision: str) -> dict[str, tuple]:
    """Per variant: (|loss - cosytrain loss|, max relative grad difference), eval mode (no dropout)."""
    model.eval()
    results: dict[str, tuple] = {}
    ref_loss, ref_grads = None, None
    for name, cls in VARIANTS.items():
        set_attention(model, cls)
        model.zero_grad(set_to_none=True)
        loss = step(model, batch, device, precision)
        grads = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
        if ref_loss is None:
            ref_loss, ref_grads = loss, grads
        # against the largest gradient of the model: a parameter whose true gradient is 0 (the key bias
        # shifts every score of a row alike, which the softmax ignores) holds only rounding noise
        scale = max(float(r.abs().max()) for r in ref_grads)
        rel = max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads)) / max(scale, 1e-30)
        results[name] = (float((loss.float() - ref_loss.float()).abs()), rel)
    model.zero_grad(set_to_none=True)
    model.train()
    return results


def time_variants(model: torch.nn.Module, batch: dict, device: torch.device, precision: str, repeats: int,
                  warmup: int = 2) -> dict[str, float]:
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(warmup + repeats):
        for name, cls in VARIANTS.items():
            set_attention(model, cls)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(round_)
            sync()
            t0 = time.perf_counter()
            step(model, batch, device, precision)
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    set_attention(model, RelPositionMultiHeadedAttention)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text_len", type=int, default=40)
    ap.add_argument("--speech_lens", default="100,300,600", help="speech tokens per utterance (50 Hz), one row each")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="32-true", choices=["32-true", "16-mixed", "bf16-mixed"])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    model = build_llm().to(device).train()
    n_attn = set_attention(model, RelPositionMultiHeadedAttention)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cpus,"\
        f" {torch.get_num_threads()} torch threads)"
    print(f"attention step time (forward + backward) of conf/model/llm_v1_small.yaml ({n_attn} rel-pos attention"
          f" layers), batch {args.batch}, text {args.text_len} tokens, {args.precision}, {where},"
          f" median of {args.repeats}")
    print(f"{'speech':>6} {'seq':>5} {'variant':<10} {'ms/step':>9} {'x naive':>8} {'|dloss|':>9}"
          f" {'max rel dgrad':>13}")
    for speech_len in [int(x) for x in args.speech_lens.split(",")]:
        batch = make_batch(args.batch, args.text_len, speech_len, device)
        agree = agreement(model, batch, device, args.precision)
        times = time_variants(model, batch, device, args.precision, args.repeats)
        seq = args.text_len + speech_len + 2  # sos/eos + task id around the text, as the LM sees it
        for name in VARIANTS:
            dloss, dgrad = agree[name]
            print(f"{speech_len:>6} {seq:>5} {name:<10} {1e3 * times[name]:>9.1f} {times['naive'] / times[name]:>8.2f}"
                  f" {dloss:>9.1e} {dgrad:>13.1e}")
    print("x naive = naive ms / variant ms (>1: faster than the plain code); |dloss|, max rel dgrad = against"
          " cosytrain in eval mode (dropout off): largest |grad difference| / largest |grad| of the model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
