"""Every shipped recipe parses into a complete LightningCLI config (nothing is instantiated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cosytrain.tasks.lightning_cli import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {"sft.yaml", "cosyvoice_300m_llm_sft.yaml", "cosyvoice_300m_flow_sft.yaml"} <= {r.name for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses(recipe, capsys):
    assert main(["fit", "--config", str(recipe), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("cosytrain.tasks.")
    assert printed["data"]["class_path"].startswith("cosytrain.data.")
    assert printed["trainer"]["precision"] in ("auto", "16-mixed", "bf16-mixed", "32-true")


def test_default_recipe_is_the_demo_with_validation_and_best_k():
    recipe = yaml.safe_load((RECIPES[0].parent / "sft.yaml").read_text())
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in recipe["trainer"]["callbacks"]}
    monitors = {c["init_args"]["monitor"]: c["init_args"] for c in recipe["trainer"]["callbacks"]
                if c["class_path"].endswith("ModelCheckpoint")}
    assert monitors["val/loss"]["save_top_k"] > 0 and monitors["synth/full/mcd"]["mode"] == "min"
    assert "StepCheckpoint" in callbacks and "MelImageLogger" in callbacks and "SynthesisCallback" in callbacks
    data = yaml.safe_load((RECIPES[0].parent / recipe["data"]).read_text())
    assert data["class_path"].endswith("DemoDataModule") and data["init_args"]["val_shards"] >= 1
