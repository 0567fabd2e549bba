"""``FP16EvalCallback``: watch, during training, whether the parts still agree with themselves under FP16.

Training in ``16-mixed`` keeps FP32 master weights, so a model can train well and still produce
NaNs or drift when served with FP16 autocast (an activation that grew past 65504, a normalisation
that lost its FP32 island). Every N validations this callback runs
:func:`cosytrain.evaluation.fp16_check.run_fp16_check` on the first validation utterances through
the task's own parts (``pl_module.llm`` / ``flow`` / ``hift``, whichever exist) and a vocoder, logs
``fp16/<stage>/<metric>`` scalars, FP32/FP16 audio and mel images (TensorBoard), and warns or stops
the run when a figure leaves its tolerance. The last figures are kept in ``last_figures`` and saved
in the checkpoint (``checkpoint['callbacks']['FP16EvalCallback']['last_figures']``), where export
finds them for the model card (:func:`cosytrain.evaluation.fp16_figures.figures_from_checkpoint`).
Under DeepSpeed ZeRO-3 every rank gathers the parts' parameters before its check
(:func:`cosytrain.tasks.deepspeed.gathered_parameters`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.evaluation.fp16_batches import DEFAULT_SEED, batch_size, take_utterances
from cosytrain.evaluation.fp16_check import run_fp16_check
from cosytrain.evaluation.fp16_figures import CALLBACK_STATE_KEY, flat_figures, resolve_tolerances
from cosytrain.tasks.deepspeed import gathered_parameters

__all__ = ["FP16EvalCallback", "FP16CheckWarning"]

log = logging.getLogger(__name__)


class FP16CheckWarning(UserWarning):
    """An FP16-vs-FP32 figure left its tolerance (``on_fail='warn'``)."""


def _mel_image(mel: torch.Tensor) -> torch.Tensor:
    """(n_mels, T) -> (3, n_mels, T) in [0, 1], low frequencies at the bottom."""
    try:
        from cosytrain.tasks.callbacks import mel_to_image

        return mel_to_image(mel, time_first=False)
    except ImportError:  # pragma: no cover - grey fallback if the training callbacks are unavailable
        mel = mel.detach().float().cpu()
        norm = ((mel - mel.min()) / (mel.max() - mel.min()).clamp_min(1e-5)).flip(0)
        return norm.unsqueeze(0).repeat(3, 1, 1)


class FP16EvalCallback(pl.Callback):
    """Every ``every_n_validations`` validation runs, compare the parts under FP16 autocast with FP32.

    Args:
        every_n_validations: run on every n-th validation (sanity checks are never counted).
        num_utterances: how many of the first validation utterances to use (batches are collected
            until there are this many).
        tolerances: overrides of :data:`cosytrain.evaluation.fp16_figures.DEFAULT_TOLERANCES`
            (``{'flow/mel_l1': 0.1}``; None switches one off).
        on_fail: ``warn`` (a :class:`FP16CheckWarning`) or ``stop`` (``trainer.should_stop`` with a
            logged reason; the current epoch's checkpoint callbacks still run).
        hift_from: a model directory whose ``hift.pt`` vocodes the flow's mels for the waveform
            figures when the task has no ``hift`` of its own; None means no waveform figures then.
        seed: the seed both runs start from.
        log_media: audio and mel images of the first utterance to a TensorBoard logger.
        speech: also compare the audio as served, FP32 vs FP16 (stage ``speech``:
            :mod:`cosytrain.evaluation.fp16_speech`; finiteness, MCD, speaker similarity and, with
            ``asr``, the WER delta). Without a vocoder (``hift``/``hift_from``) the flow's mels are
            vocoded by Griffin-Lim, so every recipe gets the figures.
        speaker_encoder: for ``speech/sim``: ``auto`` (``hift_from``'s campplus.onnx, else resemblyzer),
            ``resemblyzer``, a campplus ``.onnx`` path, or ``none``.
        asr: ``"<kind>:<local path>"`` (:func:`cosytrain.evaluation.asr.load_asr`) for the WER delta.
    """

    def __init__(self, every_n_validations: int = 1, num_utterances: int = 4,
                 tolerances: Optional[dict[str, Optional[float]]] = None,
                 on_fail: Literal["warn", "stop"] = "warn", hift_from: Optional[str] = None,
                 seed: int = DEFAULT_SEED, log_media: bool = True, speech: bool = True,
                 speaker_encoder: str = "auto", asr: Optional[str] = None) -> None:
        if int(every_n_validations) < 1:
            raise ConfigurationError(f"every_n_validations must be at least 1, got {every_n_validations}")
        if int(num_utterances) < 1:
            raise ConfigurationError(f"num_utterances must be at least 1, got {num_utterances}")
        if on_fail not in ("warn", "stop"):
            raise ConfigurationError(f"on_fail={on_fail!r}: use 'warn' or 'stop'")
        if hift_from is not None and not (Path(hift_from) / "hift.pt").is_file():
            raise ConfigurationError(f"hift_from={hift_from!r}: no hift.pt there; give a model directory holding the"
                                     f" vocoder")
        self.every_n_validations = int(every_n_validations)
        self.num_utterances = int(num_utterances)
        self.tolerances = dict(tolerances or {})
        resolve_tolerances(self.tolerances)  # unknown keys fail at construction, not mid-training
        self.on_fail = on_fail
        self.hift_from = hift_from
        self.seed = int(seed)
        self.log_media = log_media
        self.speech = bool(speech)
        self.speaker_encoder_spec = speaker_encoder
        self._encoder: Any = None
        self._asr: Any = None
        if asr is not None:
            from cosytrain.evaluation.asr import load_asr

            self._asr = load_asr(asr)  # a wrong path fails at construction
        self._griffin_lim: Optional[nn.Module] = None
        self.last_figures: Optional[dict[str, Any]] = None
        self.validations = 0
        self._batches: list[dict[str, Any]] = []
        self._collected = 0
        self._vocoder: Optional[nn.Module] = None

    # ------------------------------------------------------------------ checkpoint
    @property
    def state_key(self) -> str:
        # a fixed key, so export finds the figures without knowing the callback's arguments
        return CALLBACK_STATE_KEY

    def state_dict(self) -> dict[str, Any]:
        return {"last_figures": self.last_figures, "validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_figures = state_dict.get("last_figures")
        self.validations = int(state_dict.get("validations", 0))

    # ------------------------------------------------------------------ collecting
    def _due(self) -> bool:
        return (self.validations + 1) % self.every_n_validations == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches, self._collected = [], 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or not self._due():
            return
        if self._collected >= self.num_utterances or not isinstance(batch, Mapping):
            return
        try:
            taken = take_utterances(batch, self.num_utterances - self._collected)  # CPU copies
        except ValueError:  # not a batch of utterances (no token/feature tensors)
            return
        self._batches += taken
        self._collected += sum(batch_size(b) for b in taken)

    # ------------------------------------------------------------------ the check
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due = self._due()
        self.validations += 1
        if not due:
            return
        batches, self._batches, self._collected = self._batches, [], 0
        # under DeepSpeed ZeRO-3 every rank gathers the parts' parameters (a collective), then checks its own batches
        with gathered_parameters(trainer, *(getattr(pl_module, n, None) for n in ("llm", "flow", "hift"))):
            failures = self._check(trainer, pl_module, batches)
        failed = bool(failures)
        if trainer.world_size > 1:  # every rank gets here on the same validations, so this cannot hang
            failed = bool(trainer.strategy.reduce_boolean_decision(failed, all=False))  # any rank failing counts
        if not failed:
            return
        reasons = "; ".join(failures) or "another rank's FP16 figures left their tolerance"
        note = (self.last_figures or {}).get("autocast", {}).get("note", "")
        message = (f"FP16EvalCallback: FP16 autocast disagrees with FP32 at step {trainer.global_step}: {reasons}"
                   + (f" ({note})" if note else ""))
        if self.on_fail == "stop":
            trainer.should_stop = True
            log.error("%s. Stopping training (on_fail='stop'); loosen `tolerances` or fix the FP16 problem.",
                      message)
        else:
            warnings.warn(message, FP16CheckWarning, stacklevel=2)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[dict[str, Any]]) -> list[str]:
        """Run, keep and log the figures; returns this rank's failures."""
        if not batches:
            warnings.warn("FP16EvalCallback: no validation batch (a dict with upstream keys) was seen;"
                          " nothing to check", FP16CheckWarning, stacklevel=3)
            return []
        parts = {name: getattr(pl_module, name, None) for name in ("llm", "flow", "hift")}
        parts = {name: m for name, m in parts.items() if isinstance(m, nn.Module)}
        hift = parts.get("hift") or self._vocoder_for(pl_module)
        if not parts and hift is None:
            warnings.warn(f"FP16EvalCallback: {type(pl_module).__name__} has no llm/flow/hift part to check",
                          FP16CheckWarning, stacklevel=3)
            return []
        report = run_fp16_check(batches, llm=parts.get("llm"), flow=parts.get("flow"), hift=hift,
                                num_utterances=self.num_utterances, tolerances=self.tolerances, seed=self.seed,
                                keep_samples=self.log_media)
        if self.speech and parts.get("flow") is not None:
            self._speech_stage(trainer, report, parts, hift, batches)
        step = int(trainer.global_step)
        figures = dict(report.figures, global_step=step, epoch=int(trainer.current_epoch))
        if hift is not None and "hift" not in parts:
            figures["vocoder"] = f"hift_from={self.hift_from}"
        self.last_figures = figures
        self._log(trainer, figures, report.samples, step)
        if figures.get("errors"):
            problems = "; ".join(f"{k}: {v}" for k, v in figures["errors"].items())
            warnings.warn(f"FP16EvalCallback: not checked (these stages cannot run at all): {problems}",
                          FP16CheckWarning, stacklevel=3)
        return report.failures

    def _speech_stage(self, trainer: pl.Trainer, report: Any, parts: dict[str, nn.Module],
                      hift: Optional[nn.Module], batches: list[dict[str, Any]]) -> None:
        """Add stage ``speech`` (FP32 vs FP16 audio as served) to the report, with its bounds and verdict."""
        from cosytrain.evaluation.fp16_figures import check_tolerances
        from cosytrain.evaluation.fp16_speech import check_speech

        vocoder = hift if hift is not None else self._griffin_lim_for(trainer, parts)
        figures = report.figures
        try:
            device = next(parts["flow"].parameters()).device
            stage = check_speech(parts["flow"], vocoder.to(device),
                                 take_utterances(batches, self.num_utterances), seed=self.seed,
                                 encoder=self._speaker_encoder(), asr=self._asr, llm=parts.get("llm"))
        except Exception as exc:  # noqa: BLE001 - reported like the other stages' errors
            figures.setdefault("errors", {})["speech"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            return
        if hift is None:
            stage["vocoder"] = "griffin_lim"
        figures["stages"]["speech"] = stage
        tols = {k: v for k, v in resolve_tolerances(self.tolerances).items() if k.startswith("speech/")}
        figures["tolerances"].update(tols)
        failures = check_tolerances({"speech": stage}, tols)
        figures["failures"] = list(figures["failures"]) + failures
        figures["passed"] = not figures["failures"]

    def _speaker_encoder(self) -> Any:
        if self.speaker_encoder_spec == "none":
            return None
        if self._encoder is None:
            from cosytrain.evaluation.speaker_similarity import SpeakerEncoderError, load_speaker_encoder

            try:
                self._encoder = load_speaker_encoder(self.speaker_encoder_spec, self.hift_from)
            except SpeakerEncoderError as exc:
                warnings.warn(f"FP16EvalCallback: no speech/sim ({exc})", FP16CheckWarning, stacklevel=3)
                self.speaker_encoder_spec = "none"
        return self._encoder

    def _griffin_lim_for(self, trainer: pl.Trainer, parts: dict[str, nn.Module]) -> nn.Module:
        if self._griffin_lim is None:
            from cosytrain.inference.griffin_lim import GriffinLimVocoder

            feat = getattr(getattr(getattr(trainer, "datamodule", None), "options", None), "feat", None)
            if feat is None:
                from cosytrain.evaluation.synthesis import generation_of
                from cosytrain.inference.frontend import _DEFAULT_FEAT, _DEFAULT_SAMPLE_RATE

                gen = generation_of(parts.get("llm"), parts.get("flow"))
                feat = dict(_DEFAULT_FEAT[gen], sample_rate=_DEFAULT_SAMPLE_RATE[gen])
            self._griffin_lim = GriffinLimVocoder.from_feat_config(feat)
        return self._griffin_lim

    def _vocoder_for(self, pl_module: pl.LightningModule) -> Optional[nn.Module]:
        if self.hift_from is None:
            return None
        if self._vocoder is None:
            from cosytrain.modeldir import load_model_dir

            _, parts = load_model_dir(self.hift_from, parts=("hift",), device="cpu")
            self._vocoder = parts["hift"].eval().requires_grad_(False)
        return self._vocoder.to(pl_module.device)

    def _log(self, trainer: pl.Trainer, figures: dict[str, Any], samples: dict[str, Any], step: int) -> None:
        if not trainer.is_global_zero:
            return
        scalars = flat_figures(figures)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if not self.log_media:
            return
        for logger in trainer.loggers:
            writer = getattr(logger, "experiment", None)
            if writer is None or not hasattr(writer, "add_audio") or not hasattr(writer, "add_image"):
                continue  # only TensorBoard's SummaryWriter takes audio and images like this
            for tag in ("fp32", "fp16"):
                mel = samples.get(f"mel_{tag}")
                if mel is not None:
                    writer.add_image(f"fp16_check/mel_{tag}", _mel_image(mel), step)
                wav = samples.get(f"wav_{tag}")
                if wav is not None:
                    audio = torch.nan_to_num(wav.float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
                    writer.add_audio(f"fp16_check/audio_{tag}", audio.reshape(1, -1), step,
                                     sample_rate=int(samples.get("sample_rate", 22050)))

