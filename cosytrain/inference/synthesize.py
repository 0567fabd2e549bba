"""``python -m cosytrain synthesize``: text -> a wav file with an exported (or upstream) model directory.

The mode follows from the arguments, as upstream's methods do:

* ``--speaker ID``: ``inference_sft`` (every generation);
* ``--speaker ID --instruct "..."``: ``inference_instruct`` (CosyVoice 1 ``-Instruct`` models);
* ``--prompt_wav W --prompt_text "..."``: ``inference_zero_shot``;
* ``--prompt_wav W`` without a prompt text: ``inference_cross_lingual``;
* ``--prompt_wav W --instruct "..."``: ``inference_instruct2`` (CosyVoice 2/3).

All chunks (one per sentence piece, or per streamed chunk with ``--stream``) are concatenated and
written once, atomically (a temporary sibling renamed into place), in the format the ``--out``
suffix names (``.wav`` 16-bit PCM unless ``--subtype`` says otherwise). Any bad input is one
``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "choose_mode", "write_audio"]


class UsageError(ValueError):
    """Arguments that do not name a mode the model can run."""


def build_parser() -> argparse.ArgumentParser:
    from cosytrain.data.text_tokenizer import TOKENIZER_KINDS

    p = argparse.ArgumentParser(
        prog="python -m cosytrain synthesize",
        description="Synthesise text with a CosyVoice model directory (cosyvoice.yaml / cosyvoice2.yaml /"
                    " cosyvoice3.yaml + llm.pt, flow.pt, hift.pt) and write an audio file.")
    p.add_argument("--model_dir", required=True, help="upstream-layout model directory (e.g. from `cosytrain export`)")
    p.add_argument("--text", help="the text to speak (long text is split into sentences)")
    p.add_argument("--speaker", help="a speaker id from the directory's spk2info.pt (--list_speakers shows them)")
    p.add_argument("--prompt_wav", help="prompt audio to clone the voice of (any soundfile format, <= 30 s)")
    p.add_argument("--prompt_text", help="the prompt audio's transcript (zero-shot); omit for cross-lingual")
    p.add_argument("--instruct", help="an instruction (v1 with --speaker, v2/v3 with --prompt_wav); end it with"
                                      " <|endofprompt|> as upstream's examples do")
    p.add_argument("--out", help="output audio file (.wav, .flac, .ogg)")
    p.add_argument("--fp16", action="store_true", help="FP16 autocast for the LLM and flow (GPU only; FP32 on CPU)")
    p.add_argument("--stream", action="store_true", help="synthesise in streaming chunks (written as one file)")
    p.add_argument("--speed", type=float, default=1.0, help="speaking rate (non-streaming only; default 1.0)")
    p.add_argument("--seed", type=int, help="seed python/numpy/torch RNGs for a reproducible result")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no_text_frontend", action="store_true", help="skip text normalisation and sentence splitting")
    p.add_argument("--text_tokenizer", choices=TOKENIZER_KINDS,
                   help="override the directory's text tokenizer (default: cosytrain.json, else the generation's)")
    p.add_argument("--text_tokenizer_path", help="tokenizer file/folder (whisper: multilingual.tiktoken when"
                                                 " openai-whisper is not installed; qwen: CosyVoice-BlankEN)")
    p.add_argument("--subtype", default=None, help="soundfile subtype (default PCM_16 for wav/flac)")
    p.add_argument("--list_speakers", action="store_true", help="print the directory's speaker ids and exit")
    return p


def choose_mode(args: argparse.Namespace, generation: str) -> str:
    """The ``inference_*`` method the arguments ask for (see the module docstring)."""
    if args.speaker and args.prompt_wav:
        raise UsageError("give either --speaker or --prompt_wav, not both")
    if args.prompt_text is not None and not args.prompt_wav:
        raise UsageError("--prompt_text needs --prompt_wav (the audio it transcribes)")
    if args.speaker:
        if args.instruct:
            if generation != "v1":
                raise UsageError("--speaker with --instruct is CosyVoice 1 only; for CosyVoice 2/3 give --prompt_wav"
                                 " with --instruct")
            return "instruct"
        return "sft"
    if args.prompt_wav:
        if args.instruct:
            if generation == "v1":
                raise UsageError("--prompt_wav with --instruct is CosyVoice 2/3 only; CosyVoice 1 instruct takes"
                                 " --speaker")
            if args.prompt_text:
                raise UsageError("--instruct replaces --prompt_text; give one of them")
            return "instruct2"
        return "zero_shot" if args.prompt_text else "cross_lingual"
    raise UsageError("give --speaker ID (see --list_speakers) or --prompt_wav FILE [--prompt_text TEXT]")


def write_audio(path: str | Path, audio, sample_rate: int, subtype: str | None = None) -> None:
    """Write (N,) float audio atomically in the format ``path``'s suffix names."""
    import soundfile as sf

    from cosytrain.utils.atomic import atomic_write_bytes

    path = Path(path)
    fmt = path.suffix.lstrip(".").upper()
    if fmt not in sf.available_formats():
        raise UsageError(f"--out {path}: unknown audio format {path.suffix!r}; use .wav, .flac or .ogg")
    if subtype is None and fmt in ("WAV", "FLAC"):
        subtype = "PCM_16"
    buf = io.BytesIO()
    try:
        sf.write(buf, audio, int(sample_rate), format=fmt, subtype=subtype)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UsageError(f"--out {path}: cannot encode {fmt} {subtype or ''} ({exc})") from None
    atomic_write_bytes(path, buf.getvalue())


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run(args: argparse.Namespace) -> int:
    import torch

    from cosytrain.inference.auto import AutoModel, model_class_for

    cls = model_class_for(args.model_dir)  # cheap checks (dir, yaml name) before loading weights
    generation = cls.generation
    if not args.list_speakers:
        mode = choose_mode(args, generation)
        if not args.text or not args.text.strip():
            raise UsageError("--text is required (the text to speak)")
        if not args.out:
            raise UsageError("--out FILE is required")
        if args.stream and args.speed != 1.0:
            raise UsageError("--speed works without --stream only (as upstream)")
        if args.prompt_wav and not Path(args.prompt_wav).is_file():
            raise UsageError(f"--prompt_wav {args.prompt_wav}: file not found")
        suffix = Path(args.out).suffix.lstrip(".").upper()
        import soundfile as sf

        if suffix not in sf.available_formats():
            raise UsageError(f"--out {args.out}: unknown audio format {Path(args.out).suffix!r}; use .wav, .flac or"
                             " .ogg")
    model = AutoModel(args.model_dir, fp16=args.fp16, device=args.device, text_tokenizer=args.text_tokenizer,
                      text_tokenizer_path=args.text_tokenizer_path)
    if args.list_speakers:
        print("\n".join(model.list_available_spks()))
        return 0
    if args.speaker:
        model.frontend.speaker_info(args.speaker)  # unknown speaker: one line before any work
    if args.seed is not None:
        _seed(args.seed)
    common = dict(stream=args.stream, speed=args.speed, text_frontend=not args.no_text_frontend)
    if mode == "sft":
        outputs = model.inference_sft(args.text, args.speaker, **common)
    elif mode == "instruct":
        outputs = model.inference_instruct(args.text, args.speaker, args.instruct, **common)
    elif mode == "zero_shot":
        outputs = model.inference_zero_shot(args.text, args.prompt_text, args.prompt_wav, **common)
    elif mode == "cross_lingual":
        outputs = model.inference_cross_lingual(args.text, args.prompt_wav, **common)
    else:
        outputs = model.inference_instruct2(args.text, args.instruct, args.prompt_wav, **common)
    start = time.time()
    chunks = [o["tts_speech"] for o in outputs]
    if not chunks:
        raise UsageError("nothing to synthesise: the text is empty after normalisation")
    audio = torch.cat(chunks, dim=1)[0].float().numpy()
    write_audio(args.out, audio, model.sample_rate, args.subtype)
    seconds = audio.shape[0] / model.sample_rate
    print(f"wrote {args.out}: {seconds:.2f} s at {model.sample_rate} Hz ({mode}, {len(chunks)} chunk(s),"
          f" rtf {(time.time() - start) / max(seconds, 1e-9):.2f})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args)
    # ModelDirError, FrontEndError, TokenizerUnavailableError, UsageError are ValueErrors with one-line messages
    except (ValueError, NotImplementedError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
