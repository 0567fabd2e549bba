"""Training throughput per stage (llm, flow): utterances/s, speech frames/s, peak memory, FP32 vs FP16.

Each (stage, precision) runs in a fresh subprocess (its own peak memory) through the real training
path: the small demo model configs (``conf/model/{llm,flow}_v1_small.yaml``), ``LLMTask``/``FlowTask``
and a Trainer from ``build_trainer`` -- so ``16-mixed`` is FP16 autocast + GradScaler through
cosytrain's precision plugin, on CPU too. Batches come from the demo corpus (dynamic batching,
``--max_frames`` padded mel frames per batch) and are loaded into memory first: the data pipeline
has its own benchmark (``bench/data_pipeline.py``); this one measures the training step.

On CUDA it adds ``bf16-mixed`` and the share of the GPU's peak dense 16-bit FLOP/s reached (MFU):
the matmul/conv FLOPs of every timed step are counted with ``torch.utils.flop_counter.FlopCounterMode``
(a separate pass over the same batches) and divided by the timed seconds and the peak from
``PEAK_TFLOPS`` (matched against the device name; the row used is printed).

    python bench/train_throughput.py [--stages llm,flow] [--steps 20] [--warmup 3] [--device auto]
                                     [--data_list PATH] [--max_frames 2000] [--threads N]
                                     [--configs llm=conf/model/llm_v2.yaml] [--qwen_path bench/qwen2_0.5b]

``--configs llm=conf/model/llm_v2.yaml`` measures the official-size CosyVoice 2 LLM (Qwen2.5-0.5B
backbone, randomly initialised from ``bench/qwen2_0.5b/config.json``: speed does not depend on the
weights) on the same demo batches (50 Hz byte-text batches: token ids fit its vocabularies).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# dense (no sparsity) BF16/FP16 tensor-core peak, TFLOP/s, from the vendors' data sheets;
# the first key found in torch.cuda.get_device_name() wins, so specific names come first
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # same compute as H100 SXM, more/faster memory
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("T4", 65.0),
]


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return key, value
    return None


def build_part(stage: str, config: str | None = None, qwen_path: str | None = None) -> Any:
    """The part from ``config`` (default conf/model/<stage>_v1_small.yaml), built the way LightningCLI builds it.

    ``qwen_path`` replaces a Qwen2 backbone's ``pretrain_path`` (a folder with only ``config.json``
    builds a randomly initialised Qwen2 of that size: ``bench/qwen2_0.5b`` is Qwen2.5-0.5B's, the
    official CosyVoice 2/3 LLM size).
    """
    import yaml

    from cosytrain.tasks.part_config import instantiate_part

    path = Path(config) if config else REPO / "conf" / "model" / f"{stage}_v1_small.yaml"
    conf = yaml.safe_load((path if path.is_absolute() else REPO / path).read_text())
    backbone = conf.get("init_args", {}).get("llm", {})
    if qwen_path and isinstance(backbone, dict) and "pretrain_path" in backbone.get("init_args", {}):
        backbone["init_args"]["pretrain_path"] = str(qwen_path)
    return instantiate_part(conf)


def load_batches(data_list: str, n: int, max_frames: int) -> list[dict]:
    from cosytrain.data.datamodule import CosyDataModule

    dm = CosyDataModule(train_data=data_list, text_tokenizer="byte", speech_token_size=256, batch_type="dynamic",
                        max_frames_in_batch=max_frames, shuffle_size=100, sort_size=50, num_workers=0)
    dm.setup("fit")
    batches: list[dict] = []
    epoch = 0
    while len(batches) < n:
        loader = dm.train_dataloader()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches += list(loader)
        epoch += 1
    return batches[:n]


def _measure(stage: str, precision: str, device: str, steps: int, warmup: int, data_list: str,
             max_frames: int, config: str | None = None, qwen_path: str | None = None) -> dict[str, Any]:
    """Runs in the child process."""
    import lightning.pytorch as pl
    import torch

    from cosytrain.tasks.lightning_cli import build_trainer
    from cosytrain.tasks.speech_task import FlowTask, LLMTask

    batches = load_batches(data_list, warmup + steps, max_frames)
    torch.manual_seed(0)
    part = build_part(stage, config, qwen_path)
    train_conf = {"optim": "adam", "optim_conf": {"lr": 1e-3}, "scheduler": "constantlr", "grad_clip": 5}
    task = LLMTask(llm=part, train_conf=train_conf) if stage == "llm" else FlowTask(flow=part, train_conf=train_conf)
    cuda = device == "cuda"

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            if batch_idx == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    class Batches(pl.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, collate_fn=lambda b: b)

    timer = Timer()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer = build_trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=precision,
                            max_steps=warmup + steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[timer],
                            default_root_dir=tempfile.mkdtemp(prefix="cosytrain-bench-"))
    trainer.fit(task, datamodule=Batches())
    timed = batches[warmup:warmup + steps]
    seconds = sum(timer.times[warmup:])
    out: dict[str, Any] = {
        "stage": stage, "precision": precision, "steps": len(timer.times) - warmup, "seconds": seconds,
        "utts": sum(len(b["utts"]) for b in timed), "frames": int(sum(int(b["speech_feat_len"].sum()) for b in timed)),
        "skipped": task.skipped_steps,
        "params_m": sum(p.numel() for p in part.parameters()) / 1e6,
    }
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["train_mb"] = out["peak_mb"]  # counted from the first timed step (reset_peak_memory_stats)
        out["device_name"] = torch.cuda.get_device_name()
    else:
        # peak RSS includes torch, the batches and the model; what training itself adds is the rest
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["train_mb"] = out["peak_mb"] - rss_before
    out["flops"] = count_flops(part, timed, precision, "cuda" if cuda else "cpu")
    return out


def count_flops(part: Any, batches: list[dict], precision: str, device: str) -> float:
    """Matmul/conv FLOPs of forward + backward over ``batches`` under the run's autocast."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    part.train()
    total = 0
    for batch in batches:
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = part(batch, torch.device(device))["loss"]
        with counter:
            loss.backward()
        total += counter.get_total_flops()
        part.zero_grad(set_to_none=True)
    return float(total)


