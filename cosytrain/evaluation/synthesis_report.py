"""What a person looks at after a synthesis round: mel figures, TensorBoard audio, a markdown report.

* :func:`mel_figure`: one matplotlib figure per utterance, the recording and each condition's mel side
  by side (time in seconds, mel band, a shared colour scale with its bar, the figures in the titles),
  about 1400 x 330 px, readable without zooming.
* :func:`log_media`: TensorBoard audio ``synth/<utt>/<condition>`` (+ ``target``) and the figure as
  ``synth/<utt>/mels``.
* :func:`write_report`: ``<folder>/<utt>_<condition>.wav``, ``<utt>.png`` and ``report.md`` with the
  averaged figures, one row per utterance and links to every file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosytrain.evaluation.synthesis import CONDITIONS, SynthesisResult

__all__ = ["mel_figure", "log_media", "write_report", "TITLES"]

TITLES = {"target": "recording", "vocoder_gt": "vocoder on true mel (floor)", "flow_gt": "flow on true tokens",
          "full": "full synthesis (text)", "zero_shot": "zero-shot (prompted)"}
_COLUMNS = ("mcd", "lf0_rmse", "vde", "duration_ratio", "sim", "wer", "cer")
_UNITS = {"mcd": "dB", "lf0_rmse": "cents"}


def _log_mel(wav: torch.Tensor, sample_rate: int) -> np.ndarray:
    """(80, frames) natural-log mel for display (CosyVoice's mel with 1024/256 windows at any rate)."""
    from cosytrain.data.features import mel_spectrogram

    wav = torch.nan_to_num(wav.float().reshape(1, -1)).clamp(-1, 1)
    if wav.shape[1] < 1024:
        wav = torch.nn.functional.pad(wav, (0, 1024 - wav.shape[1]))
    return mel_spectrogram(wav, 1024, 80, sample_rate, 256, 1024, 0, 8000)[0].numpy()


def mel_figure(result: SynthesisResult, figures: Mapping[str, Mapping[str, float]] | None = None) -> Any:
    """The recording and every synthesised condition of one utterance, side by side (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rate = result.sample_rate
    item = result.item
    ref = item.wav.float()
    if item.sample_rate != rate:
        import torchaudio.functional as AF

        ref = AF.resample(ref, item.sample_rate, rate)
    panels = [("target", ref)] + [(c, result.wavs[c]) for c in CONDITIONS if c in result.wavs]
    mels = [(name, _log_mel(wav, rate)) for name, wav in panels]
    hi = max(float(m.max()) for _, m in mels)
    lo = max(min(float(m.min()) for _, m in mels), hi - 12.0)  # 12 nats ~ 100 dB of display range
    fig = Figure(figsize=(3.5 * len(mels) + 1.0, 3.3), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(mels), sharey=True, squeeze=False)[0]
    image = None
    for ax, (name, mel) in zip(axes, mels):
        seconds = mel.shape[1] * 256 / rate
        image = ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi,
                          extent=(0.0, seconds, 0, mel.shape[0]))
        title = TITLES.get(name, name)
        row = (figures or {}).get(name)
        if row:
            bits = [f"MCD {row['mcd']:.1f}" if math.isfinite(row.get("mcd", math.nan)) else None,
                    f"SIM {row['sim']:.2f}" if "sim" in row else None,
                    f"WER {row['wer']:.2f}" if "wer" in row else None]
            title += "\n" + ", ".join(b for b in bits if b)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time (s)")
    axes[0].set_ylabel("mel band")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="log amplitude", shrink=0.9)
    fig.suptitle(f"{item.utt} ({item.spk}): {item.text[:90]}", fontsize=10)
    return fig


def _figure_rgb(fig: Any) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _audio(wav: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(wav.float().reshape(1, -1), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)


def log_media(trainer: Any, results: Sequence[SynthesisResult], step: int,
              per_utt: Sequence[Mapping[str, Mapping[str, float]]] | None = None) -> list[str]:
    """Audio and mel figures to every TensorBoard logger; returns the tags written."""
    tags: list[str] = []
    writers = [getattr(lg, "experiment", None) for lg in trainer.loggers]
    writers = [w for w in writers if w is not None and hasattr(w, "add_audio") and hasattr(w, "add_image")]
    if not writers:
        return tags
    for i, result in enumerate(results):
        item = result.item
        figure = _figure_rgb(mel_figure(result, per_utt[i] if per_utt else None))
        ref = item.wav.float()
        for writer in writers:
            writer.add_audio(f"synth/{item.utt}/target", _audio(ref), step, sample_rate=item.sample_rate)
            for condition, wav in result.wavs.items():
                writer.add_audio(f"synth/{item.utt}/{condition}", _audio(wav), step, sample_rate=result.sample_rate)
            writer.add_image(f"synth/{item.utt}/mels", figure, step, dataformats="HWC")
        tags += [f"synth/{item.utt}/target", f"synth/{item.utt}/mels"]
        tags += [f"synth/{item.utt}/{c}" for c in result.wavs]
    return tags


def _cell(row: Mapping[str, float] | None, name: str) -> str:
    if not row or name not in row:
        return ""
    value = row[name]
    return "nan" if not math.isfinite(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def write_report(folder: str | Path, results: Sequence[SynthesisResult],
                 per_utt: Sequence[Mapping[str, Mapping[str, float]]], means: Mapping[str, Mapping[str, float]], *,
                 step: int, vocoder: str, synth_seconds: float) -> Path:
    """Wavs, figures and ``report.md`` in ``folder`` (created); returns the report's path."""
    import soundfile as sf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    present = [c for c in ("recording",) + CONDITIONS if c in means]
    columns = [c for c in _COLUMNS if any(c in means[p] for p in present)]
    head = "| condition | " + " | ".join(f"{c} ({_UNITS[c]})" if c in _UNITS else c for c in columns) + " | n |"
    lines = [f"# Synthesis at step {step}", "",
             f"Vocoder: {vocoder}. {len(results)} held-out utterances, {synth_seconds:.1f} s of synthesis.",
             "Figures against the recording, averaged (DTW-aligned MCD, log-F0 RMSE and voicing error, duration"
             " ratio after trimming silence, speaker similarity, WER/CER; `recording` = the ASR on the recording).",
             "", head, "|" + "---|" * (len(columns) + 2)]
    for condition in present:
        row = means[condition]
        lines.append(f"| {TITLES.get(condition, condition)} | " + " | ".join(_cell(row, c) for c in columns)
                     + f" | {int(row.get('count', 0))} |")
    lines += ["", "## Utterances", ""]
    for result, figures in zip(results, per_utt):
        item = result.item
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in item.utt)
        sf.write(folder / f"{stem}_target.wav", _audio(item.wav)[0].numpy(), item.sample_rate, subtype="PCM_16")
        links = [f"[recording]({stem}_target.wav)"]
        for condition, wav in result.wavs.items():
            sf.write(folder / f"{stem}_{condition}.wav", _audio(wav)[0].numpy(), result.sample_rate, subtype="PCM_16")
            links.append(f"[{condition}]({stem}_{condition}.wav)")
        fig = mel_figure(result, figures)
        fig.savefig(folder / f"{stem}.png")
        lines += [f"### {item.utt} ({item.spk})", "", f"> {item.text}", "",
                  (f"Prompt: {item.prompt.utt}. " if item.prompt is not None else "") + " ".join(links), "",
                  f"![mels]({stem}.png)", ""]
        rows = [c for c in ("recording",) + CONDITIONS if c in figures]
        lines += ["| condition | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
        lines += [f"| {c} | " + " | ".join(_cell(figures[c], k) for k in columns) + " |" for c in rows]
        for condition, error in result.errors.items():
            lines.append(f"\n{condition} failed: `{error}`")
        lines.append("")
    report = folder / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(report)
    return report
