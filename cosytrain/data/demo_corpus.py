"""``python -m cosytrain demo-corpus``: a small multi-speaker English corpus made offline.

Speech comes from libespeak-ng as shipped in the ``espeakng-loader`` wheel (library + voice data),
driven through ctypes, so no system package and no download is needed. Several espeak voice variants
with different pitch and rate stand in for speakers. The result is a Kaldi-style folder, the phone
alignment espeak-ng reports while it speaks (``kaldi/phones.ctm``), and parquet shards whose speech
tokens come from that alignment (``alignment_tokens.py``: tokens that follow the words, as upstream's
supervised S3 tokens do, so the demo LLM learns to read in minutes) with the built-in stand-in speaker
embedding: enough for every recipe to run end to end on any machine.

Determinism: libespeak-ng keeps hidden state between calls (its pitch "flutter" phase is never
reset, not even by ``espeak_Terminate``), so the same sentence gives different samples depending on
what was said before in the process. Synthesis therefore always runs in a fresh spawned process, in
a fixed order, which makes the wav bytes identical from run to run. Voice variants with ``breath``
noise (e.g. ``+f2``) are not reproducible even so, and are not used.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from cosytrain.data.espeak import open_espeak, set_voice
from cosytrain.data.shards import atomic_write_text

SAMPLE_RATE = 22050
DEMO_VERSION = 4  # 2: generated sentences before the hand-written ones; 3: phone-alignment tokens; 4: pairs
SENTENCES_FILE = Path(__file__).with_name("assets") / "demo_sentences.txt"
NUM_GENERATED = 2000  # template sentences (cosytrain.data.demo_text) the LLM learns to read from
# two generated sentences said as one utterance (the first 2 * NUM_PAIRS, paired in order): the LLM learns
# to go on after a sentence, which a zero-shot prompt asks of it (prompt sentence, then the target's);
# conf/data/demo.yaml trains on them only after the single sentences (curriculum_epochs). A multiple of
# the 5 voices, so every hand-written sentence keeps its voice.
NUM_PAIRS = 500
ALIGNMENT_FILE = "phones.ctm"  # in kaldi/: what espeak-ng said when, the source of the speech tokens


@dataclass(frozen=True)
class DemoVoice:
    spk: str
    voice: str  # espeak-ng voice name with a variant
    pitch: int  # espeak 0-100, 50 = voice default
    rate: int  # words per minute


VOICES: tuple[DemoVoice, ...] = (
    DemoVoice("spk1_usm", "en-us+m3", 35, 165),
    DemoVoice("spk2_usf", "en-us+f1", 60, 155),
    DemoVoice("spk3_rpm", "en-gb-x-rp+m1", 45, 175),
    DemoVoice("spk4_rpf", "en-gb-x-rp+f4", 75, 160),
    DemoVoice("spk5_scm", "en-gb-scotland+m7", 50, 150),
)


def default_root() -> Path:
    """``$COSYTRAIN_HOME/demo`` when set, else ``~/.cache/cosytrain/demo``."""
    from cosytrain.utils.paths import cache_home

    return cache_home() / "demo"


def load_sentences() -> list[str]:
    """The hand-written sentences (natural text; the last ones become the held-out shard)."""
    lines = SENTENCES_FILE.read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip()]


def corpus_sentences() -> list[str]:
    """Every utterance's text in order: ``NUM_GENERATED`` generated sentences, ``NUM_PAIRS`` pairs of them,
    then the hand-written ones (last, so the held-out shard is theirs)."""
    from cosytrain.data.demo_text import generated_sentences

    written = load_sentences()
    generated = generated_sentences(NUM_GENERATED, exclude=frozenset(written))
    pairs = [f"{generated[2 * k]} {generated[2 * k + 1]}" for k in range(NUM_PAIRS)]
    return generated + pairs + written


def plan(num_utts: int | None = None) -> list[tuple[str, DemoVoice, str]]:
    """(utt id, voice, sentence) for sentence i spoken by voice i mod len(VOICES)."""
    sentences = corpus_sentences()
    n = len(sentences) if num_utts is None else min(num_utts, len(sentences))
    out = []
    for i in range(n):
        v = VOICES[i % len(VOICES)]
        out.append((f"{v.spk}_{i:04d}", v, sentences[i]))
    return out


# --------------------------------------------------------------------------------- espeak-ng


class _Espeak:
    """Minimal ctypes binding: synchronous synthesis into a Python buffer via the synth callback, with
    the phone events (name and start sample) espeak-ng reports while it speaks."""

    INITIALIZE_PHONEME_EVENTS = 1
    POS_CHARACTER = 1
    CHARS_UTF8 = 1
    ENDPAUSE = 0x1000
    RATE, PITCH = 1, 3
    EVENT_LIST_TERMINATED, EVENT_PHONEME = 0, 7

    def __init__(self) -> None:
        import ctypes

        class _EventId(ctypes.Union):
            _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

        class _Event(ctypes.Structure):  # espeak_EVENT of speak_lib.h
            _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                        ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                        ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                        ("user_data", ctypes.c_void_p), ("id", _EventId)]

        self.lib, self.sample_rate = open_espeak(self.INITIALIZE_PHONEME_EVENTS)
        self.libc = ctypes.CDLL(None)  # libc rand() feeds espeak's noise sources; pin it per utterance
        self._chunks: list = []
        self._phones: list[tuple[str, int]] = []
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
        self._cb = proto(self._on_audio)  # keep a reference: the library calls it later
        self.lib.espeak_SetSynthCallback(self._cb)

    def _on_audio(self, wav, n, events) -> int:
        import numpy as np

        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != self.EVENT_LIST_TERMINATED:
            if events[i].type == self.EVENT_PHONEME:
                self._phones.append((events[i].id.string.decode("ascii", "replace"), int(events[i].sample)))
            i += 1
        return 0

    def say(self, text: str, voice: DemoVoice, seed: int = 0):
        """(audio in [-1, 1], [(phone, start, end)] in samples): the phones cover the audio end to end."""
        import numpy as np

        self.libc.srand(seed)
        set_voice(self.lib, voice.voice)
        self.lib.espeak_SetParameter(self.RATE, voice.rate, 0)
        self.lib.espeak_SetParameter(self.PITCH, voice.pitch, 0)
        self._chunks, self._phones = [], []
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, self.POS_CHARACTER, 0,
                                    self.CHARS_UTF8 | self.ENDPAUSE, None, None)
        self.lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng failed to synthesise {text!r} (code {err})")
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        starts = [min(s, len(audio)) for _, s in self._phones]
        ends = starts[1:] + [len(audio)]
        phones = [(p, s, e) for (p, _), s, e in zip(self._phones, starts, ends) if e > s]
        return audio, phones


def _synthesise_job(items: list[tuple[str, DemoVoice, str]], wav_dir: str) -> list[tuple[str, list]]:
    """Runs in a fresh process: synthesise every item in order and write 16-bit wavs at 22.05 kHz;
    returns each wav's path and its phones as (start s, end s, phone)."""
    import numpy as np
    import soundfile as sf

    engine = _Espeak()
    if engine.sample_rate != SAMPLE_RATE:  # the phone times would need resampling too
        raise RuntimeError(f"libespeak-ng speaks at {engine.sample_rate} Hz, the demo corpus needs {SAMPLE_RATE}")
    out = []
    for i, (utt, voice, text) in enumerate(items):
        audio, phones = engine.say(text, voice, seed=i)
        audio = np.clip(audio, -1.0, 1.0)
        path = Path(wav_dir) / f"{utt}.wav"
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        out.append((str(path), [(s / SAMPLE_RATE, e / SAMPLE_RATE, p) for p, s, e in phones]))
    return out


