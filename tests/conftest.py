"""Shared test helpers: where the upstream reference data lives and how to load it.

The reference folder (``../shared/reference`` beside the clone, or ``$COSYTRAIN_REFERENCE``) holds
state-dict manifests and numeric fixtures made with upstream CosyVoice's own classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    env = os.environ.get("COSYTRAIN_REFERENCE")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "reference"


def load_fixture(name: str) -> dict[str, Any]:
    """Load ``fixtures/<name>.pt`` (weights_only) or skip when the reference folder is absent."""
    import torch

    path = reference_dir() / "fixtures" / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found (set COSYTRAIN_REFERENCE)")
    return torch.load(path, weights_only=True)


def load_manifest(name: str) -> dict[str, Any]:
    """Load ``manifests/<name>.json`` or skip when the reference folder is absent."""
    path = reference_dir() / "manifests" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"reference manifest {path} not found (set COSYTRAIN_REFERENCE)")
    return json.loads(path.read_text())


def pytest_configure(config):
    """One intra-op thread for the whole session, before any fixture of any scope runs; a private cache home.

    The suite's tensors are tiny, so a second OpenMP thread buys nothing and, on a busy 2-core
    machine (or beside the DDP tests' extra processes), spin-waiting threads made single tests
    5-8x slower. The fixtures were made with 2 threads; 1 thread differs by at most ~1e-6
    (reference README, section C), far inside every tolerance.
    """
    import tempfile

    import torch

    torch.set_num_threads(1)
    # caches (demo corpus, data index) go to a per-session folder, never the user's ~/.cache/cosytrain
    if "COSYTRAIN_HOME" not in os.environ:
        os.environ["COSYTRAIN_HOME"] = config._cosytrain_home = tempfile.mkdtemp(prefix="cosytrain-test-home-")


def pytest_unconfigure(config):
    import shutil

    home = getattr(config, "_cosytrain_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)
        os.environ.pop("COSYTRAIN_HOME", None)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The FULL default demo corpus, built once per test session into a private folder.

    Returns ``(root, data_list, build_seconds)``. The build itself is timed and checked in
    ``tests/data/test_demo_corpus.py``; end-to-end tests train on it.
    """
    import time

    pytest.importorskip("espeakng_loader")
    from cosytrain.data import demo_corpus

    root = tmp_path_factory.mktemp("demo_corpus")
    t0 = time.perf_counter()
    data_list = demo_corpus.build_demo_corpus(root)
    seconds = time.perf_counter() - t0
    (root / "build_seconds.txt").write_text(f"{seconds:.2f}\n")
    return root, data_list, seconds
