"""Corpus folders in the two layouts people already have: Kaldi-style and LJSpeech-style.

Both read into the same list of :class:`Utterance` so ``prepare`` does not care which it got.
Parsing follows upstream ``tools/make_parquet_list.py`` (utf-8, split once on whitespace), but a
corpus assembled by hand must not be stopped or silently misread by one bad row, so
(``docs/reliability.md``, section 4):

* a line that is not valid in the corpus encoding (``--encoding``, default UTF-8) skips the
  utterance it belongs to, with a reason naming the file, line and byte, and the rest is read;
* a UTF-8 BOM (also mid-file, from ``cat``), UTF-16 files with a BOM, CRLF/CR line ends, trailing
  spaces/tabs and empty lines are accepted;
* an id listed twice in one file with different values, a ``wav.scp`` line without a path, an
  utterance without a ``text`` or ``utt2spk`` line, and ids listed in ``text``/``utt2spk``/``instruct``
  but not in ``wav.scp`` are skipped and reported (the same line twice is harmless and kept once);
* relative audio paths resolve against the corpus folder, else the current folder (Kaldi recipes
  write them relative to the recipe folder); paths may contain spaces.

Every skipped row is returned in :attr:`Corpus.skipped` as ``(utterance id, reason)``; ``prepare``
writes them to ``skipped.tsv``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cosytrain.errors import ConfigurationError
from cosytrain.utils.text_files import check_encoding, read_lines, reencode_hint


class SourceError(ConfigurationError):
    """A corpus folder that cannot be read; the message is one line naming the path and the fix."""


@dataclass(frozen=True)
class Utterance:
    utt: str
    wav: str
    text: str
    spk: str
    instruct: str | None = None


@dataclass
class Corpus:
    """What a corpus folder holds: usable utterances, and the rows skipped while reading it."""

    utts: list[Utterance]
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Table:
    """One ``<id> <value>`` file: values by id, ids in file order, per-id problems, id-less bad lines."""

    name: str
    values: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    line_of: dict[str, int] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    orphans: list[tuple[str, str]] = field(default_factory=list)

    def ids(self) -> set[str]:
        return set(self.order)


def _read_table(path: Path, encoding: str, needs_value: bool) -> _Table:
    table = _Table(path.name)
    for line in read_lines(path, encoding):
        n = line.number
        if line.text is None:
            guess = line.raw.decode(encoding, errors="replace").split(maxsplit=1)
            reason = f"{path.name}:{n}: {line.problem}; {reencode_hint(encoding)}"
            uid = guess[0] if guess else ""
            if uid and "\ufffd" not in uid:  # the id itself is readable: skip that utterance
                if uid not in table.line_of:
                    table.order.append(uid)
                    table.line_of[uid] = n
                table.values.pop(uid, None)
                table.problems.setdefault(uid, reason)
            else:
                table.orphans.append((f"{path.name}:{n}", reason))
            continue
        stripped = line.text.strip()
        if not stripped:
            continue
        parts = stripped.split(maxsplit=1)
        uid, value = parts[0], parts[1].strip() if len(parts) > 1 else ""
        if uid in table.line_of:
            if uid in table.values and table.values[uid] == value:
                continue  # the same line twice: nothing is ambiguous
            table.values.pop(uid, None)
            table.problems.setdefault(uid, f"{path.name}: lines {table.line_of[uid]} and {n} give {uid} different"
                                           " values; keep one")
            continue
        table.order.append(uid)
        table.line_of[uid] = n
        if needs_value and not value:
            table.problems[uid] = f"{path.name}:{n}: nothing after the id"
        else:
            table.values[uid] = value
    return table


_ARCHIVE = re.compile(r"\.(ark|scp):\d+$")


def _resolve_wav(src: Path, wav: str) -> tuple[str, str | None]:
    """(path to use, reason the entry cannot be used or None)."""
    if wav.rstrip().endswith("|"):
        return wav, "piped wav.scp entries are not supported; write the audio to files first"
    if _ARCHIVE.search(wav):
        return wav, "Kaldi archive entries (file.ark:offset) are not supported; write the audio to files first"
    p = Path(wav)
    if p.is_absolute():
        return str(p), None
    in_folder = src / p
    if not in_folder.exists() and p.exists():  # Kaldi recipes write paths relative to the recipe folder
        return str(p.resolve()), None
    return str(in_folder), None


def read_kaldi_dir(src: str | Path, encoding: str = "utf-8") -> Corpus:
    """``wav.scp`` + ``text`` + ``utt2spk`` (+ optional ``instruct``), in ``wav.scp`` order.

    An utterance missing from ``instruct`` (when that file exists) simply has no instruction.
    """
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"input folder {src} does not exist")
    encoding = check_encoding(encoding)
    files = {name: src / name for name in ("wav.scp", "text", "utt2spk")}
    for name, path in files.items():
        if not path.is_file():
            raise SourceError(f"missing {path}: a Kaldi-style folder needs wav.scp, text and utt2spk")
    wavs = _read_table(files["wav.scp"], encoding, needs_value=True)
    texts = _read_table(files["text"], encoding, needs_value=False)
    spks = _read_table(files["utt2spk"], encoding, needs_value=True)
    instruct_path = src / "instruct"
    instructs = _read_table(instruct_path, encoding, needs_value=False) if instruct_path.is_file() else None
    tables = [t for t in (wavs, texts, spks, instructs) if t is not None]
    skipped = [row for t in tables for row in t.orphans]
    out = []
    for uid in wavs.order:
        reason = next((t.problems[uid] for t in tables if uid in t.problems), None)
        if reason is None and uid not in texts.values:
            reason = "no line in text"
        if reason is None and uid not in spks.values:
            reason = "no line in utt2spk"
        if reason is None:
            wav, reason = _resolve_wav(src, wavs.values[uid])
        if reason is not None:
            skipped.append((uid, reason))
            continue
        out.append(Utterance(utt=uid, wav=wav, text=texts.values[uid], spk=spks.values[uid],
                             instruct=None if instructs is None else instructs.values.get(uid, "")))
    listed = wavs.ids()
    extra: dict[str, list[str]] = {}
    for t in tables[1:]:
        for uid in t.order:
            if uid not in listed:
                extra.setdefault(uid, []).append(t.name)
    skipped += [(uid, f"listed in {' and '.join(names)} but not in wav.scp (no audio)") for uid, names in extra.items()]
    return Corpus(out, skipped)


def read_ljspeech_dir(src: str | Path, speaker: str | None = None, encoding: str = "utf-8") -> Corpus:
    """``metadata.csv`` (``id|text|normalized``) + ``wavs/<id>.wav``; one speaker (default: folder name).

    The normalised column is used when present and non-empty, as TTS recipes on LJSpeech do.
    """
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"input folder {src} does not exist")
    encoding = check_encoding(encoding)
    meta = src / "metadata.csv"
    if not meta.is_file():
        raise SourceError(f"missing {meta}: an LJSpeech-style folder needs metadata.csv and wavs/")
    spk = speaker or src.resolve().name
    rows: dict[str, list[tuple[int, str]]] = {}
    skipped: list[tuple[str, str]] = []
    for line in read_lines(meta, encoding):
        where = f"{meta.name}:{line.number}"
        if line.text is None:
            guess = line.raw.decode(encoding, errors="replace").split("|", 1)[0].strip()
            skipped.append((guess if guess and "\ufffd" not in guess else where,
                            f"{where}: {line.problem}; {reencode_hint(encoding)}"))
            continue
        stripped = line.text.strip()
        if not stripped:
            continue
        fields = stripped.split("|")
        uid = fields[0].strip()
        if not uid or len(fields) < 2:
            skipped.append((uid or where, f"{where}: expected 'id|text|normalized', got {stripped[:60]!r}"))
            continue
        text = fields[2].strip() if len(fields) > 2 and fields[2].strip() else fields[1].strip()
        rows.setdefault(uid, []).append((line.number, text))
    out = []
    for uid, found in rows.items():
        if len({text for _, text in found}) > 1:
            skipped.append((uid, f"{meta.name}: lines {found[0][0]} and {found[1][0]} give {uid} different texts;"
                                 " keep one"))
            continue
        out.append(Utterance(utt=uid, wav=str(src / "wavs" / f"{uid}.wav"), text=found[0][1], spk=spk))
    return Corpus(out, skipped)


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


def read_corpus(src: str | Path, fmt: str = "auto", speaker: str | None = None, encoding: str = "utf-8") -> Corpus:
    """Read a corpus folder of either layout; ``SourceError`` (one line) when the folder itself is unusable."""
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "kaldi":
        return read_kaldi_dir(src, encoding)
    if fmt == "ljspeech":
        return read_ljspeech_dir(src, speaker, encoding)
    raise SourceError(f"unknown input format {fmt!r}; use auto, kaldi or ljspeech")


def read_source(src: str | Path, fmt: str = "auto", speaker: str | None = None) -> list[Utterance]:
    """The usable utterances of a corpus folder (``read_corpus(...).utts``)."""
    return read_corpus(src, fmt, speaker).utts


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
