"""DeepSpeed ZeRO-2/3 checkpoint -> one FP32 Lightning checkpoint -> upstream part files.

With ``strategy: DeepSpeedStrategy`` (``conf/strategy/deepspeed_zero{2,3}.yaml``) Lightning saves a
checkpoint FOLDER of partitioned shards (``last.ckpt/``), not a file. Export and ``init_from`` need
plain tensors, so :func:`consolidate` (the one ZeRO conversion: ``cosytrain export`` reads ZeRO
folders through it too) turns it into one file with Lightning's
``convert_zero_checkpoint_to_fp32_state_dict`` (needs ``deepspeed`` installed), and
:func:`write_part_files` can write the result as upstream's ``llm.pt``/``flow.pt``/``hift.pt`` (the
prefix split of :func:`cosytrain.export.part_split.split_parts`).

Usage::

    python -m cosytrain.export.zero_to_state_dict runs/x/checkpoints/last.ckpt runs/x/last-fp32.ckpt \
        [--tag global_step100] [--split-into runs/x/parts]

Untested on this project's CI machines: Lightning's DeepSpeed strategy needs CUDA GPUs.
The part files (``write_part_files``) and the missing-deepspeed error are tested without DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cosytrain.export.errors import ExportError
from cosytrain.export.part_split import split_parts

__all__ = ["consolidate", "write_part_files", "main"]


def consolidate(checkpoint_dir: str | Path, output_file: str | Path, tag: str | None = None) -> Path:
    """ZeRO shard folder -> a single FP32 Lightning checkpoint file (``state_dict`` + loop state)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise NotADirectoryError(f"{checkpoint_dir} is not a DeepSpeed checkpoint folder (a plain .ckpt file "
                                 "needs no conversion)")
    if importlib.util.find_spec("deepspeed") is None:  # before importing Lightning (slow) to say so
        raise ExportError(f"{checkpoint_dir}: is a DeepSpeed ZeRO checkpoint; converting it needs the deepspeed"
                          " package; pip install deepspeed, or export a Lightning .ckpt file")
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as exc:  # lightning itself missing
        raise ExportError(f"{checkpoint_dir}: reading a DeepSpeed checkpoint needs lightning ({exc})") from None
    try:
        convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint_dir), str(output_file), tag=tag)
    except ModuleNotFoundError as exc:
        raise ExportError(f"{checkpoint_dir}: is a DeepSpeed ZeRO checkpoint; converting it needs the deepspeed"
                          f" package ({exc}); pip install deepspeed, or export a Lightning .ckpt file") from None
    except Exception as exc:  # deepspeed's converter fails in many ways on a broken folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{checkpoint_dir}: cannot convert this DeepSpeed checkpoint ({first})") from None
    return Path(output_file)


def write_part_files(state_dict: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write each part of a task state dict as upstream's plain ``<part>.pt`` (floating tensors as FP32)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for part, state in split_parts(state_dict, "the consolidated checkpoint").items():
        plain = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu() for k, v in state.items()}
        path = out_dir / f"{part}.pt"
        torch.save(plain, path)
        written[part] = path
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosytrain.export.zero_to_state_dict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="the DeepSpeed checkpoint folder (e.g. runs/x/checkpoints/last.ckpt)")
    parser.add_argument("output_file", help="where to write the consolidated FP32 checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the folder's 'latest')")
    parser.add_argument("--split-into", default=None, help="also write llm.pt/flow.pt/hift.pt here")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint_dir, args.output_file, tag=args.tag)
        if args.split_into:
            ckpt = torch.load(out, map_location="cpu", weights_only=False)  # our own file, just written
            for part, path in write_part_files(ckpt["state_dict"], args.split_into).items():
                print(f"{part}: {path}")
    except (NotADirectoryError, ValueError) as err:  # ExportError is a ValueError
        print(f"zero_to_state_dict: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
