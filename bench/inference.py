"""Inference speed per stage, FP16 autocast against FP32: real-time factor (RTF) and peak memory.

Each precision runs in a fresh subprocess (its own peak memory). The parts are the small demo
models (``conf/model/{llm,flow,hift}_v1_small.yaml``, random weights: speed does not depend on what
the weights say) or, with ``--model_dir``, an exported model directory. Per stage:

* ``llm``: ``inference`` generating exactly ``--tokens`` speech tokens (min = max token/text ratio);
* ``flow``: ``inference`` from those tokens to mel (10 Euler steps with CFG, as upstream);
* ``hift``: ``inference`` from that mel to the waveform.

RTF = seconds spent / seconds of audio produced (< 1 is faster than real time). ``x fp32`` is the
FP32 time over this row's time (> 1: faster than FP32). FP16 is autocast, as upstream's ``fp16``
flag does it (cosytrain keeps the numerically sensitive ops FP32 inside the models). On CUDA a
``bf16`` row is added. On this CPU FP16 is expected to be slower: CPUs without FP16 matmul units
only pay for the casts; the figures that matter come from a lent GPU.

    python bench/inference.py [--model_dir DIR] [--tokens 200] [--repeats 3] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _small_part(name: str) -> Any:
    """A part from conf/model/<name>.yaml, built the way LightningCLI builds it."""
    import yaml

    from cosytrain.tasks.part_config import instantiate_part

    return instantiate_part(yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()))


def _parts(model_dir: str | None, device: Any) -> dict[str, Any]:
    if model_dir:
        from cosytrain.modeldir import load_model_dir

        directory, parts = load_model_dir(model_dir)
        if directory.generation != "v1":
            raise SystemExit(f"{model_dir}: this benchmark drives the CosyVoice 1 interfaces; got {directory.generation}")
    else:
        import torch

        torch.manual_seed(0)
        parts = {p: _small_part(f"{p}_v1_small") for p in ("llm", "flow", "hift")}
    return {k: v.to(device).eval() for k, v in parts.items()}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in the child: time each stage ``args.repeats`` times (after one warm-up), report the median."""
    import contextlib

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    parts = _parts(args.model_dir, device)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    llm, flow, hift = parts["llm"], parts["flow"], parts["hift"]
    text_len = 10
    ratio = args.tokens / text_len
    text = torch.randint(1, 200, (1, text_len), device=device)
    empty_tokens = torch.zeros(1, 0, dtype=torch.int32, device=device)
    embedding = torch.randn(1, 192, device=device)
    lens = lambda x: torch.tensor([x.shape[1]], dtype=torch.int32, device=device)  # noqa: E731

    def run_llm() -> torch.Tensor:
        with autocast():
            out = list(llm.inference(text=text, text_len=lens(text), prompt_text=empty_tokens,
                                     prompt_text_len=lens(empty_tokens), prompt_speech_token=empty_tokens,
                                     prompt_speech_token_len=lens(empty_tokens), embedding=embedding,
                                     max_token_text_ratio=ratio, min_token_text_ratio=ratio))
        return torch.tensor([out], dtype=torch.int32, device=device)

    def run_flow(tokens: torch.Tensor) -> torch.Tensor:
        with autocast():
            mel, _ = flow.inference(token=tokens, token_len=lens(tokens), prompt_token=empty_tokens,
                                    prompt_token_len=lens(empty_tokens),
                                    prompt_feat=torch.zeros(1, 0, 80, device=device),
                                    prompt_feat_len=torch.tensor([0], dtype=torch.int32, device=device),
                                    embedding=embedding, flow_cache=torch.zeros(1, 80, 0, 2, device=device))
        return mel.float()

    def run_hift(mel: torch.Tensor) -> torch.Tensor:
        with autocast():
            speech, _ = hift.inference(speech_feat=mel)
        return speech

    def timed(fn: Any, *a: Any) -> tuple[float, Any]:
        seconds = []
        out = None
        for i in range(args.repeats + 1):  # the first run warms up (allocator, kernels)
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = fn(*a)
            _sync(device)
            if i:
                seconds.append(time.perf_counter() - t0)
        return sorted(seconds)[len(seconds) // 2], out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_llm, tokens = timed(run_llm)
    t_flow, mel = timed(run_flow, tokens)
    t_hift, speech = timed(run_hift, mel)
    audio_s = speech.shape[-1] / float(getattr(hift, "sampling_rate", 22050))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    finite = bool(torch.isfinite(mel).all() and torch.isfinite(speech).all())
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "tokens": int(tokens.shape[1]), "audio_s": audio_s, "llm": t_llm, "flow": t_flow, "hift": t_hift,
            "peak_mb": peak, "finite": finite}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_dir", default=None, help="an exported CosyVoice 1 model directory (default: small demo parts)")
    ap.add_argument("--tokens", type=int, default=200, help="speech tokens to generate (200 = 4 s at 50 Hz)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child, args)))
        return 0

    import torch

    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    precisions = ["fp32", "fp16"] + (["bf16"] if cuda else [])
    rows = []
    for precision in precisions:
        cmd = [sys.executable, __file__, "--child", precision, "--tokens", str(args.tokens), "--repeats",
               str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
        if args.model_dir:
            cmd += ["--model_dir", args.model_dir]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append((precision, json.loads(out.strip().splitlines()[-1])))
    base = rows[0][1]
    print(f"inference, {base['device']}, {base['tokens']} speech tokens = {base['audio_s']:.2f} s of audio, "
          f"median of {args.repeats} after a warm-up; parts: {args.model_dir or 'conf/model/*_v1_small.yaml'}")
    print(f"{'precision':<9} {'stage':<5} {'seconds':>8} {'RTF':>7} {'x fp32':>7} {'peak MB':>8} {'finite':>6}")
    for precision, r in rows:
        for stage in ("llm", "flow", "hift"):
            print(f"{precision:<9} {stage:<5} {r[stage]:>8.3f} {r[stage] / r['audio_s']:>7.3f} "
                  f"{base[stage] / r[stage]:>7.2f} {r['peak_mb']:>8.0f} {str(r['finite']):>6}")
    print("RTF = seconds / seconds of audio; x fp32 > 1 means faster than FP32; peak MB: process RSS on CPU, "
          "torch.cuda.max_memory_allocated on CUDA")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
