"""Corpus folders in the two layouts people already have: Kaldi-style and LJSpeech-style.

Both read into the same list of :class:`Utterance` so ``prepare`` does not care which it got.
Parsing follows upstream ``tools/make_parquet_list.py`` (utf-8, split once on whitespace, an empty
text line allowed so that validation can report it rather than the parser crashing).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from cosytrain.errors import ConfigurationError


class SourceError(ConfigurationError):
    """A corpus folder that cannot be read; the message is one line naming the path and the fix."""


@dataclass(frozen=True)
class Utterance:
    utt: str
    wav: str
    text: str
    spk: str
    instruct: str | None = None


def _read_kv(path: Path, allow_empty_value: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) == 1 and not allow_empty_value:
                raise SourceError(f"{path}:{lineno}: expected '<utt> <value>', got {line!r}")
            out[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return out


def read_kaldi_dir(src: str | Path) -> list[Utterance]:
    """``wav.scp`` + ``text`` + ``utt2spk`` (+ optional ``instruct``), in ``wav.scp`` order.

    Relative wav paths resolve against the folder. Utterances missing from ``text`` get empty text
    and those missing from ``utt2spk`` get speaker = utt id, so validation reports them per row.
    """
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"input folder {src} does not exist")
    files = {name: src / name for name in ("wav.scp", "text", "utt2spk")}
    for name, path in files.items():
        if not path.is_file():
            raise SourceError(f"missing {path}: a Kaldi-style folder needs wav.scp, text and utt2spk")
    utt2wav = _read_kv(files["wav.scp"], allow_empty_value=False)
    utt2text = _read_kv(files["text"], allow_empty_value=True)
    utt2spk = _read_kv(files["utt2spk"], allow_empty_value=False)
    instruct_path = src / "instruct"
    utt2instruct = _read_kv(instruct_path, allow_empty_value=True) if instruct_path.is_file() else None
    out = []
    for utt, wav in utt2wav.items():
        p = Path(wav)
        if not p.is_absolute() and not wav.endswith("|"):
            p = src / p
        out.append(Utterance(utt=utt, wav=str(p) if not wav.endswith("|") else wav,
                             text=utt2text.get(utt, ""), spk=utt2spk.get(utt, utt),
                             instruct=None if utt2instruct is None else utt2instruct.get(utt, "")))
    return out


def read_ljspeech_dir(src: str | Path, speaker: str | None = None) -> list[Utterance]:
    """``metadata.csv`` (``id|text|normalized``) + ``wavs/<id>.wav``; one speaker (default: folder name).

    The normalised column is used when present and non-empty, as TTS recipes on LJSpeech do.
    """
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"input folder {src} does not exist")
    meta = src / "metadata.csv"
    if not meta.is_file():
        raise SourceError(f"missing {meta}: an LJSpeech-style folder needs metadata.csv and wavs/")
    spk = speaker or src.resolve().name
    out = []
    with open(meta, encoding="utf-8", newline="") as f:
        for lineno, fields in enumerate(csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE), 1):
            if not fields or not fields[0].strip():
                continue
            if len(fields) < 2:
                raise SourceError(f"{meta}:{lineno}: expected 'id|text|normalized', got {'|'.join(fields)!r}")
            utt = fields[0].strip()
            text = fields[2].strip() if len(fields) > 2 and fields[2].strip() else fields[1].strip()
            out.append(Utterance(utt=utt, wav=str(src / "wavs" / f"{utt}.wav"), text=text, spk=spk))
    return out


def detect_format(src: str | Path) -> str:
    """``kaldi`` when ``wav.scp`` is there, ``ljspeech`` when ``metadata.csv`` is, else a one-line error."""
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"input folder {src} does not exist")
    if (src / "wav.scp").is_file():
        return "kaldi"
    if (src / "metadata.csv").is_file():
        return "ljspeech"
    raise SourceError(f"missing {src / 'wav.scp'} (Kaldi-style) or {src / 'metadata.csv'} (LJSpeech-style)")


def read_source(src: str | Path, fmt: str = "auto", speaker: str | None = None) -> list[Utterance]:
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "kaldi":
        return read_kaldi_dir(src)
    if fmt == "ljspeech":
        return read_ljspeech_dir(src, speaker)
    raise SourceError(f"unknown input format {fmt!r}; use auto, kaldi or ljspeech")


def write_kaldi_dir(dst: str | Path, utts: list[Utterance]) -> None:
    """Write ``wav.scp``/``text``/``utt2spk``/``spk2utt`` (and ``instruct`` when any utt has one)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "wav.scp").write_text("".join(f"{u.utt} {u.wav}\n" for u in utts), encoding="utf-8")
    (dst / "text").write_text("".join(f"{u.utt} {u.text}\n" for u in utts), encoding="utf-8")
    (dst / "utt2spk").write_text("".join(f"{u.utt} {u.spk}\n" for u in utts), encoding="utf-8")
    spk2utt: dict[str, list[str]] = {}
    for u in utts:
        spk2utt.setdefault(u.spk, []).append(u.utt)
    (dst / "spk2utt").write_text("".join(f"{s} {' '.join(v)}\n" for s, v in spk2utt.items()), encoding="utf-8")
    if any(u.instruct is not None for u in utts):
        (dst / "instruct").write_text("".join(f"{u.utt} {u.instruct or ''}\n" for u in utts), encoding="utf-8")
