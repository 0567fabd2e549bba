"""Reading, choosing and averaging the Lightning checkpoints an export is made from.

Each checkpoint's ``state_dict`` is split into parts by prefix
(:func:`cosytrain.export.part_split.split_parts`).

Choosing and averaging checkpoints
    Give checkpoint files, folders of them (``<run>/checkpoints``) or DeepSpeed ZeRO checkpoint
    folders (converted by :func:`cosytrain.export.zero_to_state_dict.consolidate`).
    ``--average best:N`` keeps the N with the best validation score, ``--average last:N`` the N with
    the highest ``global_step``; without ``--average`` every checkpoint given is averaged (one
    checkpoint: exported as is). Checkpoints with the same epoch and step (``last.ckpt`` beside the
    top-k file it copies) count once. The choice applies to each run separately when the
    checkpoints come from several runs (e.g. an llm+flow run and a vocoder run).

    Scores come from the checkpoints' own ``ModelCheckpoint`` callback state: ``best_k_models``
    (file name -> monitored value; every top-k checkpoint lists itself and the other kept ones,
    so files renamed or moved with their folder still match by name), the direction from the
    callback's ``mode``. A checkpoint not listed there is scored from its file name
    (``...-val_loss=0.123.ckpt``) when the monitored name appears in it. Several monitored
    metrics need ``--monitor``. Upstream's ``average_model.py`` reads the same numbers (validation
    loss per saved epoch) from its per-epoch yaml files.

    Floating tensors are averaged in float64 and cast back (FP16/BF16 weights are widened to
    float32, the dtype of upstream's own files); integer tensors must be equal in every checkpoint.

Checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import math
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cosytrain.evaluation.fp16_figures import figures_from_checkpoint
from cosytrain.export.errors import ExportError
from cosytrain.export.part_split import split_parts
from cosytrain.export.trained_weights import checkpoint_parts, lora_records
from cosytrain.modeldir import PARTS, ModelDirError, load_weights_file

__all__ = [
    "CheckpointInfo",
    "average_state_dicts",
    "read_checkpoint",
    "checkpoint_infos",
    "select_checkpoints",
]

# --------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------


def _is_deepspeed_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def _load_deepspeed(path: Path) -> dict[str, Any]:
    # imported here, not at the top: ``python -m cosytrain.export.zero_to_state_dict`` must not find
    # its own module already imported by this package's ``__init__``
    from cosytrain.export.zero_to_state_dict import consolidate

    with tempfile.TemporaryDirectory(prefix="cosytrain-zero-") as tmp:
        out = consolidate(path, Path(tmp) / "fp32.ckpt")
        return _load_checkpoint_file(out, str(path))


def _load_checkpoint_file(path: Path, what: str) -> dict[str, Any]:
    try:
        ckpt = load_weights_file(path, what)
    except ModelDirError as exc:
        message = str(exc)
        if "pickled" in message:
            message = (f"{what}: the checkpoint holds pickled Python objects, which torch.load(weights_only=True)"
                       " refuses; the Lightning module must save only plain values (str, numbers, lists, dicts,"
                       " tensors) in its hyperparameters and checkpoint hooks")
        raise ExportError(message) from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ExportError(f"{what}: not a Lightning checkpoint (no 'state_dict'); give a .ckpt from training"
                          " (an upstream llm.pt/flow.pt/hift.pt belongs in a model directory, see --base)")
    return dict(ckpt)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint (file, or DeepSpeed ZeRO folder) as a dict, read weights-only."""
    path = Path(path)
    if _is_deepspeed_dir(path):
        return _load_deepspeed(path)
    if not path.is_file():
        raise ExportError(f"{path}: checkpoint not found")
    return _load_checkpoint_file(path, str(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Choosing checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What selection needs to know about one checkpoint (its tensors are read again when averaging)."""

    path: Path
    epoch: int | None
    global_step: int | None
    parts: tuple[str, ...]
    # monitor -> (mode, {file name: score}) from this checkpoint's ModelCheckpoint states
    monitors: dict[str, tuple[str, dict[str, float]]] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    # the last FP16-vs-FP32 figures an FP16EvalCallback saved into this checkpoint
    fp16_figures: dict[str, Any] | None = None
    # LoRA checkpoints: part -> the base model directory the adapters were trained on (init_from)
    lora_bases: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def _model_checkpoint_states(ckpt: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """States of ModelCheckpoint and its subclasses (their keys start with the subclass name)."""
    callbacks = ckpt.get("callbacks") or {}
    if not isinstance(callbacks, Mapping):
        return []
    return [(str(k), v) for k, v in callbacks.items()
            if isinstance(v, Mapping) and "best_k_models" in v and "monitor" in v]


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


def _info_from(path: Path, ckpt: Mapping[str, Any]) -> CheckpointInfo:
    monitors: dict[str, tuple[str, dict[str, float]]] = {}
    for key, state in _model_checkpoint_states(ckpt):
        monitor = state.get("monitor")
        if not monitor:
            continue
        mode_match = re.search(r"'mode':\s*'(min|max)'", key)
        mode = mode_match.group(1) if mode_match else "min"
        scores = monitors.setdefault(str(monitor), (mode, {}))[1]
        for file, value in dict(state.get("best_k_models") or {}).items():
            score = _as_float(value)
            if score is not None:
                scores[Path(str(file)).name] = score
    hparams = ckpt.get("hyper_parameters")
    return CheckpointInfo(
        path=path,
        epoch=ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        global_step=ckpt.get("global_step") if isinstance(ckpt.get("global_step"), int) else None,
        parts=tuple(sorted(split_parts(ckpt["state_dict"], str(path)), key=PARTS.index)),
        monitors=monitors,
        hparams=dict(hparams) if isinstance(hparams, Mapping) else {},
        fp16_figures=figures_from_checkpoint(ckpt),
        lora_bases={part: str(record.get("init_from")) for part, record in lora_records(ckpt).items()},
    )


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not _is_deepspeed_dir(path):
            found = sorted(p for p in path.iterdir()
                           if p.name.endswith(".ckpt") and (p.is_file() or _is_deepspeed_dir(p)))
            if not found:
                raise ExportError(f"{path}: folder holds no .ckpt checkpoints")
            out += found
        elif path.exists():
            out.append(path)
        else:
            raise ExportError(f"{path}: checkpoint not found")
    unique: list[Path] = []
    for path in out:
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def checkpoint_infos(paths: Sequence[str | Path]) -> list[CheckpointInfo]:
    """Read the metadata of every checkpoint named (folders expanded)."""
    infos = []
    for path in _expand(paths):
        ckpt = read_checkpoint(path)
        infos.append(_info_from(path, ckpt))
        del ckpt
    return infos


def _dedupe(infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """One checkpoint per (epoch, step): ``last.ckpt`` repeats a top-k file of the same step."""
    kept: dict[Any, CheckpointInfo] = {}
    for info in infos:
        key = (info.epoch, info.global_step) if info.global_step is not None else info.path
        old = kept.get(key)
        if old is None or (old.name.startswith("last") and not info.name.startswith("last")):
            kept[key] = info
    return list(kept.values())


def _filename_score(name: str, monitor: str) -> float | None:
    for label in dict.fromkeys((monitor, monitor.replace("/", "_"), monitor.rsplit("/", 1)[-1])):
        match = re.search(rf"(?:^|[-_/]){re.escape(label)}=(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)", name)
        if match:
            return float(match.group(1))
    return None


# best:N without --monitor, when the checkpoints were kept by several metrics (e.g. val/loss and synth/full/mcd)
DEFAULT_MONITOR = "val/loss"


def _score(infos: list[CheckpointInfo], monitor: str | None) -> tuple[str, str]:
    """Fill ``info.score`` for best-N; returns (monitor, mode)."""
    monitors: dict[str, str] = {}
    for info in infos:
        for name, (mode, _) in info.monitors.items():
            monitors.setdefault(name, mode)
    if monitor is None and len(monitors) > 1:
        if DEFAULT_MONITOR not in monitors:
            raise ExportError(f"the checkpoints monitor several metrics ({', '.join(sorted(monitors))}); choose one"
                              " with --monitor")
        monitor = DEFAULT_MONITOR  # the documented default: best by validation loss unless --monitor says otherwise
    if monitor is None:
        if not monitors:
            raise ExportError("best:N needs validation scores, but no checkpoint has a ModelCheckpoint with a monitor;"
                              " train with ModelCheckpoint(monitor='val/loss', save_top_k=N) or use --average last:N")
        monitor = next(iter(monitors))
    mode = monitors.get(monitor, "min")
    known: dict[str, float] = {}
    for info in sorted(infos, key=lambda i: (i.global_step or -1)):  # later states override earlier ones
        known.update(info.monitors.get(monitor, (mode, {}))[1])
    for info in infos:
        info.score = known.get(info.name)
        if info.score is None:
            info.score = _filename_score(info.name, monitor)
    return monitor, mode


def select_checkpoints(infos: list[CheckpointInfo], average: str | None = None,
                       monitor: str | None = None) -> tuple[list[CheckpointInfo], dict[str, Any]]:
    """Apply ``average`` ('best:N', 'last:N' or None = all given) to one group of checkpoints."""
    if not infos:
        raise ExportError("no checkpoints to export")
    if average is None or average == "all":
        chosen = _dedupe(infos)
        return chosen, {"mode": "all", "n": len(chosen)}
    match = re.fullmatch(r"(best|last):(\d+)", average.strip())
    if not match or int(match.group(2)) < 1:
        raise ExportError(f"--average {average!r}: use best:N or last:N with N >= 1")
    kind, n = match.group(1), int(match.group(2))
    pool = _dedupe(infos)
    if kind == "last":
        if any(i.global_step is None for i in pool):
            missing = next(i for i in pool if i.global_step is None)
            raise ExportError(f"{missing.path}: has no global_step; last:N needs Lightning checkpoints")
        pool.sort(key=lambda i: (i.global_step, i.epoch or 0), reverse=True)
        if len(pool) < n:
            raise ExportError(f"--average last:{n}: only {len(pool)} distinct checkpoints given")
        return pool[:n], {"mode": "last", "n": n}
    monitor, mode = _score(pool, monitor)
    scored = [i for i in pool if i.score is not None]
    if len(scored) < n:
        unscored = [i.name for i in pool if i.score is None]
        raise ExportError(f"--average best:{n}: only {len(scored)} checkpoints have a {monitor} score"
                          + (f" (none for {', '.join(unscored[:3])})" if unscored else "")
                          + "; keep more with ModelCheckpoint(save_top_k=N) or ask for fewer")
    scored.sort(key=lambda i: (i.score if mode == "min" else -i.score, -(i.global_step or 0)))
    return scored[:n], {"mode": "best", "n": n, "monitor": monitor, "direction": mode}


# --------------------------------------------------------------------------------------------------
# Averaging
# --------------------------------------------------------------------------------------------------


class _Averager:
    """Running float64 sum of state dicts; integer tensors must agree. Shared tensors stay shared."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.first: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}  # key -> earlier key holding the same tensor
        self.first_name = ""

    def add(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        if self.count == 0:
            self.first_name = name
            seen: dict[tuple[Any, ...], str] = {}
            for key, value in state.items():
                ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                         tuple(value.stride()), value.dtype)
                if value.numel() and ident in seen:
                    self.aliases[key] = seen[ident]
                else:
                    seen[ident] = key
                self.first[key] = value
                if value.is_floating_point():
                    self.sums[key] = value.detach().to(torch.float64, copy=True)
        else:
            missing = [k for k in self.first if k not in state]
            extra = [k for k in state if k not in self.first]
            if missing or extra:
                detail = "; ".join(s for s in (
                    f"missing {', '.join(missing[:3])}" if missing else "",
                    f"extra {', '.join(extra[:3])}" if extra else "") if s)
                raise ExportError(f"{name}: its {self.what} keys differ from {self.first_name} ({detail}); only"
                                  " checkpoints of the same model can be averaged")
            for key, ref in self.first.items():
                value = state[key]
                if tuple(value.shape) != tuple(ref.shape):
                    raise ExportError(f"{name}: {self.what}.{key} has shape {list(value.shape)}, {self.first_name} has"
                                      f" {list(ref.shape)}; only checkpoints of the same model can be averaged")
                if key in self.sums:
                    if not value.is_floating_point():
                        raise ExportError(f"{name}: {self.what}.{key} is {value.dtype},"
                                          f" {self.first_name} has {ref.dtype}")
                    self.sums[key] += value.detach().to(torch.float64)
                elif not torch.equal(value, ref):
                    raise ExportError(f"{name}: integer tensor {self.what}.{key} differs from {self.first_name};"
                                      " integer tensors cannot be averaged, they must be equal")
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, ref in self.first.items():
            if key in self.aliases:
                out[key] = out[self.aliases[key]]
            elif key in self.sums:
                dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
                out[key] = (self.sums[key] / self.count).to(dtype).contiguous()
            else:
                out[key] = ref.clone().contiguous()
        return out


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None,
                        what: str = "state dict") -> dict[str, torch.Tensor]:
    """Element-wise mean (float64 accumulation) of state dicts with identical keys and shapes."""
    if not states:
        raise ExportError("nothing to average")
    averager = _Averager(what)
    for i, state in enumerate(states):
        averager.add(state, names[i] if names else f"state dict {i}")
    return averager.result()


# --------------------------------------------------------------------------------------------------
# Grouping by run
# --------------------------------------------------------------------------------------------------


def _group(infos: list[CheckpointInfo]) -> dict[tuple[str, ...], list[CheckpointInfo]]:
    groups: dict[tuple[str, ...], list[CheckpointInfo]] = {}
    for info in infos:
        groups.setdefault(info.parts, []).append(info)
    owner: dict[str, tuple[str, ...]] = {}
    for parts, members in groups.items():
        for part in parts:
            if part in owner:
                a, b = groups[owner[part]][0], members[0]
                raise ExportError(f"{part} weights come from two kinds of checkpoint ({a.name} has"
                                  f" {'+'.join(a.parts)}, {b.name} has {'+'.join(b.parts)}); give one run per part")
            owner[part] = parts
    return groups


def _average_group(chosen: list[CheckpointInfo], weights: str = "auto", base: Any = None,
                   notes: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Average each part over ``chosen``; ``weights`` and LoRA merging per checkpoint (``trained_weights``).

    ``notes`` (when given) receives per part what was exported: ``weights`` (ema/raw), the LoRA
    ``lora`` record and, for a single checkpoint, peft's ``adapter_files``.
    """
    averagers = {part: _Averager(part) for part in chosen[0].parts}
    for info in chosen:
        found = checkpoint_parts(read_checkpoint(info.path), str(info.path), weights, base)
        for part, averager in averagers.items():
            averager.add(found.states[part], info.name)
            if notes is not None:
                note = notes.setdefault(part, {"weights": found.weights})
                if part in found.lora:
                    note["lora"] = found.lora[part]
                    note["adapter_files"] = found.adapter_files[part] if len(chosen) == 1 else None
        del found
    return {part: averager.result() for part, averager in averagers.items()}
