"""Shared test helpers: where the upstream reference data lives and how to load it.

The reference folder (``../shared/reference`` beside the clone, or ``$COSYTRAIN_REFERENCE``) holds
state-dict manifests and numeric fixtures made with upstream CosyVoice's own classes.

Missing references or dependencies: under CI (``CI=true``, which ``.ci/run`` exports) a test that
needs one FAILS, so a broken CI environment cannot pass by skipping; locally it skips with the reason
(``skip_or_fail``, ``require_module``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    env = os.environ.get("COSYTRAIN_REFERENCE")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "reference"


def in_ci() -> bool:
    """True when ``CI`` says so (``true``/``1``/``yes``): missing things fail instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip locally; fail under CI, where a missing reference or dependency is a broken environment."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: a missing reference or dependency is a failure, not a skip]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, install: str = "pip install -c constraints.txt -e '.[test]'") -> ModuleType:
    """``importlib.import_module(name)``, or skip (locally) / fail (CI) naming how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        skip_or_fail(f"{name} is not importable ({err}); {install}")


def require_reference(path: Path) -> Path:
    """``path`` inside the reference folder, or skip (locally) / fail (CI)."""
    if not path.exists():
        skip_or_fail(f"reference {path} not found (set COSYTRAIN_REFERENCE or put ../shared/reference beside the clone)")
    return path


def load_fixture(name: str) -> dict[str, Any]:
    """Load ``fixtures/<name>.pt`` (weights_only); skip (locally) / fail (CI) when the reference folder is absent."""
    import torch

    path = require_reference(reference_dir() / "fixtures" / f"{name}.pt")
    return torch.load(path, weights_only=True)


def load_manifest(name: str) -> dict[str, Any]:
    """Load ``manifests/<name>.json``; skip (locally) / fail (CI) when the reference folder is absent."""
    path = require_reference(reference_dir() / "manifests" / f"{name}.json")
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

    require_module("espeakng_loader")  # a hard dependency (setup.cfg): fails under CI when missing
    from cosytrain.data import demo_corpus

    root = tmp_path_factory.mktemp("demo_corpus")
    t0 = time.perf_counter()
    data_list = demo_corpus.build_demo_corpus(root)
    seconds = time.perf_counter() - t0
    (root / "build_seconds.txt").write_text(f"{seconds:.2f}\n")
    return root, data_list, seconds
