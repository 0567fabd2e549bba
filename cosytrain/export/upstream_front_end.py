"""What upstream's ``AutoModel`` needs to open an exported directory, said in ``cosytrain.json``.

Upstream's ``CosyVoice*`` classes open ``campplus.onnx`` and ``speech_tokenizer_v{1,2,3}.onnx``
when they start and, for v2/v3, the Qwen tokenizer files in ``CosyVoice-BlankEN``. cosytrain's
built-in stand-ins (``*_builtin.npz``, fitted by ``prepare`` on the training corpus) are not ONNX
models of upstream's interface, so an export without ``--base`` loads and runs in upstream's model
classes (yaml, strict weights, token2wav) but upstream's ``AutoModel`` cannot open it: export with
``--base <upstream model dir>`` to ship that directory's front ends. The choice is recorded rather
than papered over, because a stand-in exported as ONNX would feed upstream's front end tokens from
a different codebook than a released model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPEECH_TOKENIZER = {"v1": "speech_tokenizer_v1.onnx", "v2": "speech_tokenizer_v2.onnx",
                    "v3": "speech_tokenizer_v3.onnx"}
UPSTREAM_TEXT_TOKENIZER = {"v1": "whisper", "v2": "qwen", "v3": "qwen3"}


def _has_qwen_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                     and (folder / "merges.txt").is_file())


def upstream_front_end(directory: Path, generation: str, text_tokenizer: str | None) -> dict[str, Any]:
    """The ``upstream_front_end`` section of ``cosytrain.json`` for a written directory."""
    missing = [name for name in ("campplus.onnx", SPEECH_TOKENIZER[generation]) if not (directory / name).is_file()]
    if generation != "v1" and not _has_qwen_tokenizer(directory / "CosyVoice-BlankEN"):
        missing.append("CosyVoice-BlankEN/tokenizer.json (or vocab.json + merges.txt)")
    section: dict[str, Any] = {"auto_model": not missing, "missing": missing}
    if missing:
        section["note"] = ("upstream's AutoModel cannot open this directory (its front end opens the files"
                           " missing here at start-up); its model classes load and run it. Export with --base"
                           " <upstream model dir> to ship upstream's front-end files")
    upstream = UPSTREAM_TEXT_TOKENIZER[generation]
    matches = text_tokenizer is None or text_tokenizer == upstream or (generation == "v2" and text_tokenizer == "qwen2")
    section["text_tokenizer"] = ("upstream's" if matches else
                                 f"differs: the llm was trained on {text_tokenizer!r} text ids, upstream's front end"
                                 f" feeds {upstream} ids")
    return section