def synthesise(items: list[tuple[str, DemoVoice, str]], wav_dir: Path, ctm: Path | None = None) -> list[str]:
    """Synthesise in one fresh spawned process (see the module note on determinism); the wavs' paths.
    ``ctm``: where to write the phone alignment of every item (``alignment_tokens.write_ctm``)."""
    from cosytrain.data.alignment_tokens import write_ctm

    wav_dir.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(1) as pool:
        done = pool.apply(_synthesise_job, (items, str(wav_dir)))
    if ctm is not None:
        write_ctm(ctm, {utt: phones for (utt, _, _), (_, phones) in zip(items, done)})
    return [path for path, _ in done]


# ------------------------------------------------------------------------------------- build


def _shard_dir(root: Path, token_rate: int) -> Path:
    return root / f"shards_{token_rate}hz"


def demo_shard_dir(root: str | Path | None = None, token_rate: int = 50) -> Path:
    """Where the demo's shards for ``token_rate`` live (``root`` None: the default cache)."""
    return _shard_dir(Path(root) if root is not None else default_root(), int(token_rate))


def build_demo_corpus(root: str | Path | None = None, num_utts: int | None = None, token_rate: int = 50,
                      num_workers: int = 1, force: bool = False,
                      progress: bool = False) -> Path:
    """Synthesise (if needed) and prepare the demo corpus; returns the shards' ``data.list``.

    ``root/wavs`` + ``root/kaldi`` are shared by every token rate; shards go to ``root/shards_<rate>hz``.
    ``num_utts`` makes a reduced corpus (the first N planned sentences) for quick tests.
    """
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        return _build_locked(root, num_utts, token_rate, num_workers, force, progress)


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Serialise builders of one cache folder (parallel test sessions, several recipes at once)."""
    import fcntl

    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_locked(root: Path, num_utts: int | None, token_rate: int, num_workers: int, force: bool,
                  progress: bool) -> Path:
    from cosytrain.data.prepare import PrepareConfig, prepare
    from cosytrain.data.sources import Utterance, write_kaldi_dir

    items = plan(num_utts)
    # the hash of the planned sentences themselves: an edit of the hand-written file or of the generator rebuilds
    stamp = {"version": DEMO_VERSION, "num_utts": len(items), "voices": [v.__dict__ for v in VOICES],
             "sentences_sha1": hashlib.sha1("\n".join(text for _, _, text in items).encode()).hexdigest()}
    stamp_path = root / "corpus.json"
    kaldi = root / "kaldi"
    have = stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp
    if force or not have or not (kaldi / "wav.scp").is_file() or not (kaldi / ALIGNMENT_FILE).is_file():
        stamp_path.unlink(missing_ok=True)  # an interrupted rebuild must not look complete
        for sub in ("wavs", "kaldi"):
            shutil.rmtree(root / sub, ignore_errors=True)
        for old in root.glob("shards_*hz"):
            shutil.rmtree(old, ignore_errors=True)
        kaldi.mkdir(parents=True)
        paths = synthesise(items, root / "wavs", ctm=kaldi / ALIGNMENT_FILE)
        utts = [Utterance(utt=u, wav=p, text=t, spk=v.spk) for (u, v, t), p in zip(items, paths)]
        write_kaldi_dir(kaldi, utts)
        atomic_write_text(stamp_path, json.dumps(stamp, indent=2))
    cfg = PrepareConfig(src_dir=str(kaldi), des_dir=str(_shard_dir(root, token_rate)), fmt="kaldi",
                        speech_tokenizer=str(kaldi / ALIGNMENT_FILE), num_workers=num_workers,
                        num_utts_per_parquet=100, token_rate=token_rate, progress=progress)
    return prepare(cfg).data_list


def ensure_demo_corpus(root: str | Path | None = None, token_rate: int = 50, num_utts: int | None = None) -> Path:
    """The demo ``data.list`` for ``token_rate``, building the corpus only when it is missing.

    Preparation is resumable, so a complete cache costs only a check of each shard. ``num_utts``
    asks for a reduced corpus (quick tests); a cache of another size is rebuilt.
    """
    root = Path(root) if root is not None else default_root()
    data_list = _shard_dir(root, token_rate) / "data.list"
    stamp_path = root / "corpus.json"
    planned = len(plan(num_utts))
    if data_list.is_file() and stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("version") == DEMO_VERSION and stamp.get("num_utts") == planned:
            return data_list
    print(f"cosytrain: preparing the demo corpus ({planned} utterances, espeak-ng, {token_rate} Hz tokens)"
          f" in {root}; first run only, about a minute", file=sys.stderr, flush=True)
    return build_demo_corpus(root, num_utts=num_utts, token_rate=token_rate, progress=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cosytrain demo-corpus",
                                description="Synthesise the offline multi-speaker demo corpus with espeak-ng "
                                            "and prepare it into parquet shards (speech tokens from espeak-ng's "
                                            "phone alignment, built-in stand-in speaker embedding).")
    p.add_argument("--root", default=None, help=f"cache folder (default {default_root()})")
    p.add_argument("--num_utts", type=int, default=None, help="only the first N sentences (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token_rate", type=int, choices=[50, 25], default=None)
    g.add_argument("--generation", choices=["v1", "v2", "v3"], default=None,
                   help="v1 = 50 Hz tokens, v2/v3 = 25 Hz")
    p.add_argument("--num_workers", type=int, default=1,
                   help="prepare processes (default 1: at this size process start-up outweighs the work)")
    p.add_argument("--force", action="store_true", help="re-synthesise and re-prepare from scratch")
    a = p.parse_args(argv)
    rate = a.token_rate or (25 if a.generation in ("v2", "v3") else 50)
    t0 = time.time()
    try:
        data_list = build_demo_corpus(a.root, a.num_utts, rate, a.num_workers, a.force, progress=True)
    except (RuntimeError, OSError, ValueError) as ex:
        print(f"demo-corpus: {ex}", file=sys.stderr)
        return 2
    print(f"demo-corpus: {data_list} ({time.time() - t0:.1f}s)")
    return 0


def split_data_list(data_list: str | Path, val_shards: int = 1) -> tuple[Path, Path | None]:
    """Write ``train.list``/``val.list`` beside ``data_list``: the last ``val_shards`` shards validate.

    Split by whole shards so the two sets never share an utterance; rewritten atomically each call
    (cheap), so a rebuilt corpus never leaves a stale split behind.
    """
    data_list = Path(data_list)
    shards = [line.strip() for line in data_list.read_text().splitlines() if line.strip()]
    if val_shards < 0 or (val_shards and val_shards >= len(shards)):
        raise ValueError(f"{data_list}: cannot hold out {val_shards} of {len(shards)} shards for validation; "
                         f"use 0..{len(shards) - 1}")
    cut = len(shards) - val_shards
    train = data_list.with_name("train.list")
    atomic_write_text(train, "\n".join(shards[:cut]) + "\n")
    if not val_shards:
        return train, None
    val = data_list.with_name("val.list")
    atomic_write_text(val, "\n".join(shards[cut:]) + "\n")
    return train, val
