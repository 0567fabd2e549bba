"""Reading the text files people write by hand (corpus lists, data lists, recipes) without one bad byte
stopping a job or being read wrongly in silence.

* ``read_lines`` decodes line by line: a line that is not valid in the file's encoding comes back
  with ``text=None`` and a ``problem`` naming the byte and column, and the rest of the file is read,
  so a corpus reader can skip and count that one row.
* ``read_text`` decodes a whole file (a yaml recipe, a data list) or raises ONE ``TextFileError`` line
  naming the file, line, column and the fix.

Files made on Windows are common in hand-assembled corpora: a UTF-8 byte-order mark is dropped (also
at the start of a line, where ``cat a b > text`` leaves the second file's), files with a UTF-16 BOM
(what Notepad calls "Unicode") are decoded as UTF-16, and ``\\r\\n`` and ``\\r`` line ends are accepted.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

from cosytrain.errors import ConfigurationError

__all__ = ["Line", "TextFileError", "check_encoding", "read_lines", "read_text", "reencode_hint"]

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_LINE_END = re.compile(r"\r\n|\r|\n")


class TextFileError(ConfigurationError):
    """A text file that cannot be decoded; the message names the file, line, column and the fix."""


@dataclass(frozen=True)
class Line:
    number: int  # 1-based
    text: str | None  # None when the line cannot be decoded
    problem: str | None = None  # why not, e.g. "not UTF-8 (byte 0xe9 at column 7)"
    raw: bytes = b""


def reencode_hint(encoding: str = "utf-8") -> str:
    """The fix to print after a decoding problem."""
    if codecs.lookup(encoding).name == "utf-8":
        return "re-save the file as UTF-8 (e.g. iconv -f <its encoding> -t utf-8)"
    return f"re-save the file as {encoding} or UTF-8"


def check_encoding(encoding: str) -> str:
    """The codec's canonical name; one-line error for an unknown codec or one that is not line-safe."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise TextFileError(f"unknown text encoding {encoding!r}; use e.g. utf-8, gbk, big5, latin-1") from None
    if "16" in name or "32" in name:  # splitting bytes at b"\n" is wrong for these
        raise TextFileError(f"encoding {encoding!r} is not supported for line-based files; files with a UTF-16"
                            " byte-order mark are read automatically, otherwise convert the file to UTF-8")
    return name


def _problem(raw: bytes, err: UnicodeDecodeError, encoding: str, column: int | None = None) -> str:
    shown = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
    return f"not {shown} (byte 0x{raw[err.start]:02x} at column {column or err.start + 1})"


def read_lines(path: str | Path, encoding: str = "utf-8") -> list[Line]:
    """Every line of ``path`` (line ends removed, BOMs dropped), undecodable lines marked, not raised."""
    data = Path(path).read_bytes()
    if data.startswith(_UTF16_BOMS):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as err:
            return [Line(1, None, f"not valid UTF-16 (byte offset {err.start})", data[:80])]
        return [Line(i, t.lstrip("\ufeff"), None, t.encode("utf-8"))
                for i, t in enumerate(_split(text), 1)]
    name = check_encoding(encoding)
    out = []
    for i, raw in enumerate(data.splitlines(), 1):  # bytes.splitlines: \n, \r\n and \r only
        if raw.startswith(codecs.BOM_UTF8):  # never the start of an id, whatever the declared encoding
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            out.append(Line(i, raw.decode(name), None, raw))
        except UnicodeDecodeError as err:
            out.append(Line(i, None, _problem(raw, err, encoding), raw))
    return out


def _split(text: str) -> list[str]:
    parts = _LINE_END.split(text)
    return parts[:-1] if parts and parts[-1] == "" else parts


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The whole file decoded (BOM dropped), or one ``TextFileError`` naming file, line, column and fix."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(_UTF16_BOMS):
        try:
            return data.decode("utf-16").lstrip("\ufeff")
        except UnicodeDecodeError as err:
            raise TextFileError(f"{path}: not valid UTF-16 at byte {err.start}; {reencode_hint()}") from None
    name = codecs.lookup(encoding).name
    if name == "utf-8" and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode(name)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise TextFileError(f"{path}:{line}: {_problem(data, err, encoding, column)}; {reencode_hint(encoding)}"
                            ) from None
