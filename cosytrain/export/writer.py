"""Writing the model directory: :func:`export_model`, in the steps it takes.

1. ``_open_base``: the ``--base`` model directory, if any (read safely, weights read lazily).
2. ``_average_trained_parts``: the checkpoints, chosen and averaged per run
   (:mod:`cosytrain.export.checkpoints`), each checkpoint's raw or EMA weights with its LoRA adapters
   merged (:mod:`cosytrain.export.trained_weights`); without a base, each run's part configs too.
3. The config: ``_config_from_base`` reuses the base's yaml after shape-checking the trained
   weights against it; ``_config_from_runs`` writes one from the runs (:mod:`cosytrain.export.run_config`).
4. ``_metadata``: ``cosytrain.json`` (generation, config source, text tokenizer, the FP16 model card).
5. ``_fill`` writes everything into a temporary sibling: config and weights, front-end files,
   speakers, then the load-back and synthesis check (:mod:`cosytrain.export.checks`); only then is it
   renamed into place (``atomic_directory``).

Front-end files
    The ONNX files, the built-in stand-ins and ``spk2info.pt`` (and a v2/v3
    ``CosyVoice-BlankEN`` folder) are copied from the base when present. The built-in stand-ins
    ``speech_tokenizer_builtin.npz`` / ``campplus_builtin.npz`` that ``prepare`` fitted beside the
    training shards' ``data.list`` (found through the runs' configs) are copied when the output has
    none. ``spk2info.pt`` holds the base's speakers (if any) plus the training speakers from the
    shards' ``spk2embedding.pt``: ``{speaker: {'embedding': tensor (1, 192)}}``, each speaker's mean
    utterance embedding, upstream's layout, so ``inference_sft`` knows the training speakers (a
    training speaker replaces a base speaker of the same name). Without a base, v2/v3 exports write
    the trained Qwen2 weights into ``CosyVoice-BlankEN/model.safetensors``: upstream's
    ``Qwen2Encoder`` calls ``from_pretrained`` on that folder and needs weight files there.
    Exported jit/onnx/TensorRT files of the base are not copied: they hold the base's weights.

Safety
    Checkpoints are read with ``torch.load(weights_only=True)``. The output directory is built
    in a temporary sibling and renamed into place only after it has been loaded back strictly
    through :mod:`cosytrain.modeldir` and has synthesised one short utterance (byte-tokenised
    text -> speech tokens -> mel -> waveform, with the generation's token-level model) with finite
    numbers; otherwise the export fails and an existing directory is left as it was.
    ``cosytrain.json`` records the generation, the source checkpoints with their sha256, the
    averaging and the check.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cosytrain import __version__
from cosytrain.evaluation.fp16_figures import MODEL_CARD_KEY, model_card_section
from cosytrain.export.checkpoints import (
    CheckpointInfo,
    _average_group,
    _group,
    _sha256,
    checkpoint_infos,
    select_checkpoints,
)
from cosytrain.export.checks import smoke_test, smoke_test_v23
from cosytrain.export.errors import ExportError
from cosytrain.export.upstream_front_end import upstream_front_end
from cosytrain.export.run_config import (
    UPSTREAM_TEXT_TOKENIZER,
    _check_run_generations,
    _copy_qwen_folder,
    _data_args,
    _data_folders,
    _part_configs_from_run,
    _qwen_folder,
    _run_config_paths,
    _run_text_tokenizer,
    _v1_config_tree,
    _v23_config_tree,
    merged_speaker_info,
    run_config_to_tree,
    speaker_info_from_shards,
    write_qwen_weights,
)
from cosytrain.export.trained_weights import ADAPTERS_DIR, lora_base_of, write_adapter_files
from cosytrain.modeldir import (
    BUILTIN_FRONT_END_FILES,
    CONFIG_NAMES,
    FRONT_END_FILES,
    GENERATION_NAMES,
    METADATA_FILE,
    PARTS,
    QWEN_DIR,
    SPK2INFO_FILE,
    ModelDirectory,
    ModelDirError,
    check_state_dict,
    dump_upstream_yaml,
    generation_of,
    load_model_dir,
    load_weights_file,
    open_model_dir,
)
from cosytrain.utils.atomic import atomic_directory

__all__ = ["ExportResult", "export_model"]


@dataclass
class ExportResult:
    output: Path
    generation: str
    metadata: dict[str, Any]


@dataclass
class _TrainedParts:
    """The averaged weights of every trained part, where they came from, and (without a base) the
    parts' configs from their runs."""

    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> cosytrain.json record
    run_parts: dict[str, Any] = field(default_factory=dict)  # part -> inert config tree
    run_sources: dict[str, str] = field(default_factory=dict)  # part -> where its config was found
    adapters: dict[str, dict[str, bytes] | None] = field(default_factory=dict)  # LoRA part -> peft's files


