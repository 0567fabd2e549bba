"""LoRA against full SFT on the same CosyVoice2-architecture LLM and the same batches.

Both variants are ``LLMTask``s of the same Qwen2LM (one ``llm.pt`` as ``init_from``): ``full`` trains
every weight, ``lora`` rank-``--rank`` adapters on the attention and MLP projections (the recipes'
targets). A step is what training does: forward (the training layout), backward, grad clip 5, AdamW
step, zero grads; python's and torch's RNGs are re-seeded per step so both see the same layouts.

Columns: ``trainable M`` parameters that train; ``ms/step`` the median timed step, measured with
the two variants ALTERNATING in one process (the machine may be shared: a slow spell hits both);
``x full`` the speed ratio (full's time / this one's: above 1 is faster); ``peak MB`` the peak of a
fresh subprocess per variant (CPU: its maximum RSS, model and batches included; CUDA:
``torch.cuda.max_memory_allocated``); ``state MB`` weights + gradients + optimizer state, counted from
the tensors; ``ckpt MB`` the Lightning checkpoint the task writes (state dict after the task's
``on_save_checkpoint``, which drops the frozen base under LoRA, plus the optimizer state); ``x`` each
against full.

    python bench/lora.py [--size tiny|small|official] [--rank 16] [--batch 4] [--text_len 40]
                         [--speech_len 150] [--steps 8] [--warmup 2] [--device auto|cpu|cuda] [--threads 1]

``official`` is the Qwen2.5-0.5B backbone of CosyVoice2-0.5B (896 wide, 24 layers, 151936 text ids,
6561 speech tokens): meant for a GPU. On CUDA the step runs under BF16 autocast.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 257, "speech": 256},
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 4096, "speech": 1024},
    "official": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2, "vocab_size": 151936, "speech": 6561},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("full", "lora")


def build_base(size: str, folder: Path) -> tuple[torch.nn.Module, int]:
    """A Qwen2LM of ``size`` with seeded random weights; its llm.pt saved in ``folder`` (the init_from)."""
    from cosytrain.models.llm import Qwen2Encoder, Qwen2LM
    from cosytrain.models.sampling import ras_sampling

    spec = dict(SIZES[size])
    speech = spec.pop("speech")
    qwen = folder / "qwen"
    qwen.mkdir(parents=True, exist_ok=True)
    (qwen / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
        "attention_dropout": 0.0, "use_sliding_window": False, "initializer_range": 0.02, "torch_dtype": "float32",
        **spec}))
    torch.manual_seed(0)
    llm = Qwen2LM(spec["hidden_size"], spec["hidden_size"], speech, Qwen2Encoder(str(qwen)), ras_sampling)
    if not (folder / "llm.pt").is_file():
        torch.save(llm.state_dict(), folder / "llm.pt")
    return llm, speech


def batches(n: int, size: str, batch: int, text_len: int, speech_len: int, speech: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        t = torch.randint(text_len * 3 // 4, text_len + 1, (batch,), generator=g)
        s = torch.randint(speech_len * 3 // 4, speech_len + 1, (batch,), generator=g)
        out.append({"text_token": torch.randint(1, SIZES[size]["vocab_size"], (batch, int(t.max())), generator=g),
                    "text_token_len": t.int(), "speech_token": torch.randint(0, speech, (batch, int(s.max())),
                                                                             generator=g),
                    "speech_token_len": s.int()})
    return out


def make_task(variant: str, args: argparse.Namespace, folder: Path) -> tuple[Any, Any]:
    from cosytrain.tasks.optim import build_optimization
    from cosytrain.tasks.speech_task import LLMTask

    llm, _ = build_base(args.size, folder)
    lora = {"llm": {"r": args.rank, "alpha": 2 * args.rank, "target_modules": TARGETS}} if variant == "lora" else None
    conf = {"optim": "adamw", "optim_conf": {"lr": 1e-4, "weight_decay": 0.0}, "scheduler": "constantlr",
            "grad_clip": 5}
    task = LLMTask(llm=llm, init_from=str(folder), train_conf=conf, lora=lora).to(args.device).train()
    optimizer = build_optimization([p for p in task.parameters() if p.requires_grad], task.train_conf)["optimizer"]
    return task, optimizer


def step(task: Any, optimizer: Any, batch: dict[str, Any], index: int, device: torch.device) -> float:
    random.seed(index)
    torch.manual_seed(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = task.llm(batch, device)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in task.parameters() if p.grad is not None], 5.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def state_bytes(task: Any, optimizer: Any) -> int:
    """Weights + gradients (those that train) + optimizer state, in bytes."""
    weights = sum(t.numel() * t.element_size() for t in {id(p): p for p in task.parameters()}.values())
    grads = sum(p.numel() * p.element_size() for p in task.parameters() if p.requires_grad)
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor))
    return weights + grads + moments


def checkpoint_bytes(task: Any, optimizer: Any) -> int:
    ckpt: dict[str, Any] = {"state_dict": task.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    task.on_save_checkpoint(ckpt)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return len(buffer.getvalue())


def child(args: argparse.Namespace) -> None:
    """One variant in its own process: peak memory, training state and checkpoint size."""
    device = torch.device(args.device)
    folder = Path(args.folder)
    task, optimizer = make_task(args.child, args, folder)
    data = batches(args.warmup + args.steps, args.size, args.batch, args.text_len, args.speech_len,
                   SIZES[args.size]["speech"])
    data = [{k: v.to(device) for k, v in b.items()} for b in data]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(data):
        step(task, optimizer, batch, i, device)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"peak": peak, "state": state_bytes(task, optimizer), "ckpt": checkpoint_bytes(task, optimizer),
                      "trainable": sum(p.numel() for p in task.parameters() if p.requires_grad),
                      "total": sum(p.numel() for p in task.parameters())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text_len", type=int, default=40)
    p.add_argument("--speech_len", type=int, default=150)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=VARIANTS)
    p.add_argument("--folder")
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="cosytrain-bench-lora-") as tmp:
        folder = Path(tmp)
        device = torch.device(args.device)
        measured: dict[str, dict[str, Any]] = {}
        for variant in VARIANTS:  # memory and checkpoints: a fresh process each
            cmd = [sys.executable, __file__, "--child", variant, "--folder", tmp] + [
                f"--{k}={getattr(args, k)}" for k in ("size", "rank", "batch", "text_len", "speech_len", "steps",
                                                      "warmup", "device", "threads")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            measured[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        tasks = {v: make_task(v, args, folder) for v in VARIANTS}  # timing: both in this process, alternating
        data = batches(args.warmup + args.steps, args.size, args.batch, args.text_len, args.speech_len,
                       SIZES[args.size]["speech"])
        data = [{k: v.to(device) for k, v in b.items()} for b in data]
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i, batch in enumerate(data):
            order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                seconds = step(*tasks[variant], batch, i, device)
                if i >= args.warmup:
                    times[variant].append(seconds)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} torch thread(s)"
    print(f"LoRA vs full SFT: Qwen2LM '{args.size}' ({measured['full']['total'] / 1e6:.1f}M parameters), batch"
          f" {args.batch} x (<= {args.text_len} text + <= {args.speech_len} speech tokens), {args.steps} timed steps"
          f" after {args.warmup}, {name}, torch {torch.__version__}{', bf16 autocast' if device.type == 'cuda' else ''}")
    print(f"{'variant':<9}{'trainable M':>12}{'ms/step':>10}{'x full':>8}{'peak MB':>10}{'x':>6}{'state MB':>10}"
          f"{'x':>6}{'ckpt MB':>10}{'x':>8}")
    full = measured["full"]
    full_ms = statistics.median(times["full"]) * 1e3
    for variant in VARIANTS:
        m, ms = measured[variant], statistics.median(times[variant]) * 1e3
        label = variant if variant == "full" else f"lora r{args.rank}"
        print(f"{label:<9}{m['trainable'] / 1e6:>12.3f}{ms:>10.1f}{full_ms / ms:>8.2f}{m['peak'] / 2**20:>10.0f}"
              f"{m['peak'] / full['peak']:>6.2f}{m['state'] / 2**20:>10.1f}{m['state'] / full['state']:>6.2f}"
              f"{m['ckpt'] / 2**20:>10.2f}{m['ckpt'] / full['ckpt']:>8.3f}")


if __name__ == "__main__":
    main()
