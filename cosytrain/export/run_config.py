"""What an export takes from the training run(s): the config (when there is no ``--base``) and side files.

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

    The runs' data folders (found through their configs) hold the built-in front ends ``prepare``
    fitted and the shards' ``spk2embedding.pt``, which :func:`speaker_info_from_shards` turns into
    upstream's ``spk2info.pt`` layout.
"""

from __future__ import annotations

import importlib
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cosytrain.export.checkpoints import CheckpointInfo
from cosytrain.export.errors import ExportError
from cosytrain.modeldir import (
    GENERATION_NAMES,
    PART_CLASS_GENERATIONS,
    QWEN_DIR,
    Apply,
    ModelDirError,
    Name,
    New,
    Ref,
    fixture_config_to_tree,
    load_weights_file,
)
from cosytrain.modeldir import registry

__all__ = ["run_config_to_tree", "speaker_info_from_shards"]

# The text tokenizer upstream's front end uses for each generation's written config.
UPSTREAM_TEXT_TOKENIZER = {"v1": "whisper", "v2": "qwen", "v3": "qwen3"}


# --------------------------------------------------------------------------------------------------
# Config from a training run (no base directory)
# --------------------------------------------------------------------------------------------------

_CFM_CLASSES = {"cosyvoice.flow.flow_matching.ConditionalCFM", "cosyvoice.flow.flow_matching.CausalConditionalCFM"}


def _reverse_registry() -> dict[int, tuple[str, str]]:
    """id(cosytrain object) -> (kind, upstream name), for the objects that exist so far."""
    out: dict[int, tuple[str, str]] = {}
    for kind, table in (("class", registry.CLASSES), ("function", registry.FUNCTIONS)):
        for upstream in table:
            try:
                obj = registry.resolve(upstream, kind)
            except Exception:  # not implemented yet, or an optional dependency missing
                continue
            out.setdefault(id(obj), (kind, upstream))
    return out


def _cosytrain_object(dotted: str) -> Any:
    """What a ``cosytrain.*`` dotted name names (imported), or None: another package's name, or nothing there."""
    if not dotted.startswith("cosytrain."):
        return None
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


def _upstream_name(dotted: str, where: str, reverse: dict[int, tuple[str, str]]) -> tuple[str, str]:
    if dotted in registry.CLASSES:
        return "class", dotted
    if dotted in registry.FUNCTIONS:
        return "function", dotted
    obj = _cosytrain_object(dotted)
    if obj is not None and id(obj) in reverse:
        return reverse[id(obj)]
    raise ExportError(f"run config: {where}: {dotted} has no upstream CosyVoice equivalent, so no upstream yaml can"
                      " name it; export with --base DIR instead")


def _upstream_equivalent(dotted: str) -> tuple[str, dict[str, Any]] | None:
    """(upstream function, kwargs) that computes what the cosytrain function ``dotted`` does, from its
    module's ``UPSTREAM_EQUIVALENT`` (e.g. greedy sampling = upstream's RAS with top_k 1), or None."""
    module_name, _, attr = dotted.rpartition(".")
    table = _cosytrain_object(f"{module_name}.UPSTREAM_EQUIVALENT")
    return table.get(attr) if isinstance(table, Mapping) else None


def _cosytrain_only_args(class_path: str) -> frozenset[str]:
    """Arguments a cosytrain class takes but upstream's class of the same name does not (its
    ``COSYTRAIN_ONLY_ARGS``): never written, or upstream's ``load_hyperpyyaml`` refuses the config."""
    return frozenset(getattr(_cosytrain_object(class_path), "COSYTRAIN_ONLY_ARGS", ()))