@dataclass
class _ExportConfig:
    """The config the export writes (``text`` None: the base's yaml is copied) and what goes with it."""

    generation: str
    file_name: str
    text: str | None = None
    tokenizer: str | None = None  # the text tokenizer the llm's run used
    warning: str | None = None
    qwen_source: Path | None = None  # v2/v3 without a base: the run's Qwen folder
    tokenizer_path: str | None = None


def _save(obj: Any, path: Path) -> None:
    """``torch.save`` through memory: torch's file writer words a full disk as "unexpected pos";
    a plain write raises the OSError (ENOSPC) that ``atomic_directory`` turns into one clear line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# Steps 1-4: what to write
# --------------------------------------------------------------------------------------------------


def _open_base(base: str | Path | None, output: Path, overwrite: bool) -> ModelDirectory | None:
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists; pass --overwrite to replace it (atomically)")
    if base is None:
        return None
    base_dir = open_model_dir(base)
    if output.resolve() == base_dir.path.resolve():
        raise ExportError(f"{output}: is the --base directory; write the export somewhere else")
    return base_dir


def _as_paths(run_config: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if run_config is None:
        return []
    if isinstance(run_config, (str, Path)):
        return [Path(run_config)]
    return [Path(p) for p in run_config]


def _checkpoint_record(info: CheckpointInfo) -> dict[str, Any]:
    return {"path": str(info.path.resolve()), "sha256": _sha256(info.path), "epoch": info.epoch,
            "global_step": info.global_step, **({"score": info.score} if info.score is not None else {})}


def _average_trained_parts(infos: list[CheckpointInfo], average: str | None, monitor: str | None,
                           run_configs: Sequence[Path], with_run_configs: bool, weights: str = "auto",
                           base_dir: ModelDirectory | None = None) -> _TrainedParts:
    """Per run (group of checkpoints holding the same parts): choose, average, record the sources."""
    trained = _TrainedParts()
    for members in _group(infos).values():
        chosen, averaging = select_checkpoints(members, average, monitor)
        notes: dict[str, Any] = {}
        for part, state in _average_group(chosen, weights, base_dir, notes).items():
            trained.states[part] = state
            trained.sources[part] = {"source": "checkpoint", "averaging": averaging,
                                     "checkpoints": [_checkpoint_record(i) for i in chosen],
                                     "weights": notes[part]["weights"]}
            if "lora" in notes[part]:
                trained.sources[part]["lora"] = notes[part]["lora"]
                trained.adapters[part] = notes[part]["adapter_files"]
        if with_run_configs:
            found, where = _part_configs_from_run(chosen[0], run_configs)
            for part, value in found.items():
                trained.run_parts[part] = run_config_to_tree(value, part)
                trained.run_sources[part] = where
    return trained


def _config_from_base(base_dir: ModelDirectory, trained: _TrainedParts) -> _ExportConfig:
    """The base's yaml, kept verbatim, after checking every trained part's weights against it."""
    modules = base_dir.build(list(trained.states), device="meta")
    for part, state in trained.states.items():
        what = f"{trained.sources[part]['checkpoints'][0]['path']} ({part})"
        try:
            check_state_dict(modules[part], state, what, part=part, generation=base_dir.generation,
                             model_what=base_dir.built_from, limit=3)
        except ModelDirError as exc:
            raise ExportError(str(exc)) from None
    return _ExportConfig(base_dir.generation, base_dir.config_path.name)


def _config_from_runs(trained: _TrainedParts) -> _ExportConfig:
    """An upstream config written from the runs' part configs (every part must come from a checkpoint)."""
    missing = [p for p in PARTS if p not in trained.states]
    if missing:
        raise ExportError(f"the checkpoints hold no {', '.join(missing)} weights and no --base was given; pass"
                          " --base DIR (an upstream model directory) to take the missing parts from it")
    try:
        generation = generation_of(trained.run_parts)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    _check_run_generations(trained.run_parts, trained.run_sources, generation)
    config = _ExportConfig(generation, CONFIG_NAMES[generation])
    llm_run = trained.run_sources.get("llm", "")
    config.tokenizer = _run_text_tokenizer(llm_run) if llm_run.endswith(".yaml") else None
    upstream_tokenizer = UPSTREAM_TEXT_TOKENIZER[generation]
    if config.tokenizer is not None and config.tokenizer != upstream_tokenizer and not (
            generation == "v2" and config.tokenizer == "qwen2"):
        config.warning = (f"the llm was trained with the {config.tokenizer!r} text tokenizer but the written config"
                          f" names upstream's {upstream_tokenizer} tokenizer (get_tokenizer); upstream's front end"
                          " will not tokenize text the way this model expects (cosytrain's does: see"
                          " text_tokenizer in cosytrain.json)")
        warnings.warn(config.warning, RuntimeWarning, stacklevel=3)
    header = (f"{GENERATION_NAMES[generation]} config written by cosytrain {__version__} from the training"
              " run(s):\n" + "\n".join(sorted(set(trained.run_sources.values()))))
    if generation == "v1":
        config.text = dump_upstream_yaml(_v1_config_tree(trained.run_parts), header=header)
    else:
        config.qwen_source = _qwen_folder(trained.run_parts["llm"], llm_run)
        llm_data = _data_args(Path(llm_run)) if llm_run.endswith(".yaml") and Path(llm_run).is_file() else {}
        tokenizer_path = llm_data.get("text_tokenizer_path")
        config.tokenizer_path = tokenizer_path if isinstance(tokenizer_path, str) else None
        config.text = dump_upstream_yaml(_v23_config_tree(trained.run_parts, generation, llm_data), header=header)
    return config


