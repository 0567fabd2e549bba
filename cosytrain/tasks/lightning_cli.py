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

import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

SUBCOMMANDS = ("fit", "validate", "test")
DEFAULT_RUN_DIR = "runs/cosytrain"


class ConfigError(Exception):
    """A user-facing configuration problem: reported as one line, exit code 2."""


def prepare_trainer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer kwargs -> the same with cosytrain's precision plugin, run-folder logger and last.ckpt."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from cosytrain.tasks.checkpoint_io import AtomicCheckpointIO, wants_atomic_io
    from cosytrain.tasks.deepspeed import prepare_deepspeed_kwargs
    from cosytrain.tasks.precision import apply_precision

    kw = apply_precision(prepare_deepspeed_kwargs(kwargs))  # DeepSpeed: its own precision rules first
    if wants_atomic_io(kw):  # checkpoints are whole or absent, even after SIGKILL/ENOSPC (checkpoint_io.py)
        plugins = kw.get("plugins") or []
        kw["plugins"] = [*(plugins if isinstance(plugins, (list, tuple)) else [plugins]), AtomicCheckpointIO()]
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


def _trainer_class():
    from lightning.pytorch import Trainer

    class CosyTrainer(Trainer):
        """Lightning's ``Trainer`` whose ``precision`` also accepts cosytrain's ``auto``.

        LightningCLI types ``trainer.precision`` from the Trainer signature, which has no ``auto``;
        the value is resolved (``cosytrain.tasks.precision.resolve_auto_precision``) before the
        Trainer is built, so Lightning itself never sees it.
        """

        def __init__(self, *args: Any, precision: Optional[Union[str, int]] = None, **kwargs: Any) -> None:
            super().__init__(*args, precision=precision, **kwargs)

    return CosyTrainer


def _cli_class():
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class CosyLightningCLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            _check_ckpt_path(self._get(self.config, "ckpt_path", default=None))
            _check_accumulation(self._get(self.config, "trainer", default=None), self._get(self.config, "model"))
            _check_clipping(self._get(self.config, "trainer", default=None), self._get(self.config, "model"))

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


_CKPT_KEYWORDS = ("last", "best", "hpc")


def _check_ckpt_path(ckpt_path: Any) -> None:
    """A ckpt_path naming no file is a config mistake, reported before any model is built."""
    if ckpt_path in (None, "") or str(ckpt_path) in _CKPT_KEYWORDS or "://" in str(ckpt_path):
        return
    if not Path(str(ckpt_path)).exists():
        raise ConfigError(f"ckpt_path: {ckpt_path} not found; give a checkpoint file, or `last` to resume the"
                          " run folder's last.ckpt")


def _check_accumulation(trainer: Any, model: Any) -> None:
    """SpeechTask.setup refuses two accumulation settings mid-fit; say it before anything is built."""
    def get(node: Any, *keys: str) -> Any:
        for key in keys:
            node = node.get(key) if hasattr(node, "get") else None
        return node

    current = get(trainer, "accumulate_grad_batches")
    accum = get(model, "init_args", "train_conf", "accum_grad")
    if current not in (None, 1) and accum is not None and int(current) != int(accum):
        raise ConfigError(f"gradient accumulation is set twice (trainer.accumulate_grad_batches={current},"
                          f" train_conf.accum_grad={accum}); set only train_conf.accum_grad")


def _check_clipping(trainer: Any, model: Any) -> None:
    """The task clips at train_conf.grad_clip (DeepSpeed too); a different trainer.gradient_clip_val is refused now."""
    def get(node: Any, *keys: str) -> Any:
        for key in keys:
            node = node.get(key) if hasattr(node, "get") else None
        return node

    clip_val = get(trainer, "gradient_clip_val")
    if clip_val is None or not str(get(model, "class_path") or "").startswith("cosytrain.tasks.speech_task."):
        return  # the vocoder's GAN task leaves trainer.gradient_clip_val to Lightning
    from cosytrain.tasks.optim import TrainConf
    from cosytrain.tasks.speech_task import check_clipping

    train_conf = get(model, "init_args", "train_conf")
    grad_clip = train_conf.get("grad_clip", TrainConf.grad_clip) if hasattr(train_conf, "get") else TrainConf.grad_clip
    try:
        check_clipping(clip_val, grad_clip)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def unpickling_line(err: BaseException) -> str:
    """torch's multi-paragraph weights-only refusal -> one line naming the forbidden global."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = (re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"unsupported GLOBAL (\S+)", text)
             or re.search(r"WeightsUnpickler error: ([^\n]+)", text))
    what = f" (it references {found.group(1)})" if found else ""
    return (f"refused to load a file holding pickled Python objects{what}; checkpoints and model weights are"
            " read with torch.load(weights_only=True) so that a file can never run code")


def _check_yaml_files(args: Sequence[str]) -> None:
    """jsonargparse reports broken YAML without the file's name; name it (config files and overlays)."""
    import yaml

    for arg in args:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if not value.endswith((".yaml", ".yml")) or not Path(value).is_file():
            continue
        try:
            yaml.safe_load(Path(value).read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{value}: not valid YAML{where}: {err.problem or err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{value}: not valid YAML: {' '.join(str(err).split())}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fit|validate|test`` with LightningCLI; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help"):
        print(f"cosytrain: the first argument must be one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    from jsonargparse import ArgumentError

    from cosytrain.data.pipeline import DataError
    from cosytrain.utils.atomic import AtomicWriteError

    cli_class, model_class, data_class = _cli_class()
    parser_kwargs: dict[str, Any] = {"parser_mode": "omegaconf", "exit_on_error": False}
    parser_kwargs.update({sub: {"parser_mode": "omegaconf", "exit_on_error": False} for sub in SUBCOMMANDS})
    # we pass argv explicitly AND keep sys.argv intact (Lightning's DDP launcher re-runs sys.argv)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    try:
        _check_yaml_files(args[1:])
        cli_class(
            model_class,
            data_class,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_class=_trainer_class(),
            args=args,
            parser_kwargs=parser_kwargs,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            seed_everything_default=1234,
        )
    except (ArgumentError, ConfigError) as err:
        # jsonargparse wraps an init_from file's weights-only refusal raised while building the model
        text = unpickling_line(err) if "Weights only load failed" in str(err) else one_line(str(err))
        print(f"cosytrain {args[0]}: {text}", file=sys.stderr)
        return 2
    except DataError as err:  # e.g. an empty data set, found only when fit sets the data up
        print(f"cosytrain {args[0]}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except pickle.UnpicklingError as err:  # init_from/ckpt_path file holding pickled code: refused, not run
        print(f"cosytrain {args[0]}: {unpickling_line(err)}", file=sys.stderr)
        return 2
    except AtomicWriteError as err:  # e.g. ENOSPC while saving a checkpoint; the previous one is intact
        print(f"cosytrain {args[0]}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help / --print_config exit through argparse
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
