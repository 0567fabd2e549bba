"""``python -m cosytrain export``: Lightning checkpoints -> an upstream-layout CosyVoice model directory.

Our tasks keep each trained part under the attribute ``llm``, ``flow`` or ``hift``, so a checkpoint's
``state_dict`` keys are ``llm.*`` / ``flow.*`` / ``hift.*`` (the vocoder's discriminator sits under
``discriminator.*`` and is never exported) and export is a prefix split
(:mod:`cosytrain.export.part_split`). On top of that, one module each:

:mod:`cosytrain.export.checkpoints`
    Choosing and averaging checkpoints: files, folders of them or DeepSpeed ZeRO folders;
    ``--average best:N`` / ``last:N``, scores from the checkpoints' ``ModelCheckpoint`` state;
    float64 averaging.
:mod:`cosytrain.export.zero_to_state_dict`
    The DeepSpeed ZeRO conversion (also ``python -m cosytrain.export.zero_to_state_dict``).
:mod:`cosytrain.export.run_config`
    Where the rest comes from: parts not in the checkpoints come from ``--base DIR``, whose yaml is
    reused verbatim; without a base the config is rebuilt from the training run's ``config.yaml``
    as upstream HyperPyYAML (``cosyvoice.yaml``, ``cosyvoice2.yaml`` or ``cosyvoice3.yaml``), with
    the run's Qwen folder, text tokenizer, built-in front ends and speakers.
:mod:`cosytrain.export.trained_weights`
    Raw or EMA weights (``--weights``); LoRA adapters merged into their base, and kept alone in
    peft's format (``--adapter-only`` writes only those).
:mod:`cosytrain.export.checks`
    The load-back and synthesis check.
:mod:`cosytrain.export.writer`
    :func:`export_model`, in steps: base, checkpoints, config, ``cosytrain.json``, then the write
    (built in a temporary sibling and renamed into place only after the check passed).

This module holds the public API and the command line (:func:`main`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cosytrain.export.checkpoints import (
    CheckpointInfo,
    average_state_dicts,
    checkpoint_infos,
    read_checkpoint,
    select_checkpoints,
)
from cosytrain.export.checks import smoke_test, smoke_test_v23
from cosytrain.export.errors import ExportError
from cosytrain.export.part_split import split_parts
from cosytrain.export.run_config import run_config_to_tree, speaker_info_from_shards
from cosytrain.export.writer import ExportResult, export_model
from cosytrain.modeldir import GENERATION_NAMES, PARTS, ModelDirError

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
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="checkpoints of runs with an EMA callback hold the average and the raw weights:"
                             " export the average (ema), the raw weights (raw) or the average when there is one"
                             " (auto, the default)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="LoRA checkpoints: write only the adapters, in peft's format (<output>/<part>/"
                             "adapter_model.safetensors + adapter_config.json); by default the adapters are merged"
                             " into the base (--base, else the run's init_from) and also kept under <output>/lora/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        result = export_model(args.checkpoints, args.output, base=args.base, average=args.average,
                              monitor=args.monitor, run_config=args.run_config, overwrite=args.overwrite,
                              check=not args.no_check, weights=args.weights, adapter_only=args.adapter_only)
    except (ExportError, ModelDirError) as exc:  # an UpstreamConfigError is a ModelDirError
        print(f"cosytrain export: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cosytrain export: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    parts = result.metadata["parts"]
    if args.adapter_only:
        print(f"exported LoRA adapters of {', '.join(parts)} to {result.output} (peft format)")
        return 0
    summary = ", ".join(
        f"{p} from {len(parts[p]['checkpoints'])} checkpoint(s)" if parts[p]["source"] == "checkpoint"
        else f"{p} from base" for p in PARTS)
    print(f"exported {GENERATION_NAMES[result.generation]} model to {result.output} ({summary})")
    return 0

