"""Callbacks for the two-process DDP test of ``SynthesisCallback`` (imported by class path from a recipe)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl

from cosytrain.tasks.synthesis_callback import SynthesisCallback


class RankTaggedSynthesis(SynthesisCallback):
    """``SynthesisCallback`` whose measuring step returns figures that name the rank that computed them.

    Only the measuring step (synthesis + scoring, covered by the single-process tests) is replaced; the
    DDP protocol under test (rank 0 measures, the figures are broadcast, every rank logs) is the real one.
    A rank other than 0 that measured, or a rank that logged without the broadcast, shows in the values.
    """

    def _synthesise_and_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[dict[str, float]]:
        rank = float(trainer.global_rank)
        return {"synth/full/mcd": 10.0 + rank, "synth/full/sim": 0.5 + rank / 10, "synth/measured_on_rank": rank}


class DumpSynthFigures(pl.Callback):
    """At the end of fitting, write this rank's logged ``synth/*`` values to ``<folder>/rank<k>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        figures: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("synth/")}
        path = Path(self.folder) / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"world_size": trainer.world_size, "figures": figures}))