def _demo_list(arg: str | None) -> str:
    if arg:
        return arg
    from cosytrain.data.demo_corpus import ensure_demo_corpus

    return str(ensure_demo_corpus())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="llm,flow")
    ap.add_argument("--precisions", default="auto", help="comma list; auto = 32-true,16-mixed (+bf16-mixed on CUDA)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--data_list", help="data.list of v1 (50 Hz) shards; default: the demo corpus (built if absent)")
    ap.add_argument("--max_frames", type=int, default=2000, help="padded mel frames per dynamic batch")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--configs", default="", help="stage=model yaml, comma list (default conf/model/<stage>_v1_small.yaml),"
                    " e.g. llm=conf/model/llm_v2.yaml for the official CosyVoice 2 LLM")
    ap.add_argument("--qwen_path", default=str(REPO / "bench" / "qwen2_0.5b"),
                    help="Qwen2 folder replacing a config's pretrain_path (default: Qwen2.5-0.5B's config, random init)")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    configs = dict(item.split("=", 1) for item in args.configs.split(",") if item.strip())

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    data_list = _demo_list(args.data_list)
    if args.child:
        stage, precision = args.child
        result = _measure(stage, precision, device, args.steps, args.warmup, data_list, args.max_frames,
                          configs.get(stage), args.qwen_path)
        result["config"] = configs.get(stage, f"conf/model/{stage}_v1_small.yaml")
        print(json.dumps(result))
        return 0

    precisions = (["32-true", "16-mixed"] + (["bf16-mixed"] if device == "cuda" else [])
                  if args.precisions == "auto" else args.precisions.split(","))
    rows = []
    for stage in args.stages.split(","):
        for precision in precisions:
            cmd = [sys.executable, __file__, "--child", stage, precision, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--device", device, "--data_list", data_list, "--max_frames",
                   str(args.max_frames), "--threads", str(args.threads), "--configs", args.configs,
                   "--qwen_path", args.qwen_path]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            if done.returncode != 0:
                print(f"{stage} {precision}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    threads = args.threads or torch.get_num_threads()
    where = rows[0].get("device_name", "cpu") if rows else device
    print(f"training throughput, device {where} ({os.cpu_count()} cpus, {threads} torch threads),"
          f" {args.steps} timed steps after {args.warmup} warm-up, batches of <= {args.max_frames} mel frames")
    peak = peak_tflops(where) if device == "cuda" else None
    if device == "cuda":
        print(f"MFU against {peak[0]} dense BF16/FP16 peak {peak[1]:.0f} TFLOP/s" if peak
              else f"MFU: no peak known for {where!r}; add it to PEAK_TFLOPS")
    head = (f"{'stage':<5} {'precision':<10} {'params M':>8} {'s/step':>7} {'utt/s':>7} {'frames/s':>9} "
            f"{'x fp32':>6} {'peak MB':>8} {'train MB':>8} {'mem x':>6} {'TFLOP/s':>8}")
    print(head + (f" {'MFU %':>6}" if device == "cuda" else "") + f" {'skipped':>7}")
    base: dict[str, dict] = {}
    for r in rows:
        ref = base.setdefault(r["stage"], r)
        speed = r["utts"] / r["seconds"]
        tflops = r["flops"] / r["seconds"] / 1e12
        line = (f"{r['stage']:<5} {r['precision']:<10} {r['params_m']:>8.2f} {r['seconds'] / r['steps']:>7.3f} "
                f"{speed:>7.1f} {r['frames'] / r['seconds']:>9.0f} {speed / (ref['utts'] / ref['seconds']):>6.2f} "
                f"{r['peak_mb']:>8.0f} {r['train_mb']:>8.0f} {r['train_mb'] / max(ref['train_mb'], 1.0):>6.2f}"
                f" {tflops:>8.3f}")
        if device == "cuda":
            line += f" {100 * tflops / peak[1]:>6.2f}" if peak and r["stage"] == "llm" else f" {'-':>6}"
        print(line + f" {r['skipped']:>7}")
    for stage in dict.fromkeys(r["stage"] for r in rows):
        print(f"{stage}: {next(r['config'] for r in rows if r['stage'] == stage)}")
    print("x fp32 / mem x: against the same stage's first row (32-true); frames = mel frames (speech_feat_len);"
          " peak MB = " + ("torch.cuda.max_memory_allocated over the timed steps" if device == "cuda" else
                           "peak RSS of the process, train MB = what fit added to it (mem x is on train MB)")
          + "; TFLOP/s = matmul/conv FLOPs (FlopCounterMode) / timed seconds; skipped = non-finite steps skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
