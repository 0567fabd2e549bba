"""``python -m cosytrain export``: Lightning checkpoints -> an upstream-layout CosyVoice model directory.

Our tasks keep each trained part under the attribute ``llm``, ``flow`` or ``hift``, so a checkpoint's
``state_dict`` keys are ``llm.*`` / ``flow.*`` / ``hift.*`` (the vocoder's discriminator sits under
``discriminator.*`` and is never exported) and export is a prefix split. On top of that:

Choosing and averaging checkpoints
    Give checkpoint files, folders of them (``<run>/checkpoints``) or DeepSpeed ZeRO checkpoint
    folders (converted with Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``).
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

Where the rest comes from
    Parts not in the checkpoints come from ``--base DIR`` (an upstream model directory), whose yaml
    is reused verbatim. Without a base, every part must come from checkpoints and the config is
    rebuilt from the training run (LightningCLI's ``<run>/config.yaml``: the parts'
    ``class_path``/``init_args``) and written as upstream HyperPyYAML: ``cosyvoice.yaml``,
    ``cosyvoice2.yaml`` or ``cosyvoice3.yaml`` after the parts' classes (all three must be of one
    generation). The front-end keys are upstream's for that generation (whisper ``get_tokenizer``
    for v1; for v2/v3 ``get_qwen_tokenizer`` and a top-level ``qwen_pretrain_path: ''`` that the
    llm's ``Qwen2Encoder`` refers to, set by upstream's loader to ``<dir>/CosyVoice-BlankEN``); the
    v2/v3 ``feat_extractor`` takes the run's mel settings. For v2/v3 the Qwen folder the run's llm
    was built from (``pretrain_path``: config, tokenizer files, weights if it has them) is copied as
    ``CosyVoice-BlankEN`` (plus tokenizer files of a separate ``text_tokenizer_path``). A
    config-only folder (the tiny recipes') loads in cosytrain; upstream's ``from_pretrained`` needs
    weights in it.

    The text tokenizer the run's data module used is recorded in ``cosytrain.json`` as
    ``text_tokenizer`` (cosytrain's front end uses it); when it is not upstream's for the generation
    (the demo's ``byte``), the export warns, because upstream's front end would feed the LLM the
    wrong ids.

    Front-end files: the ONNX files, the built-in stand-ins and ``spk2info.pt`` (and a v2/v3
    ``CosyVoice-BlankEN`` folder) are copied from the base when present. The built-in stand-ins
    ``speech_tokenizer_builtin.npz`` / ``campplus_builtin.npz`` that ``prepare`` fitted beside the
    training shards' ``data.list`` (found through the runs' configs) are copied when the output has
    none, and when there is no ``spk2info.pt`` yet one is written from the shards'
    ``spk2embedding.pt``: ``{speaker: {'embedding': tensor (1, 192)}}``, each speaker's mean
    utterance embedding, upstream's layout, so ``inference_sft`` knows the training speakers.
    Exported jit/onnx/TensorRT files of the base are not copied: they hold the base's weights.

Safety
    Checkpoints are read with ``torch.load(weights_only=True)``. The output directory is built
    in a temporary sibling and renamed into place only after it has been loaded back strictly
    through :mod:`cosytrain.modeldir` and has synthesised one short utterance (byte-tokenised
    text -> speech tokens -> mel -> waveform, with the generation's token-level model) with finite
    numbers; otherwise the export fails and
    an existing directory is left as it was. ``cosytrain.json`` records the generation, the source
    checkpoints with their sha256, the averaging and the check.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import itertools
import io
import json
import math
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cosytrain.modeldir import (
    FRONT_END_FILES,
    GENERATION_NAMES,
    PARTS,
    ModelDirError,
    ModelDirectory,
    check_part_state_dict,
    load_model_dir,
    load_weights_file,
    open_model_dir,
)

__all__ = [
    "ExportError",
    "CheckpointInfo",
    "ExportResult",
    "average_state_dicts",
    "read_checkpoint",
    "split_parts",
    "checkpoint_infos",
    "select_checkpoints",
    "run_config_to_tree",
    "smoke_test",
    "smoke_test_v23",
    "speaker_info_from_shards",
    "export_model",
    "main",
]

METADATA_FILE = "cosytrain.json"
QWEN_DIR = "CosyVoice-BlankEN"
SPK2INFO_FILE = "spk2info.pt"
# The stand-in front ends ``cosytrain prepare`` fits and saves beside the shards' data.list.
BUILTIN_FRONT_END_FILES = ("speech_tokenizer_builtin.npz", "campplus_builtin.npz")
CONFIG_NAMES = {"v1": "cosyvoice.yaml", "v2": "cosyvoice2.yaml", "v3": "cosyvoice3.yaml"}
# The text tokenizer upstream's front end uses for each generation's written config.
UPSTREAM_TEXT_TOKENIZER = {"v1": "whisper", "v2": "qwen", "v3": "qwen3"}
# Keys of the Lightning module that are never exported (the vocoder's GAN discriminator).
_NEVER_EXPORTED = ("discriminator.",)


class ExportError(ValueError):
    """The export was refused or failed its check; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------


