"""The pytest side of the upstream oracle: find its python and upstream's source, run a script of
``tests/upstream/oracle/`` there in a subprocess, return its JSON verdicts.

The oracle is upstream CosyVoice's own code (``../shared/upstream``) in its own venv, built by
``bash .ci/upstream-env`` (``.ci/run`` does it and exports ``COSYTRAIN_UPSTREAM_PYTHON``). Without
it the tests of this tier skip with a message, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = Path(__file__).resolve().parent / "oracle"


def upstream_dir() -> Path:
    """``../shared/upstream`` beside the clone (or ``$COSYTRAIN_UPSTREAM_SRC``): CosyVoice + Matcha-TTS."""
    env = os.environ.get("COSYTRAIN_UPSTREAM_SRC")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "upstream"


def _default_python() -> Path | None:
    """The venv ``.ci/upstream-env`` builds, when it is there (so a developer needs no variable)."""
    root = Path(os.environ.get("COSYTRAIN_VENV_ROOT", Path.home() / ".cache" / "cosytrain" / "ci"))
    try:
        out = subprocess.run(["bash", "-c", "cat .ci/upstream-requirements.txt .ci/upstream-constraints.txt"
                              " | sha256sum | cut -c1-16"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    venv = root / f"upstream-venv-{out.stdout.strip()}"
    return venv / "bin" / "python" if (venv / ".complete").is_file() else None


def _unavailable(why: str) -> None:
    message = f"upstream oracle unavailable: {why} (build it with `bash .ci/upstream-env`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI=true: the oracle tier must run", pytrace=False)
    pytest.skip(message)


class Oracle:
    """Runs ``oracle/<script>.py`` in the oracle's python with upstream's source on PYTHONPATH."""

    def __init__(self, python: Path, upstream: Path):
        self.python, self.upstream = python, upstream
        self.seconds: dict[str, float] = {}

    def run(self, script: str, request: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="cosytrain-oracle-") as tmp:
            req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
            req.write_text(json.dumps(request))
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
            env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), str(self.upstream / "CosyVoice"),
                                                 str(self.upstream / "Matcha-TTS")])
            env.setdefault("COSYTRAIN_ORACLE_THREADS", "2")
            env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"  # upstream must never reach a hub
            t0 = time.perf_counter()
            proc = subprocess.run([str(self.python), str(SCRIPTS / f"{script}.py"), str(req), str(res)], cwd=tmp,
                                  env=env, capture_output=True, text=True, timeout=timeout)
            self.seconds[script] = self.seconds.get(script, 0.0) + time.perf_counter() - t0
            if proc.returncode != 0 or not res.is_file():
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
                raise AssertionError(f"oracle script {script} exited {proc.returncode}:\n{tail}")
            return json.loads(res.read_text())


def make_oracle() -> Oracle:
    upstream = upstream_dir()
    if not (upstream / "CosyVoice" / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
        _unavailable(f"upstream source not found at {upstream} (set COSYTRAIN_UPSTREAM_SRC)")
    env = os.environ.get("COSYTRAIN_UPSTREAM_PYTHON")
    python = Path(env) if env else _default_python()
    if python is None:
        _unavailable("COSYTRAIN_UPSTREAM_PYTHON is not set and no built oracle venv was found")
    if not python.is_file():
        _unavailable(f"{python}: no such python (COSYTRAIN_UPSTREAM_PYTHON)")
    return Oracle(python, upstream)


def verdict_ok(verdict: dict[str, Any]) -> None:
    """Assert that an oracle verdict has no failed stage, naming the stage and upstream's error."""
    assert verdict["failed"] is None, (f"upstream fails at {verdict['failed']} for {verdict['path']}:"
                                       f" {verdict['error']}")


__all__ = ["Oracle", "make_oracle", "upstream_dir", "verdict_ok"]
