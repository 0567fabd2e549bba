"""Which weights of a checkpoint an export takes: raw or EMA, and LoRA adapters merged into their base.

EMA (``--weights``)
    A run with a weight-averaging callback (``cosytrain.tasks.ema.EMAWeights``, Lightning's
    ``EMAWeightAveraging``) saves the average in ``state_dict`` and the raw weights in
    ``current_model_state``. ``ema`` takes the average (an error when the checkpoint has none),
    ``raw`` the raw weights, ``auto`` (the default) the average when there is one.

LoRA
    A LoRA checkpoint (``checkpoint['cosytrain']['lora']``, see ``cosytrain.tasks.lora``) holds the
    adapters and the parameters trained in full, not the frozen base. Each adapted part is rebuilt
    from the base model directory (``--base``, else the run's ``init_from``) with the base's weights,
    given peft's adapters with the recorded settings and the checkpoint's values, and merged with
    peft's ``merge_and_unload``: the part's state dict is then upstream's plain one (the base's keys
    and shapes). The base's ``<part>.pt`` must be the file the adapters were trained on (sha256).
    The adapter alone is kept too, in peft's format (``adapter_model.safetensors`` +
    ``adapter_config.json``, what ``PeftModel.save_pretrained`` writes).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from cosytrain.export.errors import ExportError
from cosytrain.export.part_split import split_parts
from cosytrain.modeldir import ModelDirectory, ModelDirError, open_model_dir
from cosytrain.utils.hashing import file_sha256

__all__ = ["WEIGHT_CHOICES", "ADAPTERS_DIR", "choose_weights", "lora_records", "PartWeights", "checkpoint_parts",
           "lora_base_of", "write_adapter_files"]

WEIGHT_CHOICES = ("auto", "ema", "raw")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTERS_DIR = "lora"  # <export>/lora/<part>/adapter_model.safetensors + adapter_config.json (peft's format)


def _has_average(ckpt: Mapping[str, Any]) -> bool:
    return isinstance(ckpt.get("current_model_state"), Mapping) and "averaging_state" in ckpt


def choose_weights(ckpt: Mapping[str, Any], what: str, weights: str = "auto") -> tuple[Mapping[str, Any], str]:
    """The module state to export and which it is (``ema`` or ``raw``)."""
    if weights not in WEIGHT_CHOICES:
        raise ExportError(f"--weights {weights!r}: use one of {', '.join(WEIGHT_CHOICES)}")
    averaged = _has_average(ckpt)
    if weights == "ema" and not averaged:
        raise ExportError(f"{what}: holds no EMA weights (the run had no EMA callback such as"
                          " cosytrain.tasks.ema.EMAWeights); export --weights raw")
    if averaged and weights in ("auto", "ema"):
        return ckpt["state_dict"], "ema"
    return (ckpt["current_model_state"] if averaged else ckpt["state_dict"]), "raw"


def lora_records(ckpt: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{part: {'config', 'init_from', 'base_sha256'}}`` of a LoRA checkpoint, else empty."""
    found = (ckpt.get("cosytrain") or {}).get("lora") if isinstance(ckpt.get("cosytrain"), Mapping) else None
    return {str(k): dict(v) for k, v in found.items()} if isinstance(found, Mapping) else {}


@dataclass
class PartWeights:
    """One checkpoint's exportable weights per part, and what was done to get them."""

    states: dict[str, dict[str, torch.Tensor]]
    weights: str  # 'ema' or 'raw'
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> record (+ 'base')
    adapter_files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # part -> peft's files