def _tokenizer_from_runs(config_paths: Sequence[Path]) -> str | None:
    """The first ``data.init_args.text_tokenizer`` the runs' configs name."""
    for config_path in config_paths:
        found = _data_args(config_path).get("text_tokenizer")
        if isinstance(found, str):
            return found
    return None


def _metadata(config: _ExportConfig, base_dir: ModelDirectory | None, trained: _TrainedParts,
              infos: Sequence[CheckpointInfo]) -> dict[str, Any]:
    """``cosytrain.json`` as known before writing (parts, files and the check are added while writing)."""
    metadata: dict[str, Any] = {
        "format": 1,
        "cosytrain_version": __version__,
        "generation": config.generation,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {"file": config.file_name, "source": "base" if base_dir else "run",
                   "from": ([str(base_dir.config_path.resolve())] if base_dir
                            else sorted(set(trained.run_sources.values())))},
        "base": str(base_dir.path.resolve()) if base_dir else None,
        "parts": {},
        "front_end_files": [],
    }
    if config.tokenizer is not None:
        metadata["run_text_tokenizer"] = config.tokenizer
        metadata["text_tokenizer"] = config.tokenizer
    if config.warning is not None:
        metadata["warnings"] = [config.warning]
    measured = [i for i in infos if i.fp16_figures]
    if measured:  # the model card: the training run's last FP16-vs-FP32 figures
        newest = max(measured, key=lambda i: i.global_step or -1)
        metadata[MODEL_CARD_KEY] = {
            **model_card_section(newest.fp16_figures),
            "measured_on": f"training weights of {newest.path.name} (step {newest.global_step}), before any"
                           " averaging; `python -m cosytrain check-fp16 --model_dir <this dir>` re-measures the export",
        }
    return metadata


