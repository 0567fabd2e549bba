"""``python -m cosytrain check-fp16 --model_dir DIR [--data data.list]``: the FP16-vs-FP32 check of a
model directory (:func:`main`).

Runs :func:`cosytrain.evaluation.fp16_check.run_fp16_check` on the directory's parts, prints
:func:`~cosytrain.evaluation.fp16_figures.format_table`, writes the figures to ``fp16_check.json``
and the model-card section into the directory's ``cosytrain.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from cosytrain.evaluation.fp16_batches import DEFAULT_SEED, _data_batches, _feature_conf, _synthetic_for
from cosytrain.evaluation.fp16_check import run_fp16_check
from cosytrain.evaluation.fp16_figures import (
    MODEL_CARD_KEY,
    RESULT_FILE,
    format_table,
    model_card_section,
    resolve_tolerances,
)
from cosytrain.modeldir import METADATA_FILE, PARTS, ModelDirError, open_model_dir
from cosytrain.utils.atomic import atomic_write_text

__all__ = ["main"]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse_tolerances(items: Sequence[str]) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--tolerance {item!r}: write stage/metric=VALUE (or =none), e.g. flow/mel_l1=0.1")
        out[key.strip()] = None if value.strip().lower() in ("none", "off") else float(value)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cosytrain check-fp16",
        description="Compare a model directory's llm/flow/hift under FP16 autocast with FP32 on a fixed set of"
                    " utterances; prints a table, writes fp16_check.json and the fp16_check section of"
                    " cosytrain.json.")
    p.add_argument("--model_dir", "--model-dir", required=True, help="upstream-layout model directory")
    p.add_argument("--data", help="data.list of parquet shards (default: seeded synthetic utterances)")
    p.add_argument("--num_utterances", "--num-utterances", type=int, default=4)
    p.add_argument("--parts", default="llm,flow,hift", help="comma-separated parts to check (default: all present)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--tolerance", action="append", default=[], metavar="STAGE/METRIC=VALUE",
                   help="override a bound (repeatable), e.g. flow/mel_l1=0.1; =none switches it off")
    p.add_argument("--text_tokenizer", "--text-tokenizer",
                   help="tokenizer for --data (default: cosytrain.json's run_text_tokenizer, else the generation's)")
    p.add_argument("--text_tokenizer_path", "--text-tokenizer-path")
    p.add_argument("--output", help=f"where to write the figures (default: MODEL_DIR/{RESULT_FILE})")
    p.add_argument("--no_update_card", "--no-update-card", action="store_true",
                   help="do not write the fp16_check section into MODEL_DIR/cosytrain.json")
    return p


def _update_model_card(model_dir: Path, figures: Mapping[str, Any]) -> Path:
    card = model_dir / METADATA_FILE
    data: dict[str, Any] = {}
    if card.is_file():
        loaded = json.loads(card.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"{card}: is not a JSON object; fix or remove it, or pass --no_update_card")
        data = loaded
    data[MODEL_CARD_KEY] = model_card_section(figures)
    atomic_write_text(card, json.dumps(data, indent=2) + "\n")
    return card


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cosytrain check-fp16``: exit 0 when every figure is within bounds, 1 when one is not,
    2 when the check could not run (bad arguments, unreadable directory, a stage that cannot run in FP32)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    model_dir = Path(args.model_dir)
    try:
        tolerances = _parse_tolerances(args.tolerance)
        resolve_tolerances(tolerances)
        wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in PARTS]
        if unknown:
            raise ValueError(f"--parts: unknown {', '.join(unknown)}; parts are {', '.join(PARTS)}")
        if args.num_utterances < 1:
            raise ValueError("--num_utterances must be at least 1")
        if args.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(args.device)
        directory = open_model_dir(model_dir)
        present = [p for p in wanted if directory.weights_path(p).is_file()]
        if not present:
            raise ValueError(f"{model_dir}: holds none of {', '.join(p + '.pt' for p in wanted)}")
        parts = directory.load(present, device=device)
        feat = _feature_conf(directory.config, parts.get("hift"), directory.generation)
        if args.data:
            batches = _data_batches(args, parts, directory.generation, feat)
            source = str(Path(args.data).resolve())
        else:
            batches = [_synthetic_for(parts, feat, args.num_utterances, args.seed)]
            source = f"synthetic (seed {args.seed})"
        report = run_fp16_check(batches, llm=parts.get("llm"), flow=parts.get("flow"), hift=parts.get("hift"),
                                num_utterances=args.num_utterances, tolerances=tolerances, seed=args.seed)
    except (ModelDirError, ValueError, KeyError, TypeError, OSError) as exc:
        print(f"cosytrain check-fp16: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    figures = dict(report.figures, source=source, model_dir=str(model_dir.resolve()),
                   generation=directory.generation)
    print(format_table(figures))
    output = Path(args.output) if args.output else model_dir / RESULT_FILE
    atomic_write_text(output, json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {output}")
    if not args.no_update_card:
        print(f"model card section '{MODEL_CARD_KEY}' written to {_update_model_card(model_dir, figures)}")
    if not report.passed:
        return 1
    return 2 if figures.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
