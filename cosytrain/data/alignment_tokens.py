"""Speech tokens from a phone alignment: a supervised stand-in for upstream's S3 tokens.

Upstream's speech tokenizer is an ASR encoder with a quantiser inside, trained so that its tokens say
*what* is spoken; the LLM learns to read because the tokens follow the text. The built-in k-means
tokenizer (``speech_tokenizer.py``) clusters spectra instead: its tokens follow the voice as much as the
words, and a small LLM trained on them in a CPU budget does not say the sentence (README, "What the
demo sounds like"). When a corpus comes with its phone alignment, the tokens can follow the words
exactly: each frame at the token rate becomes the phone under its centre and which part of that phone
(first or second half by default) it lies in. The demo corpus has such an alignment for free, since
espeak-ng reports every phone it says and the sample where it starts (``demo_corpus.py``).

The alignment is a CTM file (``utt channel start duration phone``, seconds), the format of Kaldi and
of forced aligners such as the Montreal Forced Aligner, so a user's own aligned corpus works too:
``cosytrain prepare --speech_tokenizer phones.ctm``. Token ids are ``phone_index * states + part``
with phones sorted by name (plus :data:`SILENCE` for frames no phone covers), so the same file always
gives the same ids; the ids come from the phones the file holds, so prepare every split of a corpus
(training and validation) from one CTM. An alignment cannot tokenize new audio, so ``prepare`` also fits,
beside the shards, a built-in tokenizer whose centroids are the mean frame of each alignment token
(``BuiltinSpeechTokenizer.fit_labelled``): a crude frame classifier (on the demo corpus about 4 frames in
10 get the right phone) that gives an exported model's zero-shot prompts ids it knows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

# 10 ms at 16 kHz: the frame hop of upstream's tokenizers and of speech_tokenizer.HOP, which it must equal (an
# import would be a cycle: speech_tokenizer loads this module for *.ctm specs; tests/data/test_alignment_tokens.py)
HOP = 160

SILENCE = "<sil>"  # frames between, before or after the aligned phones
DEFAULT_STATES = 2


class AlignmentError(ValueError):
    """A CTM file that cannot be used; the message names the file, the line and the fix."""


Segment = tuple[float, float, str]  # start, end (seconds), phone


def read_ctm(path: str | Path) -> dict[str, list[Segment]]:
    """``utt -> [(start, end, phone)]`` sorted by start, from a CTM file (``;;`` lines are comments)."""
    path = Path(path)
    table: dict[str, list[Segment]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise AlignmentError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the CTM as UTF-8") \
            from None
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith(";;"):
            continue
        try:
            utt, _channel, start, dur, phone = fields[:5]
            start_s, dur_s = float(start), float(dur)
        except ValueError:
            raise AlignmentError(f"{path}:{n}: expected 'utt channel start duration phone', got {line.strip()!r}") \
                from None
        if not (math.isfinite(start_s) and math.isfinite(dur_s)) or start_s < 0 or dur_s < 0:
            raise AlignmentError(f"{path}:{n}: start and duration must be finite seconds >= 0, got {start} {dur}")
        table.setdefault(utt, []).append((start_s, start_s + dur_s, phone))
    for segments in table.values():
        segments.sort()
    return table


def write_ctm(path: str | Path, table: dict[str, Sequence[Segment]]) -> None:
    """Write ``utt -> [(start, end, phone)]`` as a CTM file, atomically."""
    from cosytrain.data.shards import atomic_write_text

    rows = [f"{utt} 1 {start:.6f} {end - start:.6f} {phone}"
            for utt, segments in table.items() for start, end, phone in segments]
    atomic_write_text(path, "\n".join(rows) + "\n")


def num_tokens(num_samples_16k: int, token_rate: int) -> int:
    """Tokens an utterance of this many 16 kHz samples gets: whole token periods of its 10-ms frames (the
    built-in tokenizer gives one more when the frame count is not a multiple of the period)."""
    return max((num_samples_16k // HOP) // (100 // token_rate), 1)


def frame_labels(segments: Sequence[Segment], count: int, token_rate: int,
                 states: int = DEFAULT_STATES) -> list[tuple[str, int]]:
    """(phone, part) at the frame centres ``(t + 0.5) / token_rate`` s; parts number 0 .. states - 1."""
    out: list[tuple[str, int]] = []
    j = 0
    for t in range(count):
        centre = (t + 0.5) / token_rate
        while j < len(segments) and segments[j][1] <= centre:
            j += 1
        if j < len(segments) and segments[j][0] <= centre:
            start, end, phone = segments[j]
            part = min(int(states * (centre - start) / max(end - start, 1e-9)), states - 1)
            out.append((phone, part))
        else:
            out.append((SILENCE, 0))
    return out


class AlignmentSpeechTokenizer:
    """Tokens read from a phone alignment instead of computed from the audio (see the module note)."""

    def __init__(self, table: dict[str, list[Segment]], token_rate: int, states: int = DEFAULT_STATES,
                 source: str = "alignment") -> None:
        if 100 % int(token_rate):
            raise ValueError(f"token_rate {token_rate} must divide 100 (50 for CosyVoice 1, 25 for 2/3)")
        self.table = table
        self.token_rate = int(token_rate)
        self.states = int(states)
        self.source = source
        self.phones = sorted({p for segs in table.values() for _, _, p in segs} | {SILENCE})
        self._index = {p: i for i, p in enumerate(self.phones)}

    @classmethod
    def load(cls, path: str | Path, token_rate: int, states: int = DEFAULT_STATES) -> "AlignmentSpeechTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"alignment {path} not found; pass an existing CTM file")
        table = read_ctm(path)
        if not table:
            raise AlignmentError(f"{path}: no alignment lines; expected 'utt channel start duration phone'")
        return cls(table, token_rate, states, source=path.name)

    @property
    def codebook_size(self) -> int:
        return len(self.phones) * self.states

    def tokens(self, utt: str, num_samples_16k: int) -> list[int] | None:
        """The utterance's tokens, or None when the alignment does not cover it."""
        segments = self.table.get(utt)
        if segments is None:
            return None
        count = num_tokens(num_samples_16k, self.token_rate)
        labels = frame_labels(segments, count, self.token_rate, self.states)
        return [self._index[p] * self.states + k for p, k in labels]

    def tokenize_utterances(self, utts: Sequence[str], audios16k: Sequence[np.ndarray]) -> list[list[int] | None]:
        """What ``prepare`` calls instead of ``tokenize_batch``: the tokens depend on the id, not the audio."""
        return [self.tokens(u, len(a)) for u, a in zip(utts, audios16k)]

    def tokenize_batch(self, audios16k: Sequence[np.ndarray]) -> list[list[int]]:
        raise AlignmentError(f"{self.source}: alignment tokens need utterance ids; tokenize new audio (a zero-shot"
                             " prompt) with the speech_tokenizer_builtin.npz that prepare fits beside the shards")
