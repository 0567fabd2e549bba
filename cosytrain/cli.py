"""The command line: ``python -m cosytrain <command> [args]``.

The CLI is a thin dispatcher. Each command lives in the module that owns the work and exposes
``main(argv) -> int``; it is imported only when asked for, so ``--help`` stays fast and a command's
heavy dependencies (Lightning, onnxruntime) load only when that command runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("cosytrain.tasks.lightning_cli:main", "train a recipe (LightningCLI: --config, overrides)"),
    "validate": ("cosytrain.tasks.lightning_cli:main", "run validation for a recipe"),
    "test": ("cosytrain.tasks.lightning_cli:main", "run the test loop for a recipe"),
    "prepare": ("cosytrain.data.prepare:main", "turn a Kaldi- or LJSpeech-style folder into parquet shards"),
    "demo-corpus": ("cosytrain.data.demo_corpus:main", "synthesise and prepare the embedded demo corpus"),
    "export": ("cosytrain.export:main", "export checkpoints to an upstream-layout model directory (averaging, --base)"),
    "check-fp16": ("cosytrain.evaluation.fp16_cli:main",
                   "compare a model directory under FP16 autocast with FP32 (fp16_check.json, model card)"),
    "synthesize": ("cosytrain.inference.synthesize:main", "synthesise text with a model directory to a wav file"),
    "dpo-pairs": ("cosytrain.preference.pairs:main",
                  "sample, score and pair a model's speech tokens for a prepared corpus (DPO shards)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m cosytrain <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `python -m cosytrain <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"cosytrain: unknown command {command!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[command]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    if module_name == "cosytrain.tasks.lightning_cli":
        return int(func([command, *rest]) or 0)
    return int(func(rest) or 0)
