"""``python -m cosytrain fit|validate|test``: LightningCLI with cosytrain's run-folder conventions.

Conventions added on top of LightningCLI:

* ``trainer.default_root_dir`` is THE run folder. Unless a logger is configured, TensorBoard writes
  straight into it and checkpoints go to ``<run>/checkpoints`` with ``last.ckpt`` kept, so
  ``--ckpt_path last`` finds the previous run and its curves continue in the same folder.
  The resolved config is saved as ``<run>/config.yaml`` (overwritten on resume).
* ``trainer.precision`` means the same on every device (``cosytrain.tasks.precision``): ``16-mixed``
  is FP16 + GradScaler even on CPU.
* A config mistake (unknown key, wrong type, bad value) prints ONE line and exits with code 2.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

SUBCOMMANDS = ("fit", "validate", "test")
DEFAULT_RUN_DIR = "runs/cosytrain"


class ConfigError(Exception):
    """A user-facing configuration problem: reported as one line, exit code 2."""


def prepare_trainer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer kwargs -> the same with cosytrain's precision plugin, run-folder logger and last.ckpt."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from cosytrain.tasks.precision import apply_precision

    kw = apply_precision(kwargs)
    run_dir = str(kw.get("default_root_dir") or DEFAULT_RUN_DIR)
    kw["default_root_dir"] = run_dir
    if kw.get("logger") in (None, True):
        # name="" and version="" put events, hparams.yaml, config.yaml and checkpoints/ in run_dir itself
        kw["logger"] = TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False)
    callbacks = kw.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if kw.get("enable_checkpointing", True) is not False:
        checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
        if not checkpoints:
            # saves when an epoch ends, which includes max_steps stopping the run mid-epoch;
            # recipes add cosytrain.tasks.callbacks.StepCheckpoint for step intervals
            callbacks.append(ModelCheckpoint(dirpath=str(Path(run_dir) / "checkpoints"), save_last=True))
        elif not any(c.save_last for c in checkpoints):
            checkpoints[0].save_last = True  # `--ckpt_path last` relies on last.ckpt
    kw["callbacks"] = callbacks
    return kw


def build_trainer(**kwargs: Any):
    """A Trainer with cosytrain's conventions, for use from Python (tests, notebooks)."""
    from lightning.pytorch import Trainer

    return Trainer(**prepare_trainer_kwargs(kwargs))


def _cli_class():
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class CosyLightningCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
                raise ConfigError(f"{type(err).__name__}: {err}") from err

        def instantiate_trainer(self, **kwargs: Any):
            extra_callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            return self._instantiate_trainer(prepare_trainer_kwargs(trainer_config), extra_callbacks)

    # any LightningModule: SpeechTask/LLMTask/FlowTask and the vocoder's HiFTTask
    return CosyLightningCLI, LightningModule, LightningDataModule


_NOISE = ("Subtypes:", "Errors:", "Given value", "Does not validate against any of the Union subtypes",
          "Expected a <class 'NoneType'>", "tip:", "usage:")


def one_line(message: str, limit: int = 400) -> str:
    """jsonargparse's nested multi-line error -> ``<dotted key>: <innermost problem> (in <class>)``."""
    text = str(message)
    keys: list[str] = []
    for key in re.findall(r'Parser key "([^"]+)"', text):
        if key not in keys:
            keys.append(key)
    classes = re.findall(r"class_path '([^']+)'", text)
    details = []
    for line in text.splitlines():
        line = line.strip().lstrip("-").strip()
        line = re.sub(r'^Parser key "[^"]+":\s*', "", line)
        line = re.sub(r"^Problem with given class_path '[^']+':\s*", "", line)
        if line and not line.startswith(_NOISE):
            details.append(line)
    detail = details[-1] if details else text.strip().splitlines()[0] if text.strip() else "invalid configuration"
    where = ".".join(keys)
    out = f"{where}: {detail}" if where and where not in detail else detail
    if classes and classes[-1] not in out:
        out += f" (in {classes[-1]})"
    out = " ".join(out.split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fit|validate|test`` with LightningCLI; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help"):
        print(f"cosytrain: the first argument must be one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    from jsonargparse import ArgumentError

    cli_class, model_class, data_class = _cli_class()
    parser_kwargs: dict[str, Any] = {"parser_mode": "omegaconf", "exit_on_error": False}
    parser_kwargs.update({sub: {"parser_mode": "omegaconf", "exit_on_error": False} for sub in SUBCOMMANDS})
    # we pass argv explicitly AND keep sys.argv intact (Lightning's DDP launcher re-runs sys.argv)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    try:
        cli_class(
            model_class,
            data_class,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            parser_kwargs=parser_kwargs,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            seed_everything_default=1234,
        )
    except (ArgumentError, ConfigError) as err:
        print(f"cosytrain {args[0]}: {one_line(str(err))}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --print_config exit through argparse
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
