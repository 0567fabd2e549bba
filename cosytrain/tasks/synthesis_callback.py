"""``SynthesisCallback``: every N validations, listen to the model and measure it against the recordings.

Validation losses are teacher-forced: they can improve while the voice gets worse. This callback
synthesises a fixed set of held-out utterances with the current weights (the conditions and figures
of :mod:`cosytrain.evaluation.synthesis`) and logs, on every rank the same values:

* scalars ``synth/<condition>/<figure>`` (``synth/full/mcd``, ``synth/flow_gt/sim``, ...), averaged over
  the utterances, through ``pl_module.log`` so that ``ModelCheckpoint``/``EarlyStopping`` can monitor any
  of them (``mode: max`` for ``sim``, ``min`` for the rest) and ``export --average best:N --monitor``
  can rank checkpoints by them;
* TensorBoard audio per utterance (``synth/<utt>/<condition>`` and ``synth/<utt>/target``) and one
  matplotlib figure per utterance with the four mels side by side;
* ``<run>/synthesis/step_<N>/``: the wavs, the figures and ``report.md`` (the table and links).

The held-out set: the first ``num_utterances`` utterances the validation loader yields (it is not
shuffled), one per speaker in turn, chosen at the first synthesis and kept (saved in the checkpoint,
so a resumed run measures the same ones). The zero-shot prompt of each is another validation
utterance of the same speaker. The recordings are read from the datamodule's validation shards
(``val_data``) by utterance id; without them the callback measures nothing and says why once.

The vocoder (``vocoder``): a ``HiFTTask`` checkpoint path (``.ckpt``) or a model directory's ``hift.pt``
when named; ``auto`` = the task's own ``hift`` if it has one, else ``model_dir``'s ``hift.pt``, else
Griffin-Lim over the inverse mel (:class:`cosytrain.inference.griffin_lim.GriffinLimVocoder`,
built from the datamodule's mel options), so every recipe has audio. ``model_dir`` may also supply the
parts the task does not train (e.g. the flow for an LLM-only run) and ``campplus.onnx`` for SIM.

DDP: rank 0 synthesises (on its own validation shard); the figures are broadcast, so every rank logs
the same monitor value and the checkpoint callbacks agree. DeepSpeed ZeRO-3: every rank first gathers
the task's parameters (:func:`cosytrain.tasks.deepspeed.gathered_parameters`), then rank 0 synthesises. Validations that do not synthesise log
nothing under ``synth/``: put the ModelCheckpoint that monitors a ``synth/`` figure on the same
rhythm (``every_n_validations: 1``, or a ``val_check_interval`` matching it), or Lightning reports
the monitor missing.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.evaluation.synthesis import CONDITIONS, SynthesisItem, average, generation_of, score, synthesize_items
from cosytrain.tasks.deepspeed import gathered_parameters

__all__ = ["SynthesisCallback", "SynthesisWarning"]

log = logging.getLogger(__name__)
STATE_KEY = "SynthesisCallback"


class SynthesisWarning(UserWarning):
    """Synthesis could not run or measure something (said once per cause)."""


def _per_utt(batch: Mapping[str, Any], i: int) -> Optional[dict[str, Any]]:
    """Utterance ``i`` of a padded validation batch, trimmed to its lengths, as CPU tensors of batch size 1."""
    need = ("utts", "text", "text_token", "speech_token", "speech_feat", "embedding")
    if any(k not in batch for k in need):
        return None

    def cut(key: str) -> torch.Tensor:
        value = batch[key][i:i + 1]
        length = batch.get(f"{key}_len")
        if length is not None and value.dim() > 1:
            value = value[:, :int(length[i])]
        return value.detach().cpu().clone()

    return {"utt": str(batch["utts"][i]), "text": str(batch["text"][i]), "text_token": cut("text_token"),
            "speech_token": cut("speech_token"), "speech_feat": cut("speech_feat"),
            "embedding": batch["embedding"][i:i + 1].detach().cpu().float().clone()}


class SynthesisCallback(pl.Callback):
    """See the module docstring.

    Args:
        every_n_validations: synthesise on every n-th validation (sanity checks never count).
        num_utterances: held-out utterances to synthesise (each costs one run per condition).
        conditions: any of ``vocoder_gt``, ``flow_gt``, ``full``, ``zero_shot``.
        vocoder: ``auto``, ``griffin_lim``, a model directory holding ``hift.pt``, or a ``HiFTTask``
            checkpoint (``.ckpt``, e.g. ``runs/hift_demo/checkpoints/last.ckpt``; built from the
            ``config.yaml`` of its run, loaded when the callback is made).
        model_dir: a model directory supplying parts the task lacks, ``hift.pt`` and ``campplus.onnx``.
        speaker_encoder: ``auto`` (``model_dir``'s campplus.onnx, else resemblyzer), ``resemblyzer``,
            ``campplus``, a ``.onnx`` path, or ``none``.
        asr: ``"<kind>:<local path>"`` for WER/CER (:func:`cosytrain.evaluation.asr.load_asr`); None = no WER.
        seed: base seed of every synthesis.
        max_pool: validation utterances kept as candidates and prompts (memory bound).
        log_audio / write_report: TensorBoard audio + figures; the run-folder report.
    """

    def __init__(self, every_n_validations: int = 1, num_utterances: int = 4,
                 conditions: Sequence[str] = CONDITIONS, vocoder: str = "auto", model_dir: Optional[str] = None,
                 speaker_encoder: str = "auto", asr: Optional[str] = None, seed: int = 1986, max_pool: int = 64,
                 log_audio: bool = True, write_report: bool = True) -> None:
        if int(every_n_validations) < 1 or int(num_utterances) < 1:
            raise ConfigurationError("SynthesisCallback: every_n_validations and num_utterances must be at least 1")
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise ConfigurationError(f"SynthesisCallback: unknown conditions {unknown}; choose from {list(CONDITIONS)}")
        if model_dir is not None and not Path(model_dir).is_dir():
            raise ConfigurationError(f"SynthesisCallback: model_dir {model_dir} is not a directory")
        self._hift_checkpoint: Optional[nn.Module] = None
        if str(vocoder).endswith(".ckpt"):
            from cosytrain.tasks.hift_weights import load_hift_checkpoint

            try:  # a wrong path or a checkpoint of another task fails now, not after an hour of training
                self._hift_checkpoint = load_hift_checkpoint(vocoder)
            except ConfigurationError as exc:
                raise ConfigurationError(f"SynthesisCallback: vocoder={vocoder!r}: {exc}") from None
        elif vocoder not in ("auto", "griffin_lim") and not (Path(vocoder) / "hift.pt").is_file():
            raise ConfigurationError(f"SynthesisCallback: vocoder={vocoder!r}: use 'auto', 'griffin_lim', a model"
                                     " directory holding hift.pt, or a HiFTTask checkpoint (.ckpt)")
        if asr is not None:
            from cosytrain.evaluation.asr import load_asr

            self._asr = load_asr(asr)  # a wrong path fails now, not after an hour of training
        else:
            self._asr = None
        self.every_n_validations = int(every_n_validations)
        self.num_utterances = int(num_utterances)
        self.conditions = tuple(conditions)
        self.vocoder_spec, self.model_dir, self.speaker_encoder_spec = vocoder, model_dir, speaker_encoder
        self.seed, self.max_pool = int(seed), int(max_pool)
        self.log_audio, self.write_report = log_audio, write_report
        self.validations = 0
        self.chosen: list[str] = []  # utterance ids, kept across resumes
        self.last_figures: Optional[dict[str, dict[str, float]]] = None
        self._pool: dict[str, dict[str, Any]] = {}
        self._encoder: Any = None
        self._extra_parts: Optional[dict[str, nn.Module]] = None
        self._warned: set[str] = set()
        self._recordings: dict[str, tuple[torch.Tensor, int, str]] = {}

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return STATE_KEY

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations, "chosen": list(self.chosen), "last_figures": self.last_figures}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
        self.chosen = [str(u) for u in state_dict.get("chosen", [])]
        self.last_figures = state_dict.get("last_figures")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"SynthesisCallback: {message}", SynthesisWarning, stacklevel=3)

    # ------------------------------------------------------------------ collecting
    def _due(self) -> bool:
        return (self.validations + 1) % self.every_n_validations == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pool = {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or not trainer.is_global_zero or not self._due():
            return
        if not isinstance(batch, Mapping) or len(self._pool) >= self.max_pool:
            return
        for i in range(len(batch.get("utts", []))):
            row = _per_utt(batch, i)
            if row is None:
                return
            if len(self._pool) < self.max_pool:
                self._pool.setdefault(row["utt"], row)

    # ------------------------------------------------------------------ the run
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due = self._due()
        self.validations += 1
        if not due:
            return
        figures: Optional[dict[str, float]] = None
        # DeepSpeed ZeRO-3: every rank gathers the task's parts (a collective); rank 0 synthesises with them
        with gathered_parameters(trainer, *(getattr(pl_module, n, None) for n in ("llm", "flow", "hift"))):
            if trainer.is_global_zero:
                try:
                    figures = self._synthesise_and_measure(trainer, pl_module)
                except Exception as exc:  # noqa: BLE001 - measuring must never stop training
                    self._warn(f"error:{type(exc).__name__}", f"synthesis failed at step {trainer.global_step}"
                               f" ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})")
                    figures = None
        if trainer.world_size > 1:
            figures = trainer.strategy.broadcast(figures, src=0)
        self._pool = {}
        # every expected name is logged, NaN when it could not be measured, so that a ModelCheckpoint or
        # EarlyStopping monitoring it sees a (worst) value instead of a missing key, which stops training
        figures = {**{name: math.nan for name in self.metric_names()}, **(figures or {})}
        for name, value in sorted(figures.items()):
            # the same value on every rank: no reduction (sync_dist would average identical numbers)
            pl_module.log(name, float(value), on_step=False, on_epoch=True, batch_size=1, sync_dist=False,
                          rank_zero_only=False)

    def metric_names(self) -> list[str]:
        """The ``synth/<condition>/<figure>`` names this callback logs at every synthesis."""
        from cosytrain.evaluation.speech_metrics import SPEECH_METRICS

        figures = ["nonfinite", *SPEECH_METRICS]
        if self.speaker_encoder_spec != "none":
            figures.append("sim")
        if self._asr is not None:
            figures += ["wer", "cer"]
        names = [f"synth/{c}/{f}" for c in self.conditions for f in figures]
        if self._asr is not None:
            names += ["synth/recording/wer", "synth/recording/cer"]
        return names

    # ------------------------------------------------------------------ pieces
    def _recordings_for(self, trainer: pl.Trainer, utts: set[str]) -> None:
        """Read the recordings (and speakers) of ``utts`` from the datamodule's validation shards once."""
        missing = utts - set(self._recordings)
        dm = getattr(trainer, "datamodule", None)
        val_data = getattr(dm, "val_data", None)
        if not missing or not val_data:
            return
        from cosytrain.data.pipeline import decode_wav
        from cosytrain.data.shards import iter_rows

        for row in iter_rows(val_data, columns=["utt", "spk", "audio_data"]):
            if row.get("utt") in missing:
                try:
                    wav, rate = decode_wav(row["audio_data"])
                except Exception as exc:  # noqa: BLE001 - SkipSample: unreadable audio is left out
                    self._warn(f"audio:{row['utt']}", f"cannot decode the recording of {row['utt']} ({exc})")
                    continue
                self._recordings[row["utt"]] = (wav.reshape(-1), rate, str(row.get("spk") or ""))

    def _choose(self, trainer: pl.Trainer) -> list[SynthesisItem]:
        pool = self._pool
        self._recordings_for(trainer, set(pool))
        known = [u for u in pool if u in self._recordings]
        if not known:
            return []
        if not self.chosen or any(u not in known for u in self.chosen):
            by_spk: dict[str, list[str]] = {}
            for utt in sorted(known):
                by_spk.setdefault(self._recordings[utt][2], []).append(utt)
            order: list[str] = []
            while len(order) < min(self.num_utterances, len(known)):  # one per speaker in turn
                for utts in by_spk.values():
                    taken = [u for u in utts if u not in order]
                    if taken and len(order) < self.num_utterances:
                        order.append(taken[0])
            self.chosen = order
        items = []
        for utt in self.chosen:
            wav, rate, spk = self._recordings[utt]
            others = sorted(u for u in known if u != utt and self._recordings[u][2] == spk)
            prompt = self._item(others[0], pool) if others else None
            item = self._item(utt, pool)
            item.prompt = prompt
            items.append(item)
        return items

    def _item(self, utt: str, pool: Mapping[str, dict[str, Any]]) -> SynthesisItem:
        row = pool[utt]
        wav, rate, spk = self._recordings[utt]
        return SynthesisItem(utt=utt, spk=spk, text=row["text"], text_token=row["text_token"],
                             speech_token=row["speech_token"], speech_feat=row["speech_feat"],
                             embedding=row["embedding"], wav=wav, sample_rate=rate)

    def _parts(self, pl_module: pl.LightningModule) -> dict[str, Optional[nn.Module]]:
        parts = {name: getattr(pl_module, name, None) for name in ("llm", "flow", "hift")}
        parts = {k: (v if isinstance(v, nn.Module) else None) for k, v in parts.items()}
        if self.model_dir is not None and any(v is None for v in parts.values()):
            if self._extra_parts is None:
                from cosytrain.modeldir import load_model_dir

                wanted = tuple(k for k, v in parts.items() if v is None
                               and (Path(self.model_dir) / f"{k}.pt").is_file())
                self._extra_parts = dict(load_model_dir(self.model_dir, parts=wanted, device="cpu")[1]) if wanted else {}
                for module in self._extra_parts.values():
                    module.eval().requires_grad_(False)
            for k, module in self._extra_parts.items():
                parts[k] = module.to(pl_module.device)
        return parts

    def _vocoder(self, trainer: pl.Trainer, parts: Mapping[str, Optional[nn.Module]],
                 device: torch.device) -> tuple[nn.Module, str]:
        spec = self.vocoder_spec
        if spec == "auto" and parts.get("hift") is not None:
            return parts["hift"], "hift (task or model_dir)"  # type: ignore[return-value]
        if self._hift_checkpoint is not None:
            return self._hift_checkpoint.to(device), f"HiFT checkpoint {spec}"
        if spec not in ("auto", "griffin_lim"):
            if not hasattr(self, "_hift_from_dir"):
                from cosytrain.modeldir import load_model_dir

                self._hift_from_dir = load_model_dir(spec, parts=("hift",), device="cpu")[1]["hift"].eval()
            return self._hift_from_dir.to(device), f"hift.pt of {spec}"
        if not hasattr(self, "_griffin_lim"):
            from cosytrain.inference.griffin_lim import GriffinLimVocoder

            dm = getattr(trainer, "datamodule", None)
            feat = getattr(getattr(dm, "options", None), "feat", None)
            if feat is None:
                from cosytrain.inference.frontend import _DEFAULT_FEAT, _DEFAULT_SAMPLE_RATE

                gen = generation_of(parts.get("llm"), parts.get("flow"))
                feat = dict(_DEFAULT_FEAT[gen], sample_rate=_DEFAULT_SAMPLE_RATE[gen])
            self._griffin_lim = GriffinLimVocoder.from_feat_config(feat)
        return self._griffin_lim, "Griffin-Lim (torchaudio)"

    def _speaker_encoder(self) -> Any:
        if self.speaker_encoder_spec == "none":
            return None
        if self._encoder is None:
            from cosytrain.evaluation.speaker_similarity import SpeakerEncoderError, load_speaker_encoder

            try:
                self._encoder = load_speaker_encoder(self.speaker_encoder_spec, self.model_dir)
            except SpeakerEncoderError as exc:
                self._warn("sim", f"no speaker similarity ({exc})")
                self.speaker_encoder_spec = "none"
                return None
        return self._encoder

    def _synthesise_and_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[dict[str, float]]:
        if not self._pool:
            self._warn("batches", "no validation batch with upstream keys (utts, text, text_token, speech_token,"
                       " speech_feat, embedding) was seen; nothing to synthesise")
            return None
        items = self._choose(trainer)
        if not items:
            self._warn("recordings", "the recordings of the validation utterances were not found (the datamodule"
                       " has no val_data shards holding them); nothing is measured")
            return None
        parts = self._parts(pl_module)
        vocoder, vocoder_name = self._vocoder(trainer, parts, pl_module.device)
        start = time.perf_counter()
        results = synthesize_items(items, vocoder=vocoder, llm=parts["llm"], flow=parts["flow"],
                                   conditions=self.conditions, seed=self.seed, device=pl_module.device)
        synth_s = time.perf_counter() - start
        for result in results:
            for condition, error in result.errors.items():
                self._warn(f"cond:{condition}:{error[:60]}", f"{condition} failed for {result.item.utt}: {error}")
        per_utt = score(results, self._speaker_encoder(), self._asr)
        means = average(per_utt)
        self.last_figures = means
        flat = {f"synth/{cond}/{name}": value for cond, row in means.items() for name, value in row.items()
                if name != "count"}
        flat["synth/seconds"] = time.perf_counter() - start
        step = int(trainer.global_step)
        from cosytrain.evaluation.synthesis_report import log_media, write_report

        if self.log_audio:
            log_media(trainer, results, step, per_utt)
        if self.write_report:
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "synthesis" / f"step_{step:08d}"
            write_report(folder, results, per_utt, means, step=step, vocoder=vocoder_name, synth_seconds=synth_s)
        return flat
