"""Writing the model directory: :func:`export_model`.

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
    numbers; otherwise the export fails and
    an existing directory is left as it was. ``cosytrain.json`` records the generation, the source
    checkpoints with their sha256, the averaging and the check.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cosytrain.export.checkpoints import (
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
    CONFIG_NAMES,
    QWEN_DIR,
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

__all__ = ["ExportResult", "export_model"]

METADATA_FILE = "cosytrain.json"
SPK2INFO_FILE = "spk2info.pt"
# The stand-in front ends ``cosytrain prepare`` fits and saves beside the shards' data.list.
BUILTIN_FRONT_END_FILES = ("speech_tokenizer_builtin.npz", "campplus_builtin.npz")


@dataclass
class ExportResult:
    output: Path
    generation: str
    metadata: dict[str, Any]


def _save(obj: Any, path: Path) -> None:
    """``torch.save`` through memory: torch's file writer words a full disk as "unexpected pos";
    a plain write raises the OSError (ENOSPC) that ``atomic_directory`` turns into one clear line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())


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
    """Write an upstream-layout model directory at ``output``; see :mod:`cosytrain.export` and the
    docstrings of its modules."""
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
            files.append(write_qwen_weights(trained["llm"], tmp / QWEN_DIR))  # upstream's from_pretrained needs them
            copied.append(QWEN_DIR + "/")
            metadata["qwen"] = {"from": str(qwen_source.resolve()), "files": sorted(files),
                                "weights": "the trained llm's Qwen2 (llm.pt holds the same values)"}
        # the stand-in front ends the training data was prepared with (the model knows only their tokens)
        for name in BUILTIN_FRONT_END_FILES:
            source = next((f / name for f in data_folders if (f / name).is_file()), None)
            if source is not None and not (tmp / name).exists():
                shutil.copyfile(source, tmp / name)
                copied.append(name)
        # upstream's inference_sft speakers: the base's (if any) plus the training speakers
        table = next((f / "spk2embedding.pt" for f in data_folders if (f / "spk2embedding.pt").is_file()), None)
        if table is not None:
            base_info = tmp / SPK2INFO_FILE
            base_table = load_weights_file(base_info) if base_info.is_file() else None
            trained_speakers = speaker_info_from_shards(table)
            merged, replaced = merged_speaker_info(base_table, trained_speakers)
            _save(merged, tmp / SPK2INFO_FILE)
            if SPK2INFO_FILE not in copied:
                copied.append(SPK2INFO_FILE)
            metadata["spk2info"] = {"from": str(table.resolve()), "speakers": len(merged),
                                    "from_training": len(trained_speakers),
                                    "from_base": len(merged) - len(trained_speakers),
                                    "replaced_base_speakers": replaced}
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
        metadata["upstream_front_end"] = upstream_front_end(tmp, generation, tokenizer)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    from cosytrain.utils.atomic import atomic_directory

    atomic_directory(output, fill, overwrite=overwrite)
    return ExportResult(output=output, generation=generation, metadata=metadata)