# --------------------------------------------------------------------------------------------------
# Step 5: writing (into the temporary directory)
# --------------------------------------------------------------------------------------------------


def _write_config_and_weights(tmp: Path, base_dir: ModelDirectory | None, config: _ExportConfig,
                              trained: _TrainedParts, metadata: dict[str, Any]) -> None:
    if base_dir is not None:
        shutil.copyfile(base_dir.config_path, tmp / config.file_name)
    else:
        (tmp / config.file_name).write_text(config.text or "", encoding="utf-8")
    for part in PARTS:
        if part in trained.states:
            _save(trained.states[part], tmp / f"{part}.pt")
            metadata["parts"][part] = trained.sources[part]
        else:
            assert base_dir is not None
            src = base_dir.weights_path(part)
            if not src.is_file():
                raise ExportError(f"{src}: not found; the base directory must hold {part}.pt")
            shutil.copyfile(src, tmp / f"{part}.pt")
            metadata["parts"][part] = {"source": "base", "path": str(src.resolve()), "sha256": _sha256(src)}


def _copy_front_end_files(tmp: Path, base_dir: ModelDirectory | None, config: _ExportConfig,
                          data_folders: Sequence[Path], metadata: dict[str, Any], trained: _TrainedParts) -> None:
    copied = metadata["front_end_files"]
    if base_dir is not None:
        for name in FRONT_END_FILES + BUILTIN_FRONT_END_FILES:
            if (base_dir.path / name).is_file():
                shutil.copyfile(base_dir.path / name, tmp / name)
                copied.append(name)
        if (base_dir.path / QWEN_DIR).is_dir():
            shutil.copytree(base_dir.path / QWEN_DIR, tmp / QWEN_DIR)
            copied.append(QWEN_DIR + "/")
    elif config.qwen_source is not None:
        files = _copy_qwen_folder(config.qwen_source, config.tokenizer_path, tmp / QWEN_DIR)
        files.append(write_qwen_weights(trained.states["llm"], tmp / QWEN_DIR))  # upstream's from_pretrained needs them
        copied.append(QWEN_DIR + "/")
        metadata["qwen"] = {"from": str(config.qwen_source.resolve()), "files": sorted(files),
                            "weights": "the trained llm's Qwen2 (llm.pt holds the same values)"}
    # the stand-in front ends the training data was prepared with (the model knows only their tokens)
    for name in BUILTIN_FRONT_END_FILES:
        source = next((f / name for f in data_folders if (f / name).is_file()), None)
        if source is not None and not (tmp / name).exists():
            shutil.copyfile(source, tmp / name)
            copied.append(name)


def _write_speakers(tmp: Path, data_folders: Sequence[Path], metadata: dict[str, Any]) -> None:
    """``spk2info.pt``: the base's speakers (if any) plus the training shards' (``spk2embedding.pt``), so
    upstream's ``inference_sft`` knows the training speakers too."""
    table = next((f / "spk2embedding.pt" for f in data_folders if (f / "spk2embedding.pt").is_file()), None)
    if table is None:
        return
    base_table = load_weights_file(tmp / SPK2INFO_FILE) if (tmp / SPK2INFO_FILE).is_file() else None
    trained_speakers = speaker_info_from_shards(table)
    merged, replaced = merged_speaker_info(base_table, trained_speakers)
    _save(merged, tmp / SPK2INFO_FILE)
    if SPK2INFO_FILE not in metadata["front_end_files"]:
        metadata["front_end_files"].append(SPK2INFO_FILE)
    metadata["spk2info"] = {"from": str(table.resolve()), "speakers": len(merged),
                            "from_training": len(trained_speakers), "from_base": len(merged) - len(trained_speakers),
                            "replaced_base_speakers": replaced}


