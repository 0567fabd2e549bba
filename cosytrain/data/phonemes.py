"""English text -> espeak-ng phonemes, for the demo's ``phoneme`` text tokenizer.

Why: the demo LLM learns from 2,000 sentences in minutes. Read as the bytes of English spelling, it
would have to learn spelling-to-sound from them as well as where in the text it is, and it does not
(README, "What the demo sounds like"). espeak-ng already knows English spelling-to-sound (it speaks
the corpus, and its phone alignment gives the demo's speech tokens, ``alignment_tokens.py``), so the
text the LLM reads can be the phonemes it will say, which leaves it an almost one-to-one mapping and
held-out sentences with words it never heard. This is the front end many TTS systems use (Matcha-TTS,
VITS, Piper); upstream CosyVoice reads subword text because its LLM learns from far more data.

The phonemes are espeak-ng's ASCII phoneme mnemonics (``espeak_TextToPhonemes``, "en-us" voice,
stress marks kept, words separated by spaces, clauses by `` | ``), so the ids are the bytes of that
string and the vocabulary stays the byte tokenizer's 257. The library is opened by ``espeak.py``
(the ``espeakng-loader`` wheel through ctypes, nothing downloaded). Text-to-phoneme conversion is
deterministic (the hidden state noted in :mod:`cosytrain.data.demo_corpus` concerns audio only).
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


class _EspeakPhonemizer:
    """One libespeak-ng handle per process; calls are serialised (the library is not thread-safe)."""

    def __init__(self, voice: str = PHONEME_VOICE) -> None:
        self._lib, _ = open_espeak()
        set_voice(self._lib, voice)
        self._lock = threading.Lock()

    def phonemes(self, text: str) -> str:
        """The phoneme string of ``text``: clauses joined by :data:`CLAUSE_SEPARATOR`."""
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        clauses = []
        with self._lock:
            while ptr.value:  # the library advances ptr one clause per call, NULL at the end
                out = self._lib.espeak_TextToPhonemes(ctypes.byref(ptr), _TEXT_MODE_UTF8, _PHONEMES_ASCII)
                clause = (out or b"").decode("ascii", errors="replace").strip()
                if clause:
                    clauses.append(clause)
        return CLAUSE_SEPARATOR.join(clauses)


@lru_cache(maxsize=1)
def _phonemizer() -> _EspeakPhonemizer:
    return _EspeakPhonemizer()


@lru_cache(maxsize=65536)
def phonemize(text: str) -> str:
    """espeak-ng's ASCII phonemes of English ``text`` (cached: a corpus is read every epoch)."""
    return _phonemizer().phonemes(text)
