"""Padding invariance of batched speech tokenization at the OFFICIAL tokenizer sizes, and its speed.

For each of s3tokenizer's v1 (50 Hz), v1_25hz, v2 and v3 models (1280 wide, 6 / 6 / 6 / 12 layers,
random weights from ``tools/s3tokenizer_random.py``; nothing downloaded), N utterances of random
length are tokenised one at a time (upstream's extraction) and in length-sorted padded batches, by
the PyTorch model and by its ONNX export through cosytrain's ``OnnxSpeechTokenizer`` path. Printed per
version: tokens compared, tokens that differ (batched vs one at a time, ONNX vs PyTorch), the largest
hidden-state difference (batched vs one at a time), distinct tokens (a flip could only show if the
tokens vary), and the batched speed-up (same run, same threads).

    python bench/tokenizer_padding.py [--versions v1,v1_25hz,v2,v3] [--utts 24] [--batch 8] [--threads 1]
                                      [--small] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("s3tokenizer_random", ROOT / "tools" / "s3tokenizer_random.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _batches(lens: list[int], size: int) -> list[list[int]]:
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    return [order[b:b + size] for b in range(0, len(order), size)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", default="v1,v1_25hz,v2,v3")
    ap.add_argument("--utts", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="256 wide, 2 layers (what CI tests) instead of official")
    ap.add_argument("--device", default="cpu", help="device of the PyTorch model (the ONNX runs on CPU)")
    ap.add_argument("--no_onnx", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import onnxruntime as ort

    tool = _tool()
    g = torch.Generator().manual_seed(1)
    lens = [int(x) for x in torch.randint(50, 600, (a.utts,), generator=g)]  # 0.5-6 s of 100 Hz frames
    mels = [torch.randn(128, n, generator=g) for n in lens]
    print(f"tokenizer padding invariance, {'small' if a.small else 'official'} sizes, {a.utts} utterances of "
          f"{min(lens) / 100:.1f}-{max(lens) / 100:.1f} s, batches of {a.batch}, {a.threads} thread(s), "
          f"torch on {a.device}")
    print(f"{'version':8} {'tokens':>7} {'distinct':>8} {'pt b!=1':>8} {'max|dh|':>9} {'onnx b!=1':>9} "
          f"{'onnx!=pt':>8} {'pt x':>6} {'onnx x':>6}")
    tmp = Path(tempfile.mkdtemp(prefix="tokpad-"))
    for version in a.versions.split(","):
        model = tool.build_s3(version, small=a.small).to(a.device)
        dev = lambda t: t.to(a.device)  # noqa: E731
        with torch.inference_mode():
            t0 = time.perf_counter()
            single = [model.quantize(dev(m[None]), dev(torch.tensor([m.shape[1]])))[0][0].cpu().tolist() for m in mels]
            h_single = [model.encoder(dev(m[None]), dev(torch.tensor([m.shape[1]])))[0][0].cpu() for m in mels]
            t_single = time.perf_counter() - t0
            batched: list = [None] * len(mels)
            dh = 0.0
            t0 = time.perf_counter()
            for idx in _batches(lens, a.batch):
                n = torch.tensor([lens[i] for i in idx], dtype=torch.int32)
                feats = torch.zeros(len(idx), 128, int(n.max()))
                for j, i in enumerate(idx):
                    feats[j, :, :lens[i]] = mels[i]
                codes, code_len = model.quantize(dev(feats), dev(n))
                hidden, hid_len = model.encoder(dev(feats), dev(n))
                for j, i in enumerate(idx):
                    batched[i] = codes[j, :int(code_len[j])].cpu().tolist()
                    dh = max(dh, float((hidden[j, :int(hid_len[j])].cpu() - h_single[i]).abs().max()))
            t_batch = time.perf_counter() - t0
        total = sum(len(s) for s in single)
        differ = lambda x, y: sum(p != q for s, b in zip(x, y) for p, q in zip(s, b)) + sum(  # noqa: E731
            abs(len(s) - len(b)) for s, b in zip(x, y))
        row = f"{version:8} {total:7d} {len(set(sum(single, []))):8d} {differ(batched, single):8d} {dh:9.1e}"
        if a.no_onnx:
            print(row + f" {'-':>9} {'-':>8} {t_single / t_batch:6.2f} {'-':>6}")
            continue
        path = tool.export_onnx(model.cpu(), tmp / f"{version}.onnx")
        opt = ort.SessionOptions()
        opt.intra_op_num_threads, opt.inter_op_num_threads = a.threads, 1
        sess = ort.InferenceSession(str(path), opt, providers=["CPUExecutionProvider"])
        stride = 2 if version == "v1" else 4

        def run(idx: list[int]) -> list[list[int]]:
            n = np.asarray([lens[i] for i in idx], np.int32)
            feats = np.zeros((len(idx), 128, int(n.max())), np.float32)
            for j, i in enumerate(idx):
                feats[j, :, :lens[i]] = mels[i].numpy()
            out = sess.run(None, {"feats": feats, "feats_length": n})[0]
            return [out[j, :-(-int(n[j]) // stride)].tolist() for j in range(len(idx))]

        t0 = time.perf_counter()
        o_single = [run([i])[0] for i in range(len(mels))]
        t_osingle = time.perf_counter() - t0
        o_batched: list = [None] * len(mels)
        t0 = time.perf_counter()
        for idx in _batches(lens, a.batch):
            for i, toks in zip(idx, run(idx)):
                o_batched[i] = toks
        t_obatch = time.perf_counter() - t0
        print(row + f" {differ(o_batched, o_single):9d} {differ(o_single, single):8d} {t_single / t_batch:6.2f}"
              f" {t_osingle / t_obatch:6.2f}", flush=True)
    print("pt b!=1 / onnx b!=1: tokens that differ between padded batches and one utterance at a time; "
          "onnx!=pt: ONNX one at a time vs PyTorch one at a time; x: one-at-a-time time / batched time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