def _check_written(tmp: Path) -> dict[str, Any]:
    """Load the written directory back strictly and synthesise one utterance with it."""
    try:
        directory, parts = load_model_dir(tmp)
    except ModelDirError as exc:
        raise ExportError(f"check: the written directory does not load back: {exc}") from None
    if directory.generation != "v1":
        return smoke_test_v23(parts["llm"], parts["flow"], parts["hift"], directory.generation)
    return smoke_test(parts["llm"], parts["flow"], parts["hift"])


# --------------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------------

def _write_adapters_only(output: Path, trained: _TrainedParts, overwrite: bool) -> ExportResult:
    if not trained.adapters:
        raise ExportError("--adapter-only: the checkpoints hold no LoRA adapters (train with lora: {llm: {...}})")
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists; pass --overwrite to replace it (atomically)")
    metadata: dict[str, Any] = {"format": 1, "cosytrain_version": __version__, "kind": "lora adapters",
                                "parts": {p: {k: v for k, v in trained.sources[p].items()} for p in trained.adapters}}
    if any(files is None for files in trained.adapters.values()):
        raise ExportError("--adapter-only: several checkpoints were chosen; averaged adapters are not one adapter,"
                          " export one checkpoint (or --average last:1)")

    def fill(tmp: Path) -> None:
        write_adapter_files(tmp, trained.adapters, metadata["parts"])
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    atomic_directory(output, fill, overwrite=overwrite)
    return ExportResult(output=output, generation="lora", metadata=metadata)


# --------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------


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
    weights: str = "auto",
    adapter_only: bool = False,
) -> ExportResult:
    """Write an upstream-layout model directory at ``output``; the steps are this module's docstring.

    ``weights``: ``auto``/``ema``/``raw`` (:mod:`cosytrain.export.trained_weights`). LoRA checkpoints are
    merged into their base (``base``, else the run's ``init_from``, which then is the base of the whole
    export); ``adapter_only`` writes only the adapters in peft's format, one folder per adapted part.
    """
    output = Path(output)
    infos = checkpoint_infos(checkpoints)
    lora_base = lora_base_of([info.lora_bases for info in infos]) if base is None else None
    try:
        base_dir = _open_base(base if lora_base is None else lora_base, output, overwrite)
    except ModelDirError as exc:
        if lora_base is None:
            raise
        raise ExportError(f"the checkpoints hold LoRA adapters whose base model directory (the run's init_from"
                          f" {lora_base}) cannot be opened ({exc}); pass --base DIR, the model directory the"
                          " adapters were trained on") from None
    run_configs = _as_paths(run_config)
    trained = _average_trained_parts(infos, average, monitor, run_configs, with_run_configs=base_dir is None,
                                     weights=weights, base_dir=base_dir)
    if adapter_only:
        return _write_adapters_only(output, trained, overwrite)
    config = _config_from_base(base_dir, trained) if base_dir is not None else _config_from_runs(trained)
    config_paths = _run_config_paths(infos, run_configs)
    data_folders = _data_folders(config_paths)  # where prepare left the built-in front ends and speakers
    if config.tokenizer is None:
        config.tokenizer = _tokenizer_from_runs(config_paths)
    metadata = _metadata(config, base_dir, trained, infos)

    def fill(tmp: Path) -> None:
        _write_config_and_weights(tmp, base_dir, config, trained, metadata)
        write_adapter_files(tmp / ADAPTERS_DIR, trained.adapters, metadata["parts"])
        _copy_front_end_files(tmp, base_dir, config, data_folders, metadata, trained)
        _write_speakers(tmp, data_folders, metadata)
        metadata["check"] = _check_written(tmp) if check else {"skipped": "--no-check"}
        metadata["upstream_front_end"] = upstream_front_end(tmp, config.generation, config.tokenizer)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    atomic_directory(output, fill, overwrite=overwrite)
    return ExportResult(output=output, generation=config.generation, metadata=metadata)
