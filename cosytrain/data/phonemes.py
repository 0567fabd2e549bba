"""English text -> espeak-ng phonemes, for the demo's ``phoneme`` text tokenizer.

Why: the demo LLM learns from 2,000 sentences in minutes. Read as the bytes of English spelling, it
would have to learn spelling-to-sound from them as well as where in the text it is, and it does not
(README, "What the demo sounds like"). espeak-ng already knows English spelling-to-sound (it speaks
the corpus, and its phone alignment gives the demo's speech tokens, ``alignment_tokens.py``), so the
text the LLM reads can be the phonemes it will say, which leaves it an almost one-to-one mapping and
held-out sentences with words it never heard. This is the front end many TTS systems use (Matcha-TTS,
VITS, Piper); upstream CosyVoice reads subword text because its LLM learns from far more data.

Two forms, two text tokenizers (``text_tokenizer.py``):

* :func:`phonemize` (``phoneme``): espeak-ng's ASCII phoneme mnemonics as one string
  (``espeak_TextToPhonemes``, "en-us" voice, stress marks kept, words separated by spaces, clauses by
  `` | ``), read as bytes: about 1.7 bytes per phone.
* :func:`phone_sequence` (``phone``, the demo's): the same phonemes one per id, stress marks as their
  own ids, a pause between clauses, no word breaks. About 0.6 as many ids as bytes, which matters
  because upstream's LLM inference refuses to stop before 2 speech tokens per text token: for phoneme
  bytes that minimum is close to a real sentence's length (it made every zero-shot synthesis of the
  demo fail), for phones it is half of it. The ids are espeak-ng's own phoneme table for en-us
  (:data:`PHONES`, in the order of its phoneme codes), so they are fixed, not fitted to a corpus.

The library is opened by ``espeak.py`` (the ``espeakng-loader`` wheel through ctypes, nothing
downloaded). Text-to-phoneme conversion is deterministic (the hidden state noted in
:mod:`cosytrain.data.demo_corpus` concerns audio only).
"""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache

from cosytrain.data.espeak import open_espeak, set_voice

PHONEME_VOICE = "en-us"
CLAUSE_SEPARATOR = " | "
_TEXT_MODE_UTF8 = 1
_PHONEMES_ASCII = 0
_PHONE_SEPARATOR = "|"
_PHONES_SEPARATED = ord(_PHONE_SEPARATOR) << 8  # phonememode bits 8-23: a separator between phoneme names

# espeak-ng's phoneme mnemonics for its en-us phoneme table (with the tables it includes: en, base1,
# base), in the order of espeak-ng's phoneme codes, control entries left out; read from the phontab
# of espeakng-loader 0.2.4 (espeak-ng 1.52). A name the table lacks (another espeak-ng) reads as UNKNOWN.
PHONES = (
    "%", "%%", ",", ",,", "'", "''", "=", "_:", "_", "_!", ":", "@", "@-", "||", "*", "1", "#X1", "?", "-", "_^_",
    "_X1", "_|", "_::", "t#", "'!", "_;_", "#@", "#a", "#e", "#i", "#o", "#u", "r", "a", "e", "i", ";", "o", "u",
    "m-", "n-", "N-", "r-", "l-", "r/", "t", "p", "k", "n", "R", "R2", "R3", "r\"", "l", "l/", "j", "w", "l/2", "l/3",
    "l^", "l.", "L/", "L", "h", "m", "n.", "n^", "N", "**", "r.", "b", "d", "d[", "t[", "dZ", "tS", "dZ;", "tS;", "J",
    "c", "g", "B", "f", "v", "v#", "D", "T", "z", "s", "Z", "S", "z.", "s.", "z;", "s;", "Z;", "S;", "J^", "C", "Q",
    "x", "Q^", "Q\"", "q", "l#", "X", "t2", "d#", "z#", "3", "z/2", "I2", "w#", "@2", "@5", "U", "@L", "a#", "a2",
    "aa", "A:", "E", "E#", "E2", "I", "I#", "I2#", "0", "0#", "02", "O2", "V", "A@", "A#", "3:", "i:", "O:", "O",
    "O@", "o@", "u:", "aU", "oU", "oU#", "aI", "eI", "OI", "e@", "i@", "i@3", "U@", "aI@", "aI3", "aU@", "IR", "VR",
    "o:", "A~", "O~", "e:", "e#", "a#2", "@#",
)
UNKNOWN = "<unk>"
CLAUSE_PAUSE = "_"  # between clauses, where espeak-ng pauses
_STRESS_MARKS = ("''", ",,", "%%", "'", ",", "%", "=")  # written before a vowel's name, read as their own ids


class _EspeakPhonemizer:
    """One libespeak-ng handle per process; calls are serialised (the library is not thread-safe)."""

    def __init__(self, voice: str = PHONEME_VOICE) -> None:
        self._lib, _ = open_espeak()
        set_voice(self._lib, voice)
        self._lock = threading.Lock()

    def phonemes(self, text: str, mode: int = _PHONEMES_ASCII) -> list[str]:
        """The phoneme string of every clause of ``text`` (``mode``: espeak_TextToPhonemes's phonememode)."""
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        clauses = []
        with self._lock:
            while ptr.value:  # the library advances ptr one clause per call, NULL at the end
                out = self._lib.espeak_TextToPhonemes(ctypes.byref(ptr), _TEXT_MODE_UTF8, mode)
                clause = (out or b"").decode("ascii", errors="replace").strip()
                if clause:
                    clauses.append(clause)
        return clauses


@lru_cache(maxsize=1)
def _phonemizer() -> _EspeakPhonemizer:
    return _EspeakPhonemizer()


@lru_cache(maxsize=65536)
def phonemize(text: str) -> str:
    """espeak-ng's ASCII phonemes of English ``text`` (cached: a corpus is read every epoch)."""
    return CLAUSE_SEPARATOR.join(_phonemizer().phonemes(text))


def _split_stress(name: str) -> list[str]:
    """``'aI`` -> ``["'", "aI"]``: stress marks before a phoneme's name become names of their own."""
    out = []
    while True:
        mark = next((m for m in _STRESS_MARKS if name.startswith(m) and len(name) > len(m)), None)
        if mark is None:
            return out + [name]
        out.append(mark)
        name = name[len(mark):]


@lru_cache(maxsize=65536)
def phone_sequence(text: str) -> tuple[str, ...]:
    """espeak-ng's phonemes of English ``text``, one name per phone or stress mark, :data:`CLAUSE_PAUSE`
    between clauses, no word breaks (cached)."""
    out: list[str] = []
    for clause in _phonemizer().phonemes(text, _PHONES_SEPARATED):
        if out:
            out.append(CLAUSE_PAUSE)
        for word in clause.split():
            for name in word.split(_PHONE_SEPARATOR):
                if name:
                    out += _split_stress(name)
    return tuple(out)
