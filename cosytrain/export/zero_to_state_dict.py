"""DeepSpeed ZeRO-2/3 checkpoint -> one FP32 Lightning checkpoint -> upstream part files.

With ``strategy: DeepSpeedStrategy`` (``conf/strategy/deepspeed_zero{2,3}.yaml``) Lightning saves a
checkpoint FOLDER of partitioned shards (``last.ckpt/``), not a file. Export and ``init_from`` need
plain tensors, so this tool consolidates it with Lightning's
``convert_zero_checkpoint_to_fp32_state_dict`` (needs ``deepspeed`` installed) and can split the
result into ``llm.pt``/``flow.pt`` by key prefix (DESIGN.md: export is a prefix split).

Usage::

    python -m cosytrain.tasks.zero_to_state_dict runs/x/checkpoints/last.ckpt runs/x/last-fp32.ckpt \
        [--tag global_step100] [--split-into runs/x/parts]

Untested on this project's CI machines: Lightning's DeepSpeed strategy needs CUDA GPUs.
The prefix split (``split_parts``) is tested without DeepSpeed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

PART_PREFIXES = ("llm", "flow", "hift")


def consolidate(checkpoint_dir: str | Path, output_file: str | Path, tag: str | None = None) -> Path:
    """ZeRO shard folder -> a single FP32 Lightning checkpoint file (``state_dict`` + loop state)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise NotADirectoryError(f"{checkpoint_dir} is not a DeepSpeed checkpoint folder (a plain .ckpt file "
                                 "needs no conversion)")
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ModuleNotFoundError("consolidating a ZeRO checkpoint needs DeepSpeed: pip install deepspeed") from err
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint_dir), str(output_file), tag=tag)
    return Path(output_file)


def split_parts(state_dict: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write each ``<part>.`` prefix of a task state dict as upstream's plain ``<part>.pt``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for part in PART_PREFIXES:
        sub = {k[len(part) + 1:]: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
               for k, v in state_dict.items() if k.startswith(part + ".") and isinstance(v, torch.Tensor)}
        if sub:
            path = out_dir / f"{part}.pt"
            torch.save(sub, path)
            written[part] = path
    if not written:
        raise ValueError(f"no key starts with one of {[p + '.' for p in PART_PREFIXES]}; is this a cosytrain checkpoint?")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosytrain.tasks.zero_to_state_dict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="the DeepSpeed checkpoint folder (e.g. runs/x/checkpoints/last.ckpt)")
    parser.add_argument("output_file", help="where to write the consolidated FP32 checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the folder's 'latest')")
    parser.add_argument("--split-into", default=None, help="also write llm.pt/flow.pt here")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint_dir, args.output_file, tag=args.tag)
        if args.split_into:
            ckpt = torch.load(out, map_location="cpu", weights_only=False)  # our own file, just written
            for part, path in split_parts(ckpt["state_dict"], args.split_into).items():
                print(f"{part}: {path}")
    except (NotADirectoryError, ModuleNotFoundError, ValueError) as err:
        print(f"zero_to_state_dict: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