def _lora_base(record: Mapping[str, Any], part: str, base: Optional[ModelDirectory], what: str) -> ModelDirectory:
    """The base model directory of a LoRA part: ``--base`` or the run's init_from, the file it was trained on."""
    init_from = record.get("init_from")
    if base is None:
        try:
            base = open_model_dir(str(init_from))
        except ModelDirError as exc:
            raise ExportError(f"{what}: holds LoRA adapters for {part} whose base model directory (the run's init_from"
                              f" {init_from}) cannot be opened ({exc}); pass --base DIR, the model directory the"
                              " adapters were trained on") from None
    path = base.weights_path(part)
    if not path.is_file() or file_sha256(path) != record.get("base_sha256"):
        raise ExportError(f"{what}: its {part} adapters were trained on {init_from}/{part}.pt, and {path} is not that"
                          " file (sha256 differs); merge them into the base they were trained on (--base DIR)")
    return base


def _merge_part(part: str, record: Mapping[str, Any], trained: Mapping[str, torch.Tensor], base: ModelDirectory,
                what: str) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """Base weights + the checkpoint's adapters and trained parameters -> (merged plain state, peft's files)."""
    from cosytrain.models.lora import LoRASpec, attach_lora, merge_lora

    try:
        module = base.load([part])[part]
    except ModelDirError as exc:
        raise ExportError(f"{what}: the base of its {part} adapters does not load: {exc}") from None
    peft_model = attach_lora(module, LoRASpec.from_dict(record.get("config") or {}, f"{what}: lora.{part}"))
    own = module.state_dict()
    unexpected = [k for k in trained if k not in own]
    missing = [k for k in own if k not in trained and (".lora_" in k)]
    if unexpected or missing:
        detail = f"unexpected {', '.join(unexpected[:3])}" if unexpected else f"missing {', '.join(missing[:3])}"
        raise ExportError(f"{what}: its {part} adapters do not fit the base's {part} with the recorded lora settings"
                          f" ({detail})")
    module.load_state_dict({**own, **trained}, strict=True)
    peft_model.peft_config["default"].base_model_name_or_path = str(base.path)
    with tempfile.TemporaryDirectory(prefix="cosytrain-adapter-") as tmp:
        peft_model.save_pretrained(tmp)
        # peft also writes a README.md model-card template for the hub; only the adapter itself is kept
        files = {name: (Path(tmp) / name).read_bytes() for name in ADAPTER_FILES}
    merged = merge_lora(peft_model)
    return {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}, files


def checkpoint_parts(ckpt: Mapping[str, Any], what: str, weights: str = "auto",
                     base: Optional[ModelDirectory] = None) -> PartWeights:
    """The exportable plain state dict of every part of one checkpoint (EMA/raw chosen, LoRA merged)."""
    state, chosen = choose_weights(ckpt, what, weights)
    out = PartWeights(split_parts(state, what), chosen)
    for part, record in lora_records(ckpt).items():
        if part not in out.states:
            continue
        part_base = _lora_base(record, part, base, what)
        out.states[part], out.adapter_files[part] = _merge_part(part, record, out.states[part], part_base, what)
        out.lora[part] = {**record, "base": str(part_base.path.resolve())}
    return out


def lora_base_of(lora_bases: list[Mapping[str, str]]) -> Optional[str]:
    """Without --base, LoRA checkpoints name their own base (the run's init_from); one base for all."""
    bases = sorted({b for found in lora_bases for b in found.values()})
    if len(bases) > 1:
        raise ExportError(f"the LoRA checkpoints were trained on different bases ({', '.join(bases)}); export them"
                          " separately, or pass --base DIR")
    return bases[0] if bases else None


def write_adapter_files(folder: Path, adapters: Mapping[str, Optional[Mapping[str, bytes]]],
                        parts_meta: dict[str, Any]) -> None:
    """peft's adapter files of each LoRA part into ``folder/<part>/`` (``None``: several checkpoints were
    averaged, and averaged adapters are not one adapter: not written, said in ``parts_meta``)."""
    for part, files in adapters.items():
        record = parts_meta[part].setdefault("lora", {})
        if files is None:
            record["adapter"] = "not written: several checkpoints were averaged (the merged weights are their mean)"
            continue
        (folder / part).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / part / name).write_bytes(data)
        record["adapter"] = str(Path(folder.name) / part) if folder.name == ADAPTERS_DIR else part
