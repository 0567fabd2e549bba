"""A run's TensorBoard scalars as JSON: ``{tag: [[step, value], ...]}``, for figures that must leave the machine.

    python bench/tb_scalars.py runs/sft [--prefix synth/,val/]

Reads every event file under the run folder (a resumed run writes several; a later value for the same step
wins, as TensorBoard shows it). ``--prefix`` keeps the tags that start with one of the comma-separated
prefixes (default: all). ``bench/gpu_session.sh`` uses it to bring the demo recipe's figures back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def scalars(run: Path, prefixes: tuple[str, ...] = ()) -> dict[str, list[list[float]]]:
    """``tag -> [[step, value], ...]`` sorted by step, from the event files under ``run``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run}: no TensorBoard event files under it; give the run folder (default_root_dir)")
    table: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if prefixes and not tag.startswith(prefixes):
                continue
            for event in acc.Scalars(tag):
                table.setdefault(tag, {})[int(event.step)] = float(event.value)
    return {tag: [[step, value] for step, value in sorted(values.items())] for tag, values in sorted(table.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run folder (Trainer default_root_dir)")
    p.add_argument("--prefix", default="", help="comma-separated tag prefixes to keep (default: all tags)")
    a = p.parse_args(argv)
    try:
        table = scalars(a.run, tuple(x for x in a.prefix.split(",") if x))
    except FileNotFoundError as exc:
        print(f"tb_scalars: {exc}", file=sys.stderr)
        return 1
    rows = [f" {json.dumps(tag)}: {json.dumps(values)}" for tag, values in table.items()]  # one tag a line
    print("{\n" + ",\n".join(rows) + "\n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
