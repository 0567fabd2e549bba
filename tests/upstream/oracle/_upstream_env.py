"""Runs inside the ORACLE's python only (``COSYTRAIN_UPSTREAM_PYTHON``), never in cosytrain's.

Work-arounds for upstream quirks that have nothing to do with cosytrain, applied inside the
oracle process before any upstream module is imported. No line of upstream is copied here:

* ``cosyvoice/cli/cosyvoice.py`` imports ``modelscope`` at module level only for
  ``snapshot_download`` (model ids that are not local folders): a stub module that refuses to
  download stands in for it.
* torchaudio 2.9's ``torchaudio.load`` needs torchcodec (not installed) and ignores
  ``backend='soundfile'``; upstream's ``load_wav`` and dataset processors call it, so it is
  replaced with a soundfile reader returning the same ``(channels, samples) float32, rate``.
* one or two torch threads (the CI machine has 2 cores), set from ``COSYTRAIN_ORACLE_THREADS``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Any, Callable


def prepare() -> None:
    stub = types.ModuleType("modelscope")

    def snapshot_download(model_id: str, *args: Any, **kwargs: Any) -> str:
        raise RuntimeError(f"oracle: {model_id} is not a local directory and nothing is downloaded here")

    stub.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    sys.modules.setdefault("modelscope", stub)

    import soundfile
    import torch
    import torchaudio

    def load(uri: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, int]:
        data, rate = soundfile.read(uri if hasattr(uri, "read") else str(uri), dtype="float32", always_2d=True)
        return torch.from_numpy(data.T.copy()), rate

    torchaudio.load = load
    torch.set_num_threads(int(os.environ.get("COSYTRAIN_ORACLE_THREADS", "2")))


def error_line(exc: BaseException) -> str:
    """``Type: message`` plus the innermost frame, on one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" [{Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600] + where


def main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """``script REQUEST.json RESULT.json``: the request in, the verdicts out (a JSON object)."""
    request = json.loads(Path(sys.argv[1]).read_text())
    prepare()
    result = run(request)
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1))
