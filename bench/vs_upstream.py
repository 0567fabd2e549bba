"""cosytrain's training step against upstream CosyVoice's, side by side, on identical weights and batches.

One process holds both models: cosytrain's part built from ``conf/model/<stage>_v1[_small].yaml`` and
upstream's own class (``cosyvoice.llm.llm.TransformerLM``, ``cosyvoice.flow.flow.MaskedDiffWithXvec``
and their submodules) built from the same arguments, loaded with cosytrain's initial state dict
(strict). Every variant gets its own copy of the weights and its own Adam; each step reseeds the
RNGs to the same value for every variant (dropout masks, the flow's t and noise are drawn alike), runs
``part(batch, device)`` -> loss -> backward -> ``clip_grad_norm_(5)`` -> ``Adam.step``, exactly
upstream's ``train_utils`` step without its loop. Variants alternate step by step, so a shared,
noisy machine slows them alike; the table gives medians and ratios against ``upstream``.

Variants (``--variants``):

* ``upstream``: upstream's classes (needs upstream's source importable: run this with the upstream
  oracle's python and ``PYTHONPATH=.:../shared/upstream/CosyVoice:../shared/upstream/Matcha-TTS``;
  ``--python auto`` re-runs itself that way when the oracle venv built by ``.ci/upstream-env`` exists);
* ``cosytrain``: cosytrain's part, eager, as training runs it;
* ``compile``: cosytrain's part with ``torch.compile(dynamic=True)`` on its encoder(s) and, for the
  flow, its estimator (the code paths where the time goes; the parts' python around them stays eager);
  the first steps pay the compilation, reported apart (``compile s``);
* ``sdpa``: cosytrain's part with every relative-position attention layer computing through
  ``F.scaled_dot_product_attention`` with the position term as its additive mask (``bench/attention.py``'s
  variant, swapped in place).

Columns: ``ms/step`` median timed step; ``x upstream`` upstream's median / this one (> 1: faster);
``max |dloss|`` largest loss difference against ``upstream`` over the timed steps (the same numbers
or not); ``compile s`` the extra time of the warm-up steps over the median (compile only).

    python bench/vs_upstream.py [--stages llm,flow] [--size small|official] [--steps 10] [--warmup 2]
                                [--batch 8] [--threads 1] [--variants upstream,cosytrain,compile,sdpa]
                                [--device cpu|cuda|auto] [--python auto|current|PATH]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_SRC = REPO.parent / "shared" / "upstream"
COMPILE_DYNAMIC: bool | None = None  # --compile_dynamic: True, False or None (torch: static first, dynamic on a recompile)

# cosytrain class -> upstream class (the parts' state dicts are upstream's, so weights load strictly)
UPSTREAM_CLASSES = {
    "cosytrain.models.llm.TransformerLM": "cosyvoice.llm.llm.TransformerLM",
    "cosytrain.models.transformer.encoder.ConformerEncoder": "cosyvoice.transformer.encoder.ConformerEncoder",
    "cosytrain.models.transformer.encoder.TransformerEncoder": "cosyvoice.transformer.encoder.TransformerEncoder",
    "cosytrain.models.flow.flow.MaskedDiffWithXvec": "cosyvoice.flow.flow.MaskedDiffWithXvec",
    "cosytrain.models.flow.flow_matching.ConditionalCFM": "cosyvoice.flow.flow_matching.ConditionalCFM",
    "cosytrain.models.flow.decoder.ConditionalDecoder": "cosyvoice.flow.decoder.ConditionalDecoder",
    "cosytrain.models.flow.length_regulator.InterpolateRegulator": "cosyvoice.flow.length_regulator.InterpolateRegulator",
    "cosytrain.models.sampling.ras_sampling": "cosyvoice.utils.common.ras_sampling",
}


def _resolve(dotted: str) -> Any:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def build(node: Any, upstream: bool) -> Any:
    """A ``class_path``/``init_args`` tree -> modules, cosytrain's or upstream's classes."""
    if isinstance(node, dict) and "class_path" in node:
        path = UPSTREAM_CLASSES[node["class_path"]] if upstream else node["class_path"]
        kwargs = {k: build(v, upstream) for k, v in (node.get("init_args") or {}).items()}
        if upstream and "cfm_params" in kwargs:
            from omegaconf import DictConfig

            kwargs["cfm_params"] = DictConfig(kwargs["cfm_params"])  # upstream reads attributes
        return _resolve(path)(**kwargs)
    if isinstance(node, str) and node in UPSTREAM_CLASSES:  # a function given by name (sampling)
        return _resolve(UPSTREAM_CLASSES[node] if upstream else node)
    if isinstance(node, dict):
        return {k: build(v, upstream) for k, v in node.items()}
    if isinstance(node, list):
        return [build(v, upstream) for v in node]
    return node


def model_config(stage: str, size: str) -> dict:
    import yaml

    name = f"{stage}_v1{'_small' if size == 'small' else ''}.yaml"
    return yaml.safe_load((REPO / "conf" / "model" / name).read_text())


def make_batches(stage: str, conf: dict, n: int, batch: int, seed: int = 0) -> list[dict]:
    """Synthetic utterances with the demo's shape: text 20-40 tokens, speech 100-300 tokens (2 s-6 s)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    args = conf["init_args"]
    speech_vocab = int(args.get("speech_token_size") or args.get("vocab_size"))
    out = []
    for _ in range(n):
        text_len = torch.randint(20, 41, (batch,), generator=g)
        speech_len = torch.randint(100, 301, (batch,), generator=g)
        b: dict[str, Any] = {
            "text_token": torch.randint(0, int(args.get("text_token_size", 2)), (batch, int(text_len.max())), generator=g),
            "text_token_len": text_len.int(),
            "speech_token": torch.randint(0, speech_vocab, (batch, int(speech_len.max())), generator=g),
            "speech_token_len": speech_len.int(),
            "embedding": torch.randn(batch, 192, generator=g),
        }
        if stage == "flow":  # 50 Hz tokens, 22.05 kHz / 256 mel frames: ratio 1.72 (upstream's v1)
            feat_len = (speech_len.float() * 22050 / 256 / 50).long()
            b["speech_feat"] = torch.randn(batch, int(feat_len.max()), 80, generator=g)
            b["speech_feat_len"] = feat_len.int()
        out.append(b)
    return out