def _is_deepspeed_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def _load_deepspeed(path: Path) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:  # before importing Lightning (slow) to say so
        raise ExportError(f"{path}: is a DeepSpeed ZeRO checkpoint; converting it needs the deepspeed package;"
                          " pip install deepspeed, or export a Lightning .ckpt file")
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as exc:  # lightning itself missing
        raise ExportError(f"{path}: reading a DeepSpeed checkpoint needs lightning ({exc})") from None
    with tempfile.TemporaryDirectory(prefix="cosytrain-zero-") as tmp:
        out = Path(tmp) / "fp32.ckpt"
        try:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
        except ModuleNotFoundError as exc:
            raise ExportError(f"{path}: is a DeepSpeed ZeRO checkpoint; converting it needs the deepspeed package"
                              f" ({exc}); pip install deepspeed, or export a Lightning .ckpt file") from None
        except Exception as exc:  # deepspeed's converter fails in many ways on a broken folder
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{path}: cannot convert this DeepSpeed checkpoint ({first})") from None
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


def split_parts(state_dict: Mapping[str, Any], what: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{'llm.x': t}`` -> ``{'llm': {'x': t}}`` for the exportable parts.

    ``torch.compile``'s ``_orig_mod.`` segment is dropped; discriminator and other keys are ignored.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or key.startswith(_NEVER_EXPORTED):
            continue
        key = key.replace("_orig_mod.", "")
        head, _, rest = key.partition(".")
        if head in PARTS and rest:
            parts.setdefault(head, {})[rest] = value
    if not parts:
        shown = ", ".join(list(state_dict)[:3])
        raise ExportError(f"{what}: no llm./flow./hift. weights in the checkpoint (keys look like {shown});"
                          " export needs a checkpoint of a cosytrain task")
    return parts


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
    from cosytrain.evaluation.fp16_check import figures_from_checkpoint

    return CheckpointInfo(
        path=path,
        epoch=ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        global_step=ckpt.get("global_step") if isinstance(ckpt.get("global_step"), int) else None,
        parts=tuple(sorted(split_parts(ckpt["state_dict"], str(path)), key=PARTS.index)),
        monitors=monitors,
        hparams=dict(hparams) if isinstance(hparams, Mapping) else {},
        fp16_figures=figures_from_checkpoint(ckpt),
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


def _score(infos: list[CheckpointInfo], monitor: str | None) -> tuple[str, str]:
    """Fill ``info.score`` for best-N; returns (monitor, mode)."""
    monitors: dict[str, str] = {}
    for info in infos:
        for name, (mode, _) in info.monitors.items():
            monitors.setdefault(name, mode)
    if monitor is None:
        if len(monitors) > 1:
            raise ExportError(f"the checkpoints monitor several metrics ({', '.join(sorted(monitors))}); choose one"
                              " with --monitor")
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
# Config from a training run (no base directory)
# --------------------------------------------------------------------------------------------------

_CFM_CLASSES = {"cosyvoice.flow.flow_matching.ConditionalCFM", "cosyvoice.flow.flow_matching.CausalConditionalCFM"}


def _reverse_registry() -> dict[int, tuple[str, str]]:
    """id(cosytrain object) -> (kind, upstream name), for the objects that exist so far."""
    from cosytrain.models import registry

    out: dict[int, tuple[str, str]] = {}
    for kind, table in (("class", registry.CLASSES), ("function", registry.FUNCTIONS)):
        for upstream in table:
            try:
                obj = registry.resolve(upstream, kind)
            except Exception:  # not implemented yet, or an optional dependency missing
                continue
            out.setdefault(id(obj), (kind, upstream))
    return out


def _upstream_name(dotted: str, where: str, reverse: dict[int, tuple[str, str]]) -> tuple[str, str]:
    from cosytrain.models import registry

    if dotted in registry.CLASSES:
        return "class", dotted
    if dotted in registry.FUNCTIONS:
        return "function", dotted
    if dotted.startswith("cosytrain."):
        module_name, _, attr = dotted.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            obj = None
        if obj is not None and id(obj) in reverse:
            return reverse[id(obj)]
    raise ExportError(f"run config: {where}: {dotted} has no upstream CosyVoice equivalent, so no upstream yaml can"
                      " name it; export with --base DIR instead")


def run_config_to_tree(value: Any, where: str = "", reverse: dict[int, tuple[str, str]] | None = None) -> Any:
    """A part's LightningCLI config (``class_path``/``init_args``, nested) -> an upstream inert tree.

    Also accepts the reference fixtures' ``{'class': upstream name, ...}`` form. A string naming a
    known function (``cosytrain.models.sampling.ras_sampling``) becomes ``!name:``; a ``cfm_params``
    mapping becomes upstream's ``!new:omegaconf.DictConfig``.
    """
    from cosytrain.models.registry import fixture_config_to_tree
    from cosytrain.models.upstream_yaml import Name, New

    reverse = _reverse_registry() if reverse is None else reverse
    if isinstance(value, Mapping) and "class_path" in value:
        kind, upstream = _upstream_name(str(value["class_path"]), where, reverse)
        args = {**dict(value.get("init_args") or {}), **dict(value.get("dict_kwargs") or {})}
        kwargs = {str(k): run_config_to_tree(v, f"{where}.{k}", reverse) for k, v in args.items()}
        if upstream in _CFM_CLASSES and isinstance(kwargs.get("cfm_params"), dict):
            kwargs["cfm_params"] = New("omegaconf.DictConfig", [], {"content": kwargs["cfm_params"]})
        return (New if kind == "class" else Name)(upstream, [], kwargs)
    if isinstance(value, Mapping) and ("class" in value or "function" in value):
        return fixture_config_to_tree(dict(value))
    if isinstance(value, Mapping):
        return {str(k): run_config_to_tree(v, f"{where}.{k}", reverse) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [run_config_to_tree(v, f"{where}[{i}]", reverse) for i, v in enumerate(value)]
    if isinstance(value, str) and re.fullmatch(r"(cosytrain|cosyvoice|matcha)(\.\w+)+", value):
        try:
            kind, upstream = _upstream_name(value, where, reverse)
        except ExportError:
            return value
        if kind == "function":
            return Name(upstream, [], {})
    return value


def _find_run_config(path: Path) -> Path | None:
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _init_args(section: Any) -> Mapping[str, Any]:
    """``init_args`` of a LightningCLI ``class_path`` section, or the section itself."""
    if not isinstance(section, Mapping):
        return {}
    args = section.get("init_args", {}) if "class_path" in section else section
    return args if isinstance(args, Mapping) else {}


def _read_run_config(config_path: Path) -> Mapping[str, Any]:
    """A LightningCLI config.yaml, read with ``yaml.safe_load``."""
    import yaml

    try:
        data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ExportError(f"{config_path}: cannot read the run config ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise ExportError(f"{config_path}: has no 'model' section; is it LightningCLI's saved config?")
    return data


def _run_text_tokenizer(config_path: str) -> str | None:
    """The text tokenizer kind the run's data module used (``data.init_args.text_tokenizer``), if stated."""
    path = Path(config_path)
    if not path.is_file():
        return None
    value = _init_args(_read_run_config(path).get("data")).get("text_tokenizer")
    return value if isinstance(value, str) else None


def _part_configs_from_run(info: CheckpointInfo, run_configs: Sequence[Path]) -> tuple[dict[str, Any], str]:
    """The raw part configs for ``info.parts`` and where they were found.

    Looked up in the checkpoint's hyperparameters, then in each ``--run-config`` given, then in the
    ``config.yaml`` LightningCLI saved beside the checkpoint's folder; the first holding every part wins.
    """

    def pick(model_args: Mapping[str, Any]) -> dict[str, Any]:
        found = {}
        for part in info.parts:
            value = model_args.get(part, model_args.get("generator") if part == "hift" else None)
            if value is not None:
                found[part] = value
        return found

    found = pick(info.hparams)
    if len(found) == len(info.parts):
        return found, f"{info.path} hyper_parameters"
    discovered = _find_run_config(info.path)
    candidates = list(run_configs) + ([discovered] if discovered is not None else [])
    if not candidates:
        raise ExportError(f"{info.path}: cannot find the run's config.yaml (looked beside the checkpoint and one"
                          " folder up); pass --run-config RUN/config.yaml or --base DIR")
    for config_path in candidates:
        found = pick(_init_args(_read_run_config(config_path)["model"]))
        if len(found) == len(info.parts):
            return found, str(config_path)
    missing = [p for p in info.parts if p not in found]
    raise ExportError(f"{', '.join(map(str, candidates))}: no model config for {', '.join(missing)} (the parts of"
                      f" {info.path.name}); pass --run-config with that run's config.yaml, or --base DIR")


def _v1_config_tree(parts: Mapping[str, Any]) -> dict[str, Any]:
    """A complete upstream ``cosyvoice.yaml`` around the three part trees (front-end keys: upstream v1's)."""
    from cosytrain.models.upstream_yaml import Apply, Name

    hift_rate = parts["hift"].kwargs.get("sampling_rate", 22050)
    sample_rate = hift_rate if isinstance(hift_rate, int) else 22050
    return {
        "__set_seed1": Apply("random.seed", [1986]),
        "__set_seed2": Apply("numpy.random.seed", [1986]),
        "__set_seed3": Apply("torch.manual_seed", [1986]),
        "__set_seed4": Apply("torch.cuda.manual_seed_all", [1986]),
        "sample_rate": sample_rate,
        "llm": parts["llm"],
        "flow": parts["flow"],
        "hift": parts["hift"],
        "get_tokenizer": Name("whisper.tokenizer.get_tokenizer", [],
                              {"multilingual": True, "num_languages": 100, "language": "en", "task": "transcribe"}),
        "allowed_special": "all",
        "feat_extractor": Name("matcha.utils.audio.mel_spectrogram", [],
                               {"n_fft": 1024, "num_mels": 80, "sampling_rate": sample_rate, "hop_size": 256,
                                "win_size": 1024, "fmin": 0, "fmax": 8000, "center": False}),
    }


def _check_run_generations(parts: Mapping[str, Any], sources: Mapping[str, str], generation: str) -> None:
    """All three parts of a config written from runs must be of one generation."""
    from cosytrain.modeldir import _PART_CLASS_GENERATIONS

    for part, tree in parts.items():
        generations = _PART_CLASS_GENERATIONS.get(part, {}).get(getattr(tree, "target", ""), ())
        if generations and generation not in generations:
            found = " or ".join(GENERATION_NAMES[g] for g in generations)
            raise ExportError(f"{sources.get(part, part)}: the {part} is {tree.target} ({found}) but the other parts"
                              f" make a {GENERATION_NAMES[generation]} model; export parts of one generation")


def _v23_config_tree(parts: Mapping[str, Any], generation: str, data_args: Mapping[str, Any]) -> dict[str, Any]:
    """A complete upstream ``cosyvoice2.yaml``/``cosyvoice3.yaml`` around the three part trees.

    As upstream's files: a top-level ``qwen_pretrain_path: ''`` that the llm's ``Qwen2Encoder`` and the
    front end's ``get_qwen_tokenizer`` refer to; upstream's ``CosyVoice2``/``CosyVoice3`` (and
    cosytrain's reader) override it with ``<model dir>/CosyVoice-BlankEN``. The mel settings of
    ``feat_extractor`` are the run's data module's (the prompt mel must match the training mel).
    """
    from cosytrain.models.upstream_yaml import Apply, Name, Ref

    llm = parts["llm"]
    encoder = llm.kwargs.get("llm")
    if getattr(encoder, "target", None) != "cosyvoice.llm.llm.Qwen2Encoder":
        raise ExportError("run config: the llm has no Qwen2Encoder 'llm' argument; a CosyVoice 2/3 llm needs one")
    encoder.kwargs["pretrain_path"] = Ref("<qwen_pretrain_path>")
    flow = parts["flow"]
    hift_rate = parts["hift"].kwargs.get("sampling_rate", 24000)
    sample_rate = hift_rate if isinstance(hift_rate, int) else 24000
    ratio = flow.kwargs.get("token_mel_ratio", 2)

    def data(key: str, default: Any) -> Any:
        value = data_args.get(key, default)
        return value if value is None or isinstance(value, (int, float, bool)) else default

    tokenizer_kwargs: dict[str, Any] = {"token_path": Ref("<qwen_pretrain_path>"), "skip_special_tokens": True}
    if generation == "v3":
        tokenizer_kwargs["version"] = "cosyvoice3"
    return {
        "__set_seed1": Apply("random.seed", [1986]),
        "__set_seed2": Apply("numpy.random.seed", [1986]),
        "__set_seed3": Apply("torch.manual_seed", [1986]),
        "__set_seed4": Apply("torch.cuda.manual_seed_all", [1986]),
        "sample_rate": sample_rate,
        "llm_input_size": llm.kwargs.get("llm_input_size"),
        "llm_output_size": llm.kwargs.get("llm_output_size"),
        "spk_embed_dim": flow.kwargs.get("spk_embed_dim", 192),
        "qwen_pretrain_path": "",
        "token_frame_rate": flow.kwargs.get("input_frame_rate", 25),
        "token_mel_ratio": ratio,
        "llm": llm,
        "flow": flow,
        "hift": parts["hift"],
        "get_tokenizer": Name("cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer", [], tokenizer_kwargs),
        "allowed_special": "all",
        "feat_extractor": Name("matcha.utils.audio.mel_spectrogram", [], {
            "n_fft": data("n_fft", 1920), "num_mels": data("num_mels", 80), "sampling_rate": sample_rate,
            "hop_size": data("hop_size", 480), "win_size": data("win_size", 1920), "fmin": data("fmin", 0),
            "fmax": data("fmax", 8000 if generation == "v2" else None), "center": data("center", False)}),
    }


# --------------------------------------------------------------------------------------------------
# Files beside the weights: Qwen folder, built-in front ends, speakers
# --------------------------------------------------------------------------------------------------


def _run_config_paths(infos: Sequence[CheckpointInfo], run_configs: Sequence[Path]) -> list[Path]:
    """Every run config that belongs to the export: given ones first, then those beside the checkpoints."""
    found = [p for p in run_configs if p.is_file()]
    for info in infos:
        discovered = _find_run_config(info.path)
        if discovered is not None and discovered.resolve() not in {p.resolve() for p in found}:
            found.append(discovered)
    return found


def _data_args(config_path: Path) -> Mapping[str, Any]:
    """``data.init_args`` of a run config; {} when the file is not a readable LightningCLI config."""
    try:
        return _init_args(_read_run_config(config_path).get("data"))
    except ExportError:
        return {}


def _data_folders(config_paths: Sequence[Path]) -> list[Path]:
    """Folders of the runs' ``data.list`` files (train first), where ``prepare`` leaves its side files."""
    folders: list[Path] = []
    for config_path in config_paths:
        args = dict(_data_args(config_path))
        if not args.get("train_data") and "token_rate" in args:  # DemoDataModule: the demo cache's shards
            from cosytrain.data.demo_corpus import demo_shard_dir

            args["train_data"] = str(demo_shard_dir(args.get("root"), args["token_rate"]) / "data.list")
        for key in ("train_data", "val_data"):
            value = args.get(key)
            if isinstance(value, str) and value:
                folder = Path(value).parent
                if folder.is_dir() and folder.resolve() not in {f.resolve() for f in folders}:
                    folders.append(folder)
    return folders


def _save(obj: Any, path: Path) -> None:
    """``torch.save`` through memory: torch's file writer words a full disk as "unexpected pos";
    a plain write raises the OSError (ENOSPC) that ``atomic_directory`` turns into one clear line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())


def speaker_info_from_shards(spk2embedding_path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``spk2embedding.pt`` (speaker -> mean utterance embedding, as ``prepare`` writes it) in upstream's
    ``spk2info.pt`` layout: ``{speaker: {'embedding': float32 tensor (1, dim)}}``."""
    path = Path(spk2embedding_path)
    try:
        table = load_weights_file(path)
    except ModelDirError as exc:
        raise ExportError(str(exc)) from None
    if not isinstance(table, Mapping) or not table:
        raise ExportError(f"{path}: expected {{speaker: embedding}}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for spk, emb in table.items():
        vector = torch.as_tensor(emb, dtype=torch.float32).reshape(1, -1)
        if vector.shape[1] == 0 or not bool(torch.isfinite(vector).all()):
            raise ExportError(f"{path}: speaker {spk!r} has an empty or non-finite embedding")
        out[str(spk)] = {"embedding": vector}
    return out


def _qwen_folder(llm_tree: Any, run_source: str) -> Path:
    """The Qwen2 folder the run's llm was built from (``Qwen2Encoder.pretrain_path``)."""
    encoder = llm_tree.kwargs.get("llm") if hasattr(llm_tree, "kwargs") else None
    raw = encoder.kwargs.get("pretrain_path") if hasattr(encoder, "kwargs") else None
    if not isinstance(raw, str) or not raw:
        raise ExportError(f"{run_source}: the llm's Qwen2Encoder has no pretrain_path; cannot copy {QWEN_DIR}")
    path = Path(raw)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute() and run_source.endswith(".yaml"):
        candidates.append(Path(run_source).parent / path)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise ExportError(f"{run_source}: the llm's Qwen folder {raw} (pretrain_path) has no config.json here; run the"
                      f" export from the training's working directory or pass --base DIR with a {QWEN_DIR} folder")


def _copy_qwen_folder(source: Path, tokenizer_path: str | None, target: Path) -> list[str]:
    """Copy the Qwen config/tokenizer/weights folder; tokenizer files from a separate tokenizer folder too."""
    shutil.copytree(source, target)
    copied = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    if tokenizer_path:
        extra = Path(tokenizer_path)
        if extra.is_dir() and extra.resolve() != source.resolve():
            for file in sorted(extra.iterdir()):
                if file.is_file() and file.name.startswith(("tokenizer", "vocab", "merges", "special_tokens",
                                                            "added_tokens")) and not (target / file.name).exists():
                    shutil.copyfile(file, target / file.name)
                    copied.append(file.name)
    return copied


# --------------------------------------------------------------------------------------------------
# The synthesis check
# --------------------------------------------------------------------------------------------------

CHECK_TEXT = "Hello!"


def smoke_test(llm: torch.nn.Module, flow: torch.nn.Module, hift: torch.nn.Module, max_tokens: int = 25,
               seed: int = 0) -> dict[str, Any]:
    """Synthesise one short utterance on the CPU and raise if anything is not finite.

    Text: ``CHECK_TEXT`` through the built-in byte tokenizer (ids folded into the LLM's vocabulary),
    so no front-end files are needed; the check is about finite numbers, not intelligible speech.
    Also runs one teacher-forced LLM loss. The global RNG state is left as it was.
    """
    from cosytrain.data.text_tokenizer import ByteTokenizer
    from cosytrain.inference.model import CosyVoiceModel

    model = CosyVoiceModel(llm, flow, hift, device="cpu")
    text_vocab = int(llm.text_embedding.num_embeddings)
    speech_vocab = int(llm.speech_token_size)
    ids = [t % text_vocab for t in ByteTokenizer().encode(CHECK_TEXT)]
    text = torch.tensor([ids], dtype=torch.int32)

    def speaker(module: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(1, int(module.spk_embed_affine_layer.in_features)), dim=1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedding, flow_embedding = speaker(llm), speaker(flow)
        with torch.inference_mode():
            speech = torch.randint(0, speech_vocab, (1, 20))
            out = llm({"text_token": text.long(), "text_token_len": torch.tensor([text.shape[1]], dtype=torch.int32),
                       "speech_token": speech, "speech_token_len": torch.tensor([20], dtype=torch.int32),
                       "embedding": embedding}, torch.device("cpu"))
        loss = float(out["loss"])
        if not math.isfinite(loss):
            raise ExportError(f"check: the llm's teacher-forced loss is {loss}; the llm weights are broken")
        empty = torch.zeros(1, 0, dtype=torch.int32)
        try:
            tokens = list(itertools.islice(model.speech_tokens(text, empty, empty, embedding), max_tokens))
        except RuntimeError as exc:  # NaN scores make multinomial sampling fail
            raise ExportError(f"check: llm sampling failed ({str(exc).splitlines()[0]})") from None
        if not tokens:
            raise ExportError("check: the llm produced no speech tokens")
        try:
            result = list(model.tts(source_speech_token=torch.tensor([tokens], dtype=torch.int32),
                                    flow_embedding=flow_embedding))
        except (RuntimeError, IndexError, ValueError) as exc:  # e.g. llm tokens outside the flow's vocabulary
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"check: tokens -> mel -> wav failed ({first[:200]}); do the parts fit together?") from None
    wav = result[0]["tts_speech"]
    frames = int(len(tokens) / flow.input_frame_rate * model.sample_rate / model.mel_hop)
    if not bool(torch.isfinite(wav).all()):
        raise ExportError(f"check: the synthesised waveform has {int((~torch.isfinite(wav)).sum())} non-finite"
                          " samples; the flow or hift weights are broken")
    if wav.shape[-1] != frames * model.mel_hop:
        raise ExportError(f"check: expected {frames * model.mel_hop} samples, got {wav.shape[-1]}")
    return {"text": CHECK_TEXT, "text_tokens": len(ids), "speech_tokens": len(tokens), "mel_frames": frames,
            "samples": int(wav.shape[-1]), "sample_rate": model.sample_rate, "llm_loss": round(loss, 6),
            "peak": round(float(wav.abs().max()), 6), "finite": True}


def smoke_test_v23(llm: torch.nn.Module, flow: torch.nn.Module, hift: torch.nn.Module, generation: str,
                   max_tokens: int = 25, seed: int = 0) -> dict[str, Any]:
    """The CosyVoice 2/3 counterpart of :func:`smoke_test` (Qwen2 text table, causal flow, 24 kHz hift).

    Python's and torch's global RNG states are left as they were (the llm's training layout draws
    from python ``random``).
    """
    import random

    from cosytrain.data.text_tokenizer import ByteTokenizer
    from cosytrain.inference.model import CosyVoice2Model, CosyVoice3Model

    model = (CosyVoice3Model if generation == "v3" else CosyVoice2Model)(llm, flow, hift, device="cpu")
    text_vocab = int(llm.llm.model.get_input_embeddings().num_embeddings)
    speech_vocab = int(llm.speech_token_size)
    ids = [t % text_vocab for t in ByteTokenizer().encode(CHECK_TEXT)]
    text = torch.tensor([ids], dtype=torch.int32)
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            embedding = torch.nn.functional.normalize(
                torch.randn(1, int(flow.spk_embed_affine_layer.in_features)), dim=1)
            with torch.inference_mode():
                speech = torch.randint(0, speech_vocab, (1, 20))
                batch = {"text_token": text.long(),
                         "text_token_len": torch.tensor([text.shape[1]], dtype=torch.int32),
                         "speech_token": speech, "speech_token_len": torch.tensor([20], dtype=torch.int32),
                         "embedding": embedding}
                out = llm(batch, torch.device("cpu"))
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise ExportError(f"check: the llm's teacher-forced loss is {loss}; the llm weights are broken")
            empty = torch.zeros(1, 0, dtype=torch.int32)
            try:
                tokens = list(itertools.islice(model.speech_tokens(text, empty, empty, torch.zeros(0, 192)),
                                               max_tokens))
            except RuntimeError as exc:
                raise ExportError(f"check: llm sampling failed ({str(exc).splitlines()[0]})") from None
            if not tokens:
                raise ExportError("check: the llm produced no speech tokens")
            try:
                result = list(model.tts(source_speech_token=torch.tensor([tokens], dtype=torch.int32),
                                        flow_embedding=embedding))
            except (RuntimeError, IndexError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"check: tokens -> mel -> wav failed ({first[:200]}); do the parts fit"
                                  " together?") from None
    finally:
        random.setstate(py_state)
    wav = result[0]["tts_speech"]
    frames = len(tokens) * model.token_mel_ratio
    if not bool(torch.isfinite(wav).all()):
        raise ExportError(f"check: the synthesised waveform has {int((~torch.isfinite(wav)).sum())} non-finite"
                          " samples; the flow or hift weights are broken")
    if wav.shape[-1] != frames * model.mel_hop:
        raise ExportError(f"check: expected {frames * model.mel_hop} samples, got {wav.shape[-1]}")
    return {"text": CHECK_TEXT, "text_tokens": len(ids), "speech_tokens": len(tokens), "mel_frames": frames,
            "samples": int(wav.shape[-1]), "sample_rate": model.sample_rate, "llm_loss": round(loss, 6),
            "peak": round(float(wav.abs().max()), 6), "finite": True}


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    output: Path
    generation: str
    metadata: dict[str, Any]


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


def _average_group(chosen: list[CheckpointInfo]) -> dict[str, dict[str, torch.Tensor]]:
    averagers = {part: _Averager(part) for part in chosen[0].parts}
    for info in chosen:
        states = split_parts(read_checkpoint(info.path)["state_dict"], str(info.path))
        for part, averager in averagers.items():
            averager.add(states[part], info.name)
        del states
    return {part: averager.result() for part, averager in averagers.items()}


def export_model(
    checkpoints: Sequence[str | Path],
    output: str | Path,
    *,
    base: str | Path | None = None,
    average: str | None = None,
    monitor: str | None = None,
    run_config: str | Path | Sequence[str | Path] | None = None,
    overwrite: bool = False,
    check: bool = True,
) -> ExportResult:
    """Write an upstream-layout model directory at ``output``; see the module docstring."""
    from cosytrain import __version__
    from cosytrain.models.upstream_yaml import dump_upstream_yaml, generation_of

    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists; pass --overwrite to replace it (atomically)")
    base_dir: ModelDirectory | None = open_model_dir(base) if base is not None else None
    if base_dir is not None and output.resolve() == base_dir.path.resolve():
        raise ExportError(f"{output}: is the --base directory; write the export somewhere else")

    if run_config is None:
        run_configs: list[Path] = []
    elif isinstance(run_config, (str, Path)):
        run_configs = [Path(run_config)]
    else:
        run_configs = [Path(p) for p in run_config]
    infos = checkpoint_infos(checkpoints)
    trained: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, dict[str, Any]] = {}
    run_parts: dict[str, Any] = {}
    run_sources: dict[str, str] = {}
    for parts, members in _group(infos).items():
        chosen, averaging = select_checkpoints(members, average, monitor)
        for part, state in _average_group(chosen).items():
            trained[part] = state
            sources[part] = {
                "source": "checkpoint",
                "averaging": averaging,
                "checkpoints": [{"path": str(i.path.resolve()), "sha256": _sha256(i.path), "epoch": i.epoch,
                                 "global_step": i.global_step, **({"score": i.score} if i.score is not None else {})}
                                for i in chosen],
            }
        if base_dir is None:
            found, where = _part_configs_from_run(chosen[0], run_configs)
            for part, value in found.items():
                run_parts[part] = run_config_to_tree(value, part)
                run_sources[part] = where

    tokenizer: str | None = None
    front_end_note: str | None = None
    qwen_source: Path | None = None
    tokenizer_path: Any = None
    if base_dir is not None:
        generation, config_name = base_dir.generation, base_dir.config_path.name
        modules = base_dir.build(list(trained), device="meta")
        for part, state in trained.items():
            what = f"{sources[part]['checkpoints'][0]['path']} ({part})"
            try:
                check_part_state_dict(part, modules[part], state, generation, what, str(base_dir.config_path))
            except ModelDirError as exc:
                raise ExportError(str(exc)) from None
        config_text = None
    else:
        missing = [p for p in PARTS if p not in trained]
        if missing:
            raise ExportError(f"the checkpoints hold no {', '.join(missing)} weights and no --base was given; pass"
                              " --base DIR (an upstream model directory) to take the missing parts from it")
        try:
            generation = generation_of(run_parts)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        _check_run_generations(run_parts, run_sources, generation)
        config_name = CONFIG_NAMES[generation]
        llm_run = run_sources.get("llm", "")
        tokenizer = _run_text_tokenizer(llm_run) if llm_run.endswith(".yaml") else None
        upstream_tokenizer = UPSTREAM_TEXT_TOKENIZER[generation]
        if tokenizer is not None and tokenizer != upstream_tokenizer and not (
                generation == "v2" and tokenizer == "qwen2"):
            front_end_note = (f"the llm was trained with the {tokenizer!r} text tokenizer but the written config"
                              f" names upstream's {upstream_tokenizer} tokenizer (get_tokenizer); upstream's front end"
                              " will not tokenize text the way this model expects (cosytrain's does: see"
                              " text_tokenizer in cosytrain.json)")
            warnings.warn(front_end_note, RuntimeWarning, stacklevel=2)
        header = (f"{GENERATION_NAMES[generation]} config written by cosytrain {__version__} from the training"
                  " run(s):\n" + "\n".join(sorted(set(run_sources.values()))))
        if generation == "v1":
            config_text = dump_upstream_yaml(_v1_config_tree(run_parts), header=header)
        else:
            qwen_source = _qwen_folder(run_parts["llm"], llm_run)
            llm_data = _data_args(Path(llm_run)) if llm_run.endswith(".yaml") and Path(llm_run).is_file() else {}
            tokenizer_path = llm_data.get("text_tokenizer_path")
            config_text = dump_upstream_yaml(_v23_config_tree(run_parts, generation, llm_data), header=header)

    # side files of the runs' data: built-in front ends, speakers (spk2embedding.pt)
    data_folders = _data_folders(_run_config_paths(infos, run_configs))
    if tokenizer is None:
        for config_path in _run_config_paths(infos, run_configs):
            found_tokenizer = _data_args(config_path).get("text_tokenizer")
            if isinstance(found_tokenizer, str):
                tokenizer = found_tokenizer
                break

    metadata: dict[str, Any] = {
        "format": 1,
        "cosytrain_version": __version__,
        "generation": generation,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {"file": config_name, "source": "base" if base_dir else "run",
                   "from": [str(base_dir.config_path.resolve())] if base_dir else sorted(set(run_sources.values()))},
        "base": str(base_dir.path.resolve()) if base_dir else None,
        "parts": {},
        "front_end_files": [],
    }
    if tokenizer is not None:
        metadata["run_text_tokenizer"] = tokenizer
        metadata["text_tokenizer"] = tokenizer
    if front_end_note is not None:
        metadata["warnings"] = [front_end_note]
    measured = [i for i in infos if i.fp16_figures]
    if measured:  # the model card: the training run's last FP16-vs-FP32 figures
        from cosytrain.evaluation.fp16_check import MODEL_CARD_KEY, model_card_section

        newest = max(measured, key=lambda i: i.global_step or -1)
        metadata[MODEL_CARD_KEY] = {
            **model_card_section(newest.fp16_figures),
            "measured_on": f"training weights of {newest.path.name} (step {newest.global_step}), before any"
                           " averaging; `python -m cosytrain check-fp16 --model_dir <this dir>` re-measures the export",
        }

    def fill(tmp: Path) -> None:
        if base_dir is not None:
            shutil.copyfile(base_dir.config_path, tmp / config_name)
        else:
            (tmp / config_name).write_text(config_text or "", encoding="utf-8")
        for part in PARTS:
            if part in trained:
                _save(trained[part], tmp / f"{part}.pt")
                metadata["parts"][part] = sources[part]
            else:
                assert base_dir is not None
                src = base_dir.weights_path(part)
                if not src.is_file():
                    raise ExportError(f"{src}: not found; the base directory must hold {part}.pt")
                shutil.copyfile(src, tmp / f"{part}.pt")
                metadata["parts"][part] = {"source": "base", "path": str(src.resolve()), "sha256": _sha256(src)}
        copied = metadata["front_end_files"]
        if base_dir is not None:
            for name in FRONT_END_FILES + BUILTIN_FRONT_END_FILES:
                if (base_dir.path / name).is_file():
                    shutil.copyfile(base_dir.path / name, tmp / name)
                    copied.append(name)
            if (base_dir.path / QWEN_DIR).is_dir():
                shutil.copytree(base_dir.path / QWEN_DIR, tmp / QWEN_DIR)
                copied.append(QWEN_DIR + "/")
        elif qwen_source is not None:
            files = _copy_qwen_folder(qwen_source, tokenizer_path if isinstance(tokenizer_path, str) else None,
                                      tmp / QWEN_DIR)
            copied.append(QWEN_DIR + "/")
            metadata["qwen"] = {"from": str(qwen_source.resolve()), "files": files}
        # the stand-in front ends the training data was prepared with (the model knows only their tokens)
        for name in BUILTIN_FRONT_END_FILES:
            source = next((f / name for f in data_folders if (f / name).is_file()), None)
            if source is not None and not (tmp / name).exists():
                shutil.copyfile(source, tmp / name)
                copied.append(name)
        if not (tmp / SPK2INFO_FILE).exists():
            table = next((f / "spk2embedding.pt" for f in data_folders if (f / "spk2embedding.pt").is_file()), None)
            if table is not None:
                _save(speaker_info_from_shards(table), tmp / SPK2INFO_FILE)
                copied.append(SPK2INFO_FILE)
                metadata["spk2info"] = {"from": str(table.resolve())}
        if check:
            try:
                directory, parts = load_model_dir(tmp)
            except ModelDirError as exc:
                raise ExportError(f"check: the written directory does not load back: {exc}") from None
            if directory.generation != "v1":
                metadata["check"] = smoke_test_v23(parts["llm"], parts["flow"], parts["hift"], directory.generation)
            else:
                metadata["check"] = smoke_test(parts["llm"], parts["flow"], parts["hift"])
        else:
            metadata["check"] = {"skipped": "--no-check"}
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    from cosytrain.utils.atomic import atomic_directory

    atomic_directory(output, fill, overwrite=overwrite)
    return ExportResult(output=output, generation=generation, metadata=metadata)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cosytrain export",
        description="Export Lightning checkpoints to an upstream-layout CosyVoice model directory"
                    " (llm.pt, flow.pt, hift.pt, cosyvoice*.yaml, cosytrain.json).")
    parser.add_argument("checkpoints", nargs="+",
                        help="checkpoint files, folders of them (<run>/checkpoints) or DeepSpeed checkpoint folders")
    parser.add_argument("-o", "--output", required=True, help="model directory to write")
    parser.add_argument("--base", help="upstream model directory supplying the parts not trained, its yaml and"
                                       " front-end files")
    parser.add_argument("--average", metavar="best:N|last:N",
                        help="average the N best (validation score) or N latest checkpoints; default: all given")
    parser.add_argument("--monitor", help="metric for best:N when the checkpoints monitor several")
    parser.add_argument("--run-config", action="append",
                        help="a run's config.yaml (repeatable; default: found beside the checkpoints): the"
                             " parts' configs (without --base) and the data folder with the built-in front ends"
                             " and spk2embedding.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-check", action="store_true", help="skip the load-back and synthesis check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cosytrain.models.upstream_yaml import UpstreamConfigError

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        result = export_model(args.checkpoints, args.output, base=args.base, average=args.average,
                              monitor=args.monitor, run_config=args.run_config, overwrite=args.overwrite,
                              check=not args.no_check)
    except (ExportError, ModelDirError, UpstreamConfigError) as exc:
        print(f"cosytrain export: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cosytrain export: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    parts = result.metadata["parts"]
    summary = ", ".join(
        f"{p} from {len(parts[p]['checkpoints'])} checkpoint(s)" if parts[p]["source"] == "checkpoint"
        else f"{p} from base" for p in PARTS)
    print(f"exported {GENERATION_NAMES[result.generation]} model to {result.output} ({summary})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