def run_config_to_tree(value: Any, where: str = "", reverse: dict[int, tuple[str, str]] | None = None) -> Any:
    """A part's LightningCLI config (``class_path``/``init_args``, nested) -> an upstream inert tree.

    Also accepts the reference fixtures' ``{'class': upstream name, ...}`` form. A string naming a
    known function (``cosytrain.models.sampling.ras_sampling``) becomes ``!name:``; a ``cfm_params``
    mapping becomes upstream's ``!new:omegaconf.DictConfig``.
    """
    reverse = _reverse_registry() if reverse is None else reverse
    if isinstance(value, Mapping) and "class_path" in value:
        kind, upstream = _upstream_name(str(value["class_path"]), where, reverse)
        args = {**dict(value.get("init_args") or {}), **dict(value.get("dict_kwargs") or {})}
        skip = _cosytrain_only_args(str(value["class_path"]))
        kwargs = {str(k): run_config_to_tree(v, f"{where}.{k}", reverse) for k, v in args.items()
                  if str(k) not in skip}
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
        equivalent = _upstream_equivalent(value)
        if equivalent is not None:
            return Name(equivalent[0], [], dict(equivalent[1]))
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


def _seed_lines() -> dict[str, Any]:
    """Upstream configs open with these seed setters; cosytrain's reader ignores them, upstream runs them."""
    return {f"__set_seed{i}": Apply(fn, [1986]) for i, fn in enumerate(
        ("random.seed", "numpy.random.seed", "torch.manual_seed", "torch.cuda.manual_seed_all"), start=1)}


def _v1_config_tree(parts: Mapping[str, Any]) -> dict[str, Any]:
    """A complete upstream ``cosyvoice.yaml`` around the three part trees (front-end keys: upstream v1's)."""
    hift_rate = parts["hift"].kwargs.get("sampling_rate", 22050)
    sample_rate = hift_rate if isinstance(hift_rate, int) else 22050
    return {
        **_seed_lines(),
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
    for part, tree in parts.items():
        generations = PART_CLASS_GENERATIONS.get(part, {}).get(getattr(tree, "target", ""), ())
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
        **_seed_lines(),
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


# weight files of a Hugging Face folder: replaced by the trained weights in an export's CosyVoice-BlankEN
QWEN_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def _copy_qwen_folder(source: Path, tokenizer_path: str | None, target: Path) -> list[str]:
    """Copy the Qwen config/tokenizer folder (not its weights: :func:`write_qwen_weights` writes the
    trained ones); tokenizer files from a separate tokenizer folder too."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*QWEN_WEIGHT_PATTERNS))
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


def write_qwen_weights(llm_state: Mapping[str, torch.Tensor], target: Path) -> str:
    """The trained Qwen2 of a v2/v3 llm as ``<target>/model.safetensors`` (Hugging Face layout).

    Upstream's ``Qwen2Encoder`` calls ``Qwen2ForCausalLM.from_pretrained(<dir>/CosyVoice-BlankEN)``,
    which needs weight files there (``llm.pt`` then overwrites every one of them). The llm's
    ``llm.model.*`` keys are exactly the ``Qwen2ForCausalLM`` state dict; a tied ``lm_head`` is left
    out as Hugging Face's own ``save_pretrained`` does (``from_pretrained`` ties it again).
    """
    import json

    from safetensors.torch import save_file

    prefix = "llm.model."
    weights = {k[len(prefix):]: v.detach().to("cpu").clone().contiguous()
               for k, v in llm_state.items() if k.startswith(prefix)}
    if not weights:
        raise ExportError(f"the llm has no {prefix}* weights (a Qwen2Encoder's); cannot write {target}")
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    if config.get("tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    name = "model.safetensors"
    save_file(weights, str(target / name), metadata={"format": "pt"})
    return name


def merged_speaker_info(base_table: Mapping[str, Any] | None,
                        trained: Mapping[str, dict[str, torch.Tensor]]) -> tuple[dict[str, Any], list[str]]:
    """The base's ``spk2info.pt`` entries plus the training speakers (a trained speaker replaces a base
    entry of the same name: the model learned the new voice); returns the table and the replaced names."""
    table: dict[str, Any] = dict(base_table or {})
    replaced = sorted(s for s in trained if s in table)
    table.update(trained)
    return table, replaced
