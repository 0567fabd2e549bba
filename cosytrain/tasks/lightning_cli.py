"""``python -m cosytrain fit|validate|test``: LightningCLI with cosytrain's run-folder conventions.

Conventions added on top of LightningCLI:

* ``trainer.default_root_dir`` is THE run folder. Unless a logger is configured, TensorBoard writes
  straight into it and checkpoints go to ``<run>/checkpoints`` with ``last.ckpt`` kept, so
  ``--ckpt_path last`` finds the previous run and its curves continue in the same folder.
  The resolved config is saved as ``<run>/config.yaml`` (overwritten on resume).
* ``trainer.precision`` means the same on every device (``cosytrain.tasks.precision``): ``16-mixed``
  is FP16 + GradScaler even on CPU.
* A config mistake (unknown key, wrong type, bad value, a ``ConfigurationError`` raised by cosytrain's
  own checks while building or setting up the run) prints ONE line and exits with code 2. Any other
  exception is a bug and keeps its traceback (exit 1), also when jsonargparse wrapped it while
  building the model: the cause chain decides (``configuration_error_in``); the Trainer's own
  argument checks count as configuration errors. ``COSYTRAIN_TRACEBACK=1``
  prints the traceback of configuration errors too.

The one-line rewriting of jsonargparse's messages (``one_line``) reads its error texts ("Parser key",
"class_path"), and the root-cause walk relies on jsonargparse chaining the error of a failed class
(``raise ... from``): both are tested against the lowest jsonargparse ``setup.cfg`` allows (4.32).
"""

from __future__ import annotations

import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

SUBCOMMANDS = ("fit", "validate", "test")
DEFAULT_RUN_DIR = "runs/cosytrain"


class ConfigError(Exception):
    """A user-facing configuration problem: reported as one line, exit code 2."""


def cause_chain(err: BaseException) -> list[BaseException]:
    """``err`` and its ``raise ... from`` causes, outermost first (jsonargparse wraps class errors)."""
    chain = [err]
    while chain[-1].__cause__ is not None and all(chain[-1].__cause__ is not e for e in chain):
        chain.append(chain[-1].__cause__)
    return chain


def configuration_error_in(err: BaseException) -> BaseException | None:
    """The innermost configuration error of ``err``'s cause chain, or None when the chain is a bug."""
    found = [e for e in cause_chain(err) if is_configuration_error(e)]
    return found[-1] if found else None


def is_configuration_error(err: BaseException) -> bool:
    """True for errors that name a user's mistake (printed as one line); False for bugs (traceback)."""
    import pickle

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from cosytrain.errors import ConfigurationError

    return isinstance(err, (ConfigurationError, ConfigError, FileNotFoundError, NotADirectoryError,
                            pickle.UnpicklingError, MisconfigurationException))


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
    return _trainer_class()(**prepare_trainer_kwargs(kwargs))


def _trainer_class():
    """``CosyTrainer``: records the ``ckpt_path`` of each stage (so ``init_from`` is not read on resume) and
    accepts ``precision: auto`` (see ``cosytrain.tasks.init_from``)."""
    from cosytrain.tasks.init_from import CosyTrainer

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
            except Exception as err:  # noqa: BLE001 - sorted into config errors and bugs just below
                found = configuration_error_in(err)
                if found is None:
                    # a bug in model/task code: re-raise the bug itself with its own frames, without
                    # jsonargparse's "Does not validate against any of the Union subtypes" wrapper
                    root = cause_chain(err)[-1]
                    raise root.with_traceback(root.__traceback__) from None
                if "Weights only load failed" in str(found):
                    raise ConfigError(unpickling_line(found)) from err
                raise ConfigError(" ".join(str(found).split()) or type(found).__name__) from err

        def instantiate_trainer(self, **kwargs: Any):
            try:
                return self._build_trainer(**kwargs)
            except (ValueError, TypeError, KeyError) as err:  # the Trainer's own checks of its (user) arguments
                if configuration_error_in(err) is not None:
                    raise
                from cosytrain.errors import ConfigurationError

                raise ConfigurationError(f"trainer: {' '.join(str(err).split())}") from err

        def _build_trainer(self, **kwargs: Any):
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


def _get(node: Any, *keys: str) -> Any:
    """``node[k1][k2]...`` through a parsed config (dicts or Namespaces); None where a key is missing."""
    for key in keys:
        node = node.get(key) if hasattr(node, "get") else None
    return node


def _check_accumulation(trainer: Any, model: Any) -> None:
    """SpeechTask.setup refuses two accumulation settings mid-fit; say it before anything is built."""
    current = _get(trainer, "accumulate_grad_batches")
    accum = _get(model, "init_args", "train_conf", "accum_grad")
    if current not in (None, 1) and accum is not None and int(current) != int(accum):
        raise ConfigError(f"gradient accumulation is set twice (trainer.accumulate_grad_batches={current},"
                          f" train_conf.accum_grad={accum}); set only train_conf.accum_grad")


def _check_clipping(trainer: Any, model: Any) -> None:
    """The task clips at train_conf.grad_clip (DeepSpeed too); a different trainer.gradient_clip_val is refused now."""
    clip_val = _get(trainer, "gradient_clip_val")
    if clip_val is None or not str(_get(model, "class_path") or "").startswith("cosytrain.tasks.speech_task."):
        return  # the vocoder's GAN task leaves trainer.gradient_clip_val to Lightning
    from cosytrain.tasks.optim import TrainConf
    from cosytrain.tasks.speech_task import check_clipping

    train_conf = _get(model, "init_args", "train_conf")
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

    from cosytrain.utils.text_files import TextFileError, read_text

    for arg in args:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if not value.endswith((".yaml", ".yml")) or not Path(value).is_file():
            continue
        try:
            yaml.safe_load(read_text(value))  # not UTF-8: TextFileError naming file:line:column
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{value}: not valid YAML{where}: {err.problem or err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{value}: not valid YAML: {' '.join(str(err).split())}") from None
        except TextFileError as err:
            raise ConfigError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fit|validate|test`` with LightningCLI; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help"):
        print(f"cosytrain: the first argument must be one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    from jsonargparse import ArgumentError

    from cosytrain.errors import want_traceback
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
        return _one_line_exit(args[0], text, err, 2, want_traceback())
    except pickle.UnpicklingError as err:  # init_from/ckpt_path file holding pickled code: refused, not run
        return _one_line_exit(args[0], unpickling_line(err), err, 2, want_traceback())
    except AtomicWriteError as err:  # e.g. ENOSPC while saving a checkpoint; the previous one is intact
        return _one_line_exit(args[0], " ".join(str(err).split()), err, 1, want_traceback())
    except Exception as err:  # noqa: BLE001 - config errors found once the run is set up (data, init_from, ...)
        found = configuration_error_in(err)
        if found is None:
            raise  # a bug: Python prints the traceback, exit code 1
        return _one_line_exit(args[0], " ".join(str(found).split()), err, 2, want_traceback())
    except SystemExit as exc:  # --help / --print_config exit through argparse
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return 0


def _one_line_exit(command: str, text: str, err: BaseException, code: int, show_traceback: bool) -> int:
    if show_traceback:
        import traceback

        traceback.print_exception(err)
    print(f"cosytrain {command}: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