def _compile(part: Any, stage: str) -> Any:
    import torch

    # whole encoders fail in inductor under dynamic shapes (torch 2.9.1: sympy "Invalid NaN comparison" /
    # "cannot convert float infinity" in the relative-position slicing), so each encoder LAYER is compiled
    encoders = [part.text_encoder, part.llm] if stage == "llm" else [part.encoder]
    for encoder in encoders:
        for i, layer in enumerate(encoder.encoders):
            encoder.encoders[i] = torch.compile(layer, dynamic=COMPILE_DYNAMIC)
    if stage == "flow":
        part.decoder.estimator = torch.compile(part.decoder.estimator, dynamic=COMPILE_DYNAMIC)
    return part


def _sdpa(part: Any) -> Any:
    sys.path.insert(0, str(REPO / "bench"))
    from attention import SdpaRelPositionAttention  # noqa: E402  (bench/attention.py)

    from cosytrain.models.transformer.attention import RelPositionMultiHeadedAttention

    for module in part.modules():
        if type(module) is RelPositionMultiHeadedAttention:
            module.__class__ = SdpaRelPositionAttention
    return part


def variants(stage: str, conf: dict, names: list[str]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    base = build(conf, upstream=False)
    state = base.state_dict()
    parts: dict[str, Any] = {}
    for name in names:
        if name == "upstream":
            part = build(conf, upstream=True)
            part.load_state_dict(state, strict=True)
        else:
            part = copy.deepcopy(base)
            if name == "compile":
                part = _compile(part, stage)
            elif name == "sdpa":
                part = _sdpa(part)
            elif name != "cosytrain":
                raise SystemExit(f"unknown variant {name!r}")
        parts[name] = part.train()
    return parts


def _reseed(step: int) -> None:
    import random

    import numpy as np
    import torch

    torch.manual_seed(1000 + step)
    random.seed(1000 + step)
    np.random.seed(1000 + step)


def run_stage(stage: str, size: str, names: list[str], steps: int, warmup: int, batch: int,
              device: "torch.device") -> list[dict]:
    import torch

    conf = model_config(stage, size)
    parts = {n: p.to(device) for n, p in variants(stage, conf, names).items()}
    optims = {n: torch.optim.Adam(p.parameters(), lr=1e-3) for n, p in parts.items()}
    batches = make_batches(stage, conf, warmup + steps, batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in parts}
    losses: dict[str, list[float]] = {n: [] for n in parts}
    for step, b in enumerate(batches):
        for name, part in parts.items():
            _reseed(step)
            sync()
            t0 = time.perf_counter()
            loss = part(b, device)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(part.parameters(), 5.0)
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            sync()
            times[name].append(time.perf_counter() - t0)
            losses[name].append(float(loss))
    ref = "upstream" if "upstream" in parts else names[0]
    ref_ms = statistics.median(times[ref][warmup:]) * 1e3
    rows = []
    for name in parts:
        med = statistics.median(times[name][warmup:]) * 1e3
        dloss = max(abs(a - b) for a, b in zip(losses[name], losses[ref]))
        extra = sum(times[name][:warmup]) - warmup * med / 1e3
        rows.append({"stage": stage, "variant": name, "ms": med, "ratio": ref_ms / med, "dloss": dloss,
                     "compile_s": extra if name == "compile" else None,
                     "params": sum(p.numel() for p in parts[name].parameters()) / 1e6})
    return rows


def _oracle_python() -> Path | None:
    root = Path(os.environ.get("COSYTRAIN_VENV_ROOT", Path.home() / ".cache" / "cosytrain" / "ci"))
    found = sorted(root.glob("upstream-venv-*/bin/python"))
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="llm,flow")
    ap.add_argument("--size", choices=["small", "official"], default="small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when there is one)")
    ap.add_argument("--variants", default="upstream,cosytrain,compile,sdpa")
    ap.add_argument("--compile_dynamic", choices=["auto", "true", "false"], default="true",
                    help="torch.compile's dynamic= for the compile variant (auto: None)")
    ap.add_argument("--python", default="auto", help="auto: the upstream oracle venv if built; current; or a path")
    args = ap.parse_args(argv)
    if args.python != "current" and not os.environ.get("COSYTRAIN_BENCH_CHILD"):
        python = _oracle_python() if args.python == "auto" else Path(args.python)
        if python is not None and python.exists():
            env = dict(os.environ, COSYTRAIN_BENCH_CHILD="1", PYTHONPATH=os.pathsep.join(
                [str(REPO), str(UPSTREAM_SRC / "CosyVoice"), str(UPSTREAM_SRC / "Matcha-TTS")]))
            return subprocess.call([str(python), __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
        print("upstream oracle venv not found: running with this python (variant upstream needs upstream's source)")
    import torch

    global COMPILE_DYNAMIC
    COMPILE_DYNAMIC = {"auto": None, "true": True, "false": False}[args.compile_dynamic]
    torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        import cosyvoice  # noqa: F401
    except ImportError:
        if "upstream" in names:
            print("upstream's source is not importable: variant upstream left out, ratios against cosytrain")
            names.remove("upstream")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    rows = []
    for stage in args.stages.split(","):
        rows += run_stage(stage.strip(), args.size, names, args.steps, args.warmup, args.batch, device)
    ref = "upstream" if "upstream" in names else names[0]
    print(f"train step (forward, backward, clip 5, Adam) vs {ref}, {args.size} v1 parts, batch {args.batch}, FP32,"
          f" {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}"
          f" ({os.cpu_count()} cpus, {args.threads} torch threads),"
          f" torch {torch.__version__}, median of {args.steps} after {args.warmup} warm-up, variants alternating")
    print(f"{'stage':5s} {'variant':9s} {'params M':>8s} {'ms/step':>8s} {'x ' + ref:>11s} {'max |dloss|':>11s}"
          f" {'compile s':>9s}")
    for r in rows:
        comp = f"{r['compile_s']:9.1f}" if r["compile_s"] is not None else f"{'':9s}"
        print(f"{r['stage']:5s} {r['variant']:9s} {r['params']:8.2f} {r['ms']:8.1f} {r['ratio']:11.2f}"
              f" {r['dloss']:11.1e} {comp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
