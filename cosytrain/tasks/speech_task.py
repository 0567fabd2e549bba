"""The LightningModule that trains CosyVoice parts (``llm`` and/or ``flow``) the way upstream does.

One class serves every stage. The trained part lives under the attribute named after it (``llm``,
``flow``) so Lightning checkpoint keys carry the prefix ``llm.``/``flow.`` and export is a prefix
split (DESIGN.md). A part is any ``nn.Module`` whose ``forward(batch, device)`` returns a dict with
``loss`` (and optionally ``acc`` and other scalars), exactly upstream's call.

Stages: upstream trains llm and flow in separate runs; so does a recipe that names one part
(``LLMTask``/``FlowTask``). A recipe that names both trains them in ONE run on the same batches: the
loss is the sum, grad clipping and the finiteness check are done per part (as two upstream runs
would), one Adam(W) with one schedule covers both. Adam is per-parameter and the parts share no
parameters, so each part gets the update its own run would get, except that a non-finite step of
either part skips the step for both.

Optimisation follows upstream ``train_utils.update_parameter_and_lr``: loss / accum_grad, backward
(scaled under FP16), at the accumulation boundary unscale -> clip the grad norm to ``grad_clip`` ->
step only if the norm is finite -> scaler update (lowers the scale after an overflow) -> zero grads
-> the lr schedule steps ALWAYS, skipped or not (upstream does the same, so lr follows the step
count). Lightning's loop does accumulation, DDP no_sync and schedule stepping; we skip a step by
dropping the gradients in ``on_before_optimizer_step`` (an optimizer with no grads changes nothing;
under FP16 the GradScaler also sees the overflow and skips), so this works for every precision.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.tasks.init_from import InitFrom
from cosytrain.tasks.lora import Adapters
from cosytrain.tasks.optim import TrainConf, build_optimization
from cosytrain.tasks.precision import loss_scale
from cosytrain.tasks.token_noise import check_rate, noisy_speech_tokens

PART_NAMES = ("llm", "flow")


def load_part_weights(name: str, part: nn.Module, model_dir: str | Path) -> None:
    """Load ``<model_dir>/<name>.pt`` (upstream's plain state dict) into ``part``, strictly and weights-only.

    The checks before the load are the model directory's (:func:`cosytrain.modeldir.check_state_dict`):
    weights of another generation, then every missing, unexpected or shape-mismatched key, in one line.
    """
    from cosytrain.models.lora import has_adapters

    if has_adapters(part):  # peft renamed the adapted layers: the base would not load (fish-speech #1163)
        raise ValueError(f"init_from: the {name} part already carries LoRA adapters; its base weights must load"
                         " before the adapters attach")
    path = Path(model_dir) / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} not found; init_from must be a model directory holding {name}.pt")
    from cosytrain.modeldir import check_state_dict, clean_part_state_dict, load_weights_file

    # weights only (pickled code -> one line); upstream's DDP save_model adds int 'epoch'/'step' entries
    state = clean_part_state_dict(name, load_weights_file(path, f"init_from: {path}"), f"init_from: {path}")
    check_state_dict(part, state, f"init_from {path}", part=name, model_what=f"the recipe's {name}",
                     fix="check that the recipe's model config matches the model directory", limit=6)
    part.load_state_dict(state, strict=True)


class SpeechTask(pl.LightningModule):
    """Trains the given parts; see the module docstring for the optimisation contract.

    Args:
        llm: the text-to-speech-token LM (any module with upstream's ``forward(batch, device)``).
        flow: the token-to-mel flow-matching model, same contract.
        train_conf: upstream's ``train_conf`` optimisation keys (``optim``, ``optim_conf``,
            ``scheduler``, ``scheduler_conf``, ``grad_clip``, ``accum_grad``).
        freeze: parameter-name prefixes to freeze, with the part prefix (``llm.text_encoder``).
        init_from: an upstream model directory; weights only, strict, read and checked when the run is
            set up (before step 1) and NOT read when the run resumes from a checkpoint (``ckpt_path``),
            which holds every weight (``cosytrain.tasks.init_from``). ``load_init_from()`` reads it now.
            With ``lora`` it is read at construction, on resume too: LoRA checkpoints hold only the adapters.
        lora: LoRA adapters per part (``{llm: {r: 16, alpha: 32, dropout: 0.05, target_modules: [...],
            train: [...]}}``, see :class:`cosytrain.models.lora.LoRASpec`): attached right after the
            ``init_from`` weights load; only the adapters (and ``train`` prefixes) train, and checkpoints
            hold those, not the base, which is read from ``init_from`` on resume too (``tasks/lora.py``).
        step_seed: re-seed torch's, python's and numpy's RNGs before every training batch from (step_seed, step, micro-batch,
            rank), and before every validation batch from (step_seed, batch index). Dropout, the flow's
            random times/noise etc. then depend only on the position in training, so a run resumed
            from a checkpoint draws exactly what an uninterrupted run draws (Lightning does not save
            RNG state), DDP ranks draw differently, and validation losses are comparable across
            evaluations. None keeps one free-running RNG stream (upstream's behaviour).
        llm_input_noise: during training, the fraction of the speech tokens the LLM reads that are
            replaced by random ones (uniform over its speech vocabulary), its targets unchanged
            (``tasks/token_noise.py``; 0 = upstream's clean teacher forcing). It makes a small LLM read
            its text rather than continue its own tokens (the demo recipe uses 0.4).
    """

    def __init__(
        self,
        llm: nn.Module | None = None,
        flow: nn.Module | None = None,
        train_conf: dict[str, Any] | None = None,
        freeze: list[str] | None = None,
        init_from: str | None = None,
        step_seed: int | None = 1986,
        lora: dict[str, dict[str, Any]] | None = None,
        llm_input_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(PART_NAMES))
        if llm is None and flow is None:
            raise ConfigurationError("SpeechTask needs at least one part: set model.init_args.llm and/or"
                                     " model.init_args.flow")
        self.part_names: list[str] = []
        for name, part in (("llm", llm), ("flow", flow)):
            if part is not None:
                setattr(self, name, part)
                self.part_names.append(name)
        self.train_conf = TrainConf.from_dict(train_conf)
        self._init_from = InitFrom(init_from, self._load_parts)
        self.adapters = Adapters.from_config(lora, self.part_names, init_from)
        if self.adapters is not None:
            # LoRA checkpoints hold the adapters, not the frozen base: the base is read now (on resume
            # too), and the adapters attach after it, never before (models/lora.py)
            self.adapters.check_base()
            self._init_from.load_now()
            self.adapters.attach(self)
        self.frozen = self._freeze(freeze or [])
        self.step_seed = step_seed
        self.llm_input_noise = check_rate(llm_input_noise)
        if self.llm_input_noise and llm is None:
            raise ConfigurationError("llm_input_noise is set but this run trains no llm (model.init_args.llm)")
        self.skipped_steps = 0
        self.last_grad_norm: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def _load_parts(self, model_dir: str) -> None:
        for name in self.part_names:
            load_part_weights(name, getattr(self, name), model_dir)

    def load_init_from(self) -> None:
        """Read ``init_from`` now (the trainer does it at setup unless the run resumes)."""
        self._init_from.load_now()

    def parts(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.part_names}

    def _freeze(self, prefixes: list[str]) -> list[str]:
        names = [n for n, _ in self.named_parameters()]
        frozen: list[str] = []
        for prefix in prefixes:
            stem = prefix.rstrip(".")
            hits = [n for n in names if n == stem or n.startswith(stem + ".")]
            if not hits:
                raise ConfigurationError(f"freeze: prefix {prefix!r} matches no parameter; names look like {names[:3]}")
            frozen += hits
        params = dict(self.named_parameters())
        for n in frozen:
            params[n].requires_grad_(False)
        return sorted(set(frozen))

    def setup(self, stage: str) -> None:
        self._init_from.on_setup(self.trainer)
        if stage != "fit":
            return
        accum = int(self.train_conf.accum_grad)
        current = self.trainer.accumulate_grad_batches
        if current not in (1, accum):
            raise ConfigurationError(f"gradient accumulation is set twice (trainer.accumulate_grad_batches={current}, "
                                     f"train_conf.accum_grad={accum}); set only train_conf.accum_grad")
        # Lightning reads this attribute live (its GradientAccumulationScheduler sets it the same way)
        self.trainer.accumulate_grad_batches = accum
        check_clipping(self.trainer.gradient_clip_val, self.train_conf.grad_clip)

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimization([p for p in self.parameters() if p.requires_grad], self.train_conf)

    # ------------------------------------------------------------------ randomness
    def _reseed(self, *position: int) -> None:
        if self.step_seed is None:
            return
        seed = int(self.step_seed)
        for value in position:
            seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
        torch.manual_seed(seed)  # also seeds every CUDA device
        random.seed(seed)  # upstream's flow draws its prompt-condition masks from python's random
        np.random.seed(seed % 2**32)

    def on_train_start(self) -> None:
        self._init_from.after_restore(self.trainer)

    def on_validation_start(self) -> None:
        self._init_from.after_restore(self.trainer)

    def on_test_start(self) -> None:
        self._init_from.after_restore(self.trainer)

    def on_predict_start(self) -> None:
        self._init_from.after_restore(self.trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        accum = int(self.train_conf.accum_grad)
        self._reseed(0, self.global_step, batch_idx % accum, self.global_rank)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._reseed(1, dataloader_idx, batch_idx, self.global_rank)

    # ------------------------------------------------------------------ steps
    def _metric(self, stage: str, part: str, key: str) -> str:
        return f"{stage}/{key}" if len(self.part_names) == 1 else f"{stage}/{part}_{key}"

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        batch_size = _batch_size(batch)
        instruct_len = batch.get("instruct_token_len") if isinstance(batch, Mapping) else None
        if stage == "train" and isinstance(instruct_len, torch.Tensor):
            # rows trained without an instruction in batches that carry instructions (collate pads them
            # to length 0): a growing count means the corpus' instruct file misses utterances
            for name, count in (("with", int((instruct_len > 0).sum())), ("without", int((instruct_len == 0).sum()))):
                self.log(f"data/rows_{name}_instruct", float(count), on_step=True, on_epoch=True, reduce_fx="sum",
                         batch_size=1)
        total = None
        for name, part in self.parts().items():
            out = self._part_step(name, part, batch, stage)
            if "loss" not in out:
                raise KeyError(f"{name}.forward(batch, device) must return a dict with 'loss'; got {sorted(out)}")
            total = out["loss"] if total is None else total + out["loss"]
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    self.log(self._metric(stage, name, key), value.detach().float(), batch_size=batch_size,
                             prog_bar=key == "loss", sync_dist=stage != "train")
        if len(self.part_names) > 1:
            self.log(f"{stage}/loss", total.detach().float(), batch_size=batch_size, sync_dist=stage != "train")
        return total

    def _part_step(self, name: str, part: nn.Module, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        if name == "llm" and stage == "train" and self.llm_input_noise > 0:
            noisy = noisy_speech_tokens(batch["speech_token"], batch["speech_token_len"], self.llm_input_noise,
                                        getattr(part, "speech_token_size", None))
            return part(batch, self.device, input_speech_token=noisy)
        return part(batch, self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Lightning uses a logged "step" as the logger x-axis: the optimizer step this batch belongs
        # to, 1-based as upstream. Its own batch counter is off by one after resuming from an
        # epoch-end checkpoint, which would leave a gap in resumed TensorBoard curves.
        self.log("step", float(self.global_step + 1), on_step=True, on_epoch=False, batch_size=1)
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.log("step", float(self.global_step), on_step=False, on_epoch=True, batch_size=1)  # x-axis = steps done
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    # ------------------------------------------------------------------ optimizer step
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Grads are unscaled here (Lightning unscales before this hook): clip, measure, maybe skip."""
        if _is_deepspeed(self.trainer):
            # DeepSpeed clips at train_conf.grad_clip (CosyDeepSpeedStrategy writes its gradient_clipping)
            # and skips a step whose grad norm is not finite itself; grads live in its partitions
            self.log("train/lr", optimizer.param_groups[0]["lr"])
            return
        clip = float(self.train_conf.grad_clip or 0.0)
        finite = True
        norms: dict[str, float] = {}
        for name, part in self.parts().items():
            params = [p for p in part.parameters() if p.grad is not None]
            if not params:
                continue
            max_norm = clip if clip > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norms[name] = float(norm)
            finite = finite and bool(torch.isfinite(norm))
        scale = loss_scale(self.trainer)  # the scale this step's backward used (before any lowering)
        lr = optimizer.param_groups[0]["lr"]  # the lr this update uses (upstream logs it after scheduler.step())
        if not finite:
            # Dropping the grads makes optimizer.step() a no-op for Adam/AdamW (state untouched);
            # under FP16 the scaler has also seen the inf and skips, then lowers the scale.
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        self.last_grad_norm = norms
        for name, norm in norms.items():
            self.log(self._metric("train", name, "grad_norm"), norm if math.isfinite(norm) else float("nan"))
        self.log("train/lr", lr)
        self.log("train/skipped_steps", float(self.skipped_steps))
        if scale is not None:
            self.log("train/loss_scale", scale)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if _is_deepspeed(self.trainer):  # DeepSpeed counts the steps it skipped (kept in its checkpoints)
            skipped = getattr(getattr(self.trainer.strategy, "model", None), "skipped_steps", None)
            if isinstance(skipped, int):
                self.skipped_steps = skipped
                self.log("train/skipped_steps", float(skipped))

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cosytrain"] = {"skipped_steps": self.skipped_steps, "parts": list(self.part_names)}
        if self.adapters is not None:
            self.adapters.strip(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapters is not None:
            self.adapters.fill(checkpoint, self)
        self._init_from.on_restored()
        self.skipped_steps = int(checkpoint.get("cosytrain", {}).get("skipped_steps", 0))


class LLMTask(SpeechTask):
    """The LLM stage alone (upstream ``--model llm``)."""

    def __init__(self, llm: nn.Module, train_conf: dict[str, Any] | None = None, freeze: list[str] | None = None,
                 init_from: str | None = None, step_seed: int | None = 1986,
                 lora: dict[str, dict[str, Any]] | None = None, llm_input_noise: float = 0.0) -> None:
        super().__init__(llm=llm, train_conf=train_conf, freeze=freeze, init_from=init_from, step_seed=step_seed,
                         lora=lora, llm_input_noise=llm_input_noise)


class FlowTask(SpeechTask):
    """The flow stage alone (upstream ``--model flow``)."""

    def __init__(self, flow: nn.Module, train_conf: dict[str, Any] | None = None, freeze: list[str] | None = None,
                 init_from: str | None = None, step_seed: int | None = 1986,
                 lora: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(flow=flow, train_conf=train_conf, freeze=freeze, init_from=init_from, step_seed=step_seed,
                         lora=lora)


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("text_token", "speech_token", "speech_feat", "embedding"):
        value = batch.get(key) if isinstance(batch, Mapping) else None
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def check_clipping(gradient_clip_val: Any, grad_clip: Any) -> None:
    """The task clips at ``train_conf.grad_clip``; a different ``trainer.gradient_clip_val`` would clip again."""
    if gradient_clip_val is not None and float(gradient_clip_val) != float(grad_clip or 0.0):
        raise ValueError(f"gradient clipping is set twice (trainer.gradient_clip_val={gradient_clip_val}, "
                         f"train_conf.grad_clip={grad_clip}); set only train_conf.grad_clip")


def _is_deepspeed(trainer: pl.Trainer) -> bool:
    return "deepspeed" in type(trainer.strategy).__name__.lower()
