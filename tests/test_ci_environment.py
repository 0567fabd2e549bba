"""Tests that skip where they should fail: under CI (``CI=true``, exported by ``.ci/run``) a missing
reference folder or dependency is a failure; locally it may skip. These check the mechanism itself and
that the CI environment really holds what the suite relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import in_ci, reference_dir, require_module

REPO = Path(__file__).resolve().parents[1]


def _run_probe(tmp_path: Path, ci: str, reference: str) -> subprocess.CompletedProcess:
    """A one-test session that loads a reference fixture from ``reference`` and imports a missing module."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("from tests.conftest import load_fixture, require_module\n"
                     "def test_fixture():\n    load_fixture('v1_llm')\n"
                     "def test_module():\n    require_module('cosytrain_no_such_module')\n")
    env = {**os.environ, "CI": ci, "COSYTRAIN_REFERENCE": reference, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                           "-c", str(REPO / "setup.cfg"), str(probe)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_missing_reference_and_dependency_fail_under_ci_and_skip_locally(tmp_path: Path) -> None:
    missing = str(tmp_path / "no_reference_here")
    under_ci = _run_probe(tmp_path, "true", missing)
    assert under_ci.returncode == 1 and "2 failed" in under_ci.stdout, under_ci.stdout[-2000:]
    assert "CI=true: a missing reference or dependency is a failure" in under_ci.stdout
    local = _run_probe(tmp_path, "", missing)
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout[-2000:]


def test_ci_run_exports_ci_true() -> None:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    export = [i for i, ln in enumerate(lines) if ln.split("#")[0].split() == ["export", "CI=true"]]
    assert export and export[0] < next(i for i, ln in enumerate(lines) if ln.startswith("python -m pytest"))


@pytest.mark.parametrize("module", ["espeakng_loader", "onnx", "onnxruntime", "pyworld", "whisper", "tiktoken"])
def test_the_environment_holds_what_the_suite_needs(module: str) -> None:
    """Hard dependencies and the test extra (setup.cfg): importable, or (CI) a failure naming the module."""
    require_module(module)


def test_reference_folder_is_there() -> None:
    if not (reference_dir() / "fixtures").is_dir() and not in_ci():
        pytest.skip(f"reference folder {reference_dir()} not found")
    assert (reference_dir() / "fixtures" / "INDEX.json").is_file(), reference_dir()


def test_extras_named_in_the_readme_bring_the_whisper_tokenizer_and_pyworld() -> None:
    """The v1 recipes' text tokenizer and the vocoder's exact F0 are part of extras the README's set-up names
    (and of the test extra CI installs), pinned exactly in constraints.txt."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = {k: {re.split(r"[<>=!~\[ ;]", r.strip())[0].lower() for r in v.splitlines() if r.strip()}
              for k, v in cfg["options.extras_require"].items()}
    assert "openai-whisper" in extras["whisper"] & extras["official"] & extras["test"]
    assert "pyworld-prebuilt" in extras["vocoder"] & extras["official"] & extras["test"]
    pins = {ln.split("==")[0].lower() for ln in (REPO / "constraints.txt").read_text().splitlines() if "==" in ln}
    assert {"openai-whisper", "tiktoken", "pyworld-prebuilt"} <= pins
    readme = (REPO / "README.md").read_text()
    assert "pip install -e '.[official]'" in readme and ".[vocoder]" in readme and ".[whisper]" in readme
