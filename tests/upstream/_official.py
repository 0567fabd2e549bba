"""Official-size bases built by upstream, fine-tuned through cosytrain's recipes, exported with ``--base``.

Bases
    ``oracle/build_bases.py`` builds v1, v2 and v3 model directories at the released sizes with
    upstream's own classes (random weights), stand-in ONNX front ends (``tools/make_stub_onnx.py``:
    upstream's I/O names) and one base speaker. ~10 GB, so they are cached across sessions in
    ``$COSYTRAIN_UPSTREAM_CACHE`` (default ``~/.cache/cosytrain/upstream-bases``) under a key of
    everything they are made from (upstream configs, the build script, the stand-in tool, the
    oracle's pinned packages); older keys are removed when a new one is built.
Fine-tuning
    The repository's SFT recipes run unchanged apart from the machine (CPU, FP32, one optimizer
    step on batches of one demo utterance, no validation) and plain SGD (Adam's two moments on a
    0.5B model would double the memory and checkpoint size of a CPU test; the optimizer is not what
    is judged here). They run from a scratch working directory where the recipes' own relative paths
    (``pretrained/CosyVoice-300M-SFT``, ``pretrained_models/CosyVoice2-0.5B``, ...,
    ``data/train/data.list``) are links to the base and the demo shards, so ``init_from`` and
    ``pretrain_path`` are the recipes' own values.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT, reference_dir
from tests.upstream._oracle import SCRIPTS, Oracle

# recipe(s) per generation, and where each recipe expects the pretrained model directory
RECIPES = {"v1": ["cosyvoice_300m_llm_sft.yaml", "cosyvoice_300m_flow_sft.yaml"],
           "v2": ["cosyvoice2_sft.yaml"], "v3": ["cosyvoice3_sft.yaml"]}
PRETRAINED = {"v1": "pretrained/CosyVoice-300M-SFT", "v2": "pretrained_models/CosyVoice2-0.5B",
              "v3": "pretrained_models/Fun-CosyVoice3-0.5B"}
STEP = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--model.init_args.train_conf.optim", "sgd", "--model.init_args.train_conf.accum_grad", "1",
        "--data.init_args.val_data", "null", "--data.init_args.batch_type", "static",
        "--data.init_args.batch_size", "1", "--data.init_args.num_workers", "0",
        "--data.init_args.text_tokenizer", "byte"]


def cache_root() -> Path:
    env = os.environ.get("COSYTRAIN_UPSTREAM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cosytrain" / "upstream-bases"


def base_key() -> str:
    digest = hashlib.sha256()
    for path in [*(sorted((reference_dir() / "configs").glob("cosyvoice*.yaml"))), SCRIPTS / "build_bases.py",
                 REPO_ROOT / "tools" / "make_stub_onnx.py", REPO_ROOT / ".ci" / "upstream-constraints.txt"]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def stand_in_front_ends(folder: Path) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        from make_stub_onnx import export_campplus, export_speech_tokenizer
    finally:
        sys.path.pop(0)
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_campplus(folder / "campplus.onnx")
        for gen, stride in (("v1", 2), ("v2", 4), ("v3", 4)):
            export_speech_tokenizer(folder / f"speech_tokenizer_{gen}.onnx", stride=stride)
    return folder


def bases(oracle: Oracle) -> tuple[dict[str, Path], dict[str, Any]]:
    """gen -> official-size base directory (built by upstream once, then cached); and the build's report."""
    root = cache_root()
    folder = root / base_key()
    if not (folder / ".complete").is_file():
        for old in root.glob("*") if root.is_dir() else []:
            if old.is_dir() and old != folder:
                shutil.rmtree(old, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        report = oracle.run("build_bases", {"out": str(folder), "gens": ["v1", "v2", "v3"],
                                            "configs": str(reference_dir() / "configs"),
                                            "front_end": str(stand_in_front_ends(folder / "front_end"))},
                            timeout=1800)
        (folder / ".complete").write_text(str(report))
    else:
        report = {"cached": str(folder)}
    return {gen: folder / gen for gen in ("v1", "v2", "v3")}, report


def fine_tune(gen: str, base: Path, shards: Path, work: Path) -> list[Path]:
    """The generation's SFT recipe(s), one step each from ``base``; returns the last checkpoints."""
    from cosytrain.tasks.lightning_cli import main

    work.mkdir(parents=True, exist_ok=True)
    link = work / PRETRAINED[gen]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(base, target_is_directory=True)
    (work / "data").mkdir(exist_ok=True)
    (work / "data" / "train").symlink_to(shards, target_is_directory=True)
    extra = ["--data.init_args.text_tokenizer_path", "null"] if gen != "v1" else []
    old = Path.cwd()
    os.chdir(work)
    try:
        ckpts = []
        for recipe in RECIPES[gen]:
            run = work / "runs" / recipe.removesuffix(".yaml")
            assert main(["fit", "--config", str(REPO_ROOT / "recipes" / recipe), *STEP, *extra,
                         "--trainer.default_root_dir", str(run)]) == 0, recipe
            found = sorted(run.rglob("last.ckpt"))
            assert found, f"{recipe}: no last.ckpt under {run}"
            ckpts.append(found[0])
        return ckpts
    finally:
        os.chdir(old)
