"""``python -m cosytrain prepare``: a Kaldi- or LJSpeech-style folder -> upstream-layout parquet shards.

Upstream needs four scripts for this (``extract_embedding.py``, ``extract_speech_token.py``,
``make_parquet_list.py`` and a recipe's own ``prepare_data.py``); this does the same in one resumable
command. Stages, each parallel over ``--num_workers`` processes:

0. (built-in front-ends only) fit the stand-in tokenizer / speaker embedding on the corpus;
1. per pending shard: load and validate every row, compute speech tokens and utterance embeddings;
2. average utterance embeddings per speaker (upstream's ``spk2embedding``), then write each pending
   shard atomically and record it as completed: ``.prepare/<shard>.json`` holds its fingerprint,
   index records and skipped rows, and ``prepare_manifest.json`` lists the completed shards (both
   written atomically, per shard, so the cost stays linear in the corpus size).

A shard whose manifest entry matches its inputs and front-ends (by fingerprint) and whose file still
opens is not redone; its utterance embeddings are read back from the shard for the speaker means.

Bad rows never stop the job: rows the corpus reader cannot use (``sources.py``: undecodable lines,
missing ids, conflicting duplicates) and rows whose audio fails ``audio_checks.check_audio`` are
skipped and listed in ``skipped.tsv`` with a reason naming the file and line; usable rows worth a
look (clipping, several channels, a wrong file extension) are kept and listed in ``flagged.tsv``.

Why one module over 450 lines: it is one resumable command whose stages share the worker set-up,
the fingerprints and the manifest; the readers of source folders (``sources.py``), the shards
(``shards.py``) and the front ends (``speech_tokenizer.py``, ``speaker_embedding.py``) are already
modules of their own (so are the row-level audio checks, ``audio_checks.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing as mp
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cosytrain.data import shards as S
from cosytrain.data.audio_checks import check_audio
from cosytrain.data.sources import SourceError, Utterance, read_corpus
from cosytrain.utils.hashing import file_sha256

MANIFEST = "prepare_manifest.json"
SKIPPED = "skipped.tsv"
FLAGGED = "flagged.tsv"
CHECKS_VERSION = 2  # bump when row validation changes, so finished shards are validated again
BUILTIN_TOKENIZER_FILE = "speech_tokenizer_builtin.npz"
FITTED_FROM_FILE = BUILTIN_TOKENIZER_FILE + ".alignment"  # sha256 of the CTM that tokenizer was fitted on
BUILTIN_EMBEDDING_FILE = "campplus_builtin.npz"
GENERATION_TOKEN_RATE = {"v1": 50, "v2": 25, "v3": 25}


@dataclass
class PrepareConfig:
    src_dir: str
    des_dir: str
    fmt: str = "auto"
    speaker: str | None = None
    num_workers: int = 1
    num_utts_per_parquet: int = 1000
    speech_tokenizer: str = "builtin"  # 'builtin', an upstream .onnx, a fitted built-in .npz, or an alignment .ctm
    campplus: str = "builtin"  # 'builtin', upstream campplus.onnx, or a fitted built-in .npz
    token_rate: int = 50  # built-in tokenizer or alignment: 50 (CosyVoice 1) or 25 (CosyVoice 2/3)
    codebook_size: int = 256
    min_duration: float = 0.3
    max_duration: float = 60.0
    min_sample_rate: int = 16000
    encoding: str = "utf-8"  # of the corpus' text files (UTF-16 with a BOM is detected)
    onnx_batch_size: int = 8
    speech_tokenizer_device: str | None = None  # e.g. 'cuda': s3tokenizer's PyTorch model instead of onnxruntime
    seed: int = 0
    max_fit_frames: int = 100_000
    progress: bool = True


@dataclass
class PrepareResult:
    des_dir: Path
    data_list: Path
    shards: list[str]
    num_rows: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused_shards: int = 0
    seconds: float = 0.0
    flagged: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        flagged = f"{len(self.flagged)} flagged, see {self.des_dir / FLAGGED}; " if self.flagged else ""
        return (f"prepare: {self.num_rows} utterances in {len(self.shards)} shards -> {self.data_list} "
                f"({len(self.skipped)} skipped, see {self.des_dir / SKIPPED}; {flagged}"
                f"{self.reused_shards} shards reused) in {self.seconds:.1f}s")


# ------------------------------------------------------------------------------------ row checks


def load_checked(u: Utterance, min_duration: float, max_duration: float,
                 min_sample_rate: int = 16000) -> tuple[np.ndarray, int, float, list[str]] | str:
    """Mono float32 audio, sample rate, duration and notes (flagged, kept), or a one-line skip reason."""
    if not u.text.strip():
        return "empty text"
    try:
        data = Path(u.wav).read_bytes()
    except FileNotFoundError:
        return f"audio file not found: {u.wav}"
    except OSError as ex:
        return f"audio file unreadable: {u.wav} ({type(ex).__name__}: {ex.strerror or ex})"
    checked = check_audio(data, u.wav, min_sample_rate)
    if isinstance(checked, str):
        return checked
    dur = checked.duration
    if dur < min_duration:
        return f"too short ({dur:.2f}s < --min_duration {min_duration}s)"
    if dur > max_duration:
        return f"too long ({dur:.2f}s > --max_duration {max_duration}s)"
    return checked.audio, checked.sample_rate, dur, checked.notes


# ---------------------------------------------------------------------------- worker processes

_WORKER: dict[tuple, Any] = {}


def _frontends(tokenizer_spec: str, embedder_spec: str, onnx_batch_size: int,
               device: str | None = None, token_rate: int | None = None) -> tuple[Any, Any]:
    """Front-ends built once per process (ONNX sessions cannot cross process boundaries)."""
    key = (tokenizer_spec, embedder_spec, onnx_batch_size, device, token_rate)
    if key not in _WORKER:
        from cosytrain.data.speaker_embedding import load_speaker_embedder
        from cosytrain.data.speech_tokenizer import load_speech_tokenizer

        _WORKER.clear()
        _WORKER[key] = (load_speech_tokenizer(tokenizer_spec, onnx_batch_size, device, token_rate),
                        load_speaker_embedder(embedder_spec, onnx_batch_size))
    return _WORKER[key]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """One intra-op thread, as in the workers, so results do not depend on ``--num_workers``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _alignment(path: str, token_rate: int) -> Any:
    """The CTM of ``--speech_tokenizer x.ctm``, read once per process and version of the file (stage 0 scans
    the corpus in several chunks; a rebuilt corpus rewrites the file in place)."""
    stat = Path(path).stat()
    return _read_alignment(path, token_rate, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _read_alignment(path: str, token_rate: int, _mtime_ns: int, _size: int) -> Any:
    from cosytrain.data.speech_tokenizer import load_speech_tokenizer

    return load_speech_tokenizer(path, token_rate=token_rate)


def _scan_for_fit(args: tuple[list[Utterance], dict, int, bool, bool]) -> tuple[list, list, list, list]:
    """Stage 0: pooled log-mel frames (sampled) and fbank stats of valid rows, for the built-in fits; with an
    alignment (``--speech_tokenizer x.ctm``) also each sampled frame's alignment token."""
    import torch

    from cosytrain.data.speaker_embedding import fbank_stats
    from cosytrain.data.speech_tokenizer import builtin_frames, to_16k

    utts, cfg, per_utt, want_frames, want_stats = args
    aligned = want_frames and str(cfg["speech_tokenizer"]).endswith(".ctm")
    alignment = _alignment(cfg["speech_tokenizer"], cfg["token_rate"]) if aligned else None
    frames, labels, stats, done = [], [], [], []
    for u in utts:
        loaded = load_checked(u, cfg["min_duration"], cfg["max_duration"], cfg["min_sample_rate"])
        done.append(u.utt)
        if isinstance(loaded, str):
            continue
        a16 = to_16k(loaded[0], loaded[1])
        if want_frames:
            f = builtin_frames(a16, cfg["token_rate"])
            y = None
            if alignment is not None:
                tokens = alignment.tokens(u.utt, len(a16))
                if tokens is None:
                    continue
                n = min(len(tokens), f.shape[0])
                f, y = f[:n], torch.tensor(tokens[:n])
            if f.shape[0] > per_utt:
                g = torch.Generator().manual_seed(zlib.crc32(u.utt.encode()))
                keep = torch.randperm(f.shape[0], generator=g)[:per_utt].sort().values
                f, y = f[keep], (y[keep] if y is not None else None)
            frames.append(f.numpy())
            if y is not None:
                labels.append(y.numpy())
        if want_stats:
            stats.append(fbank_stats(a16).numpy())
    return frames, labels, stats, done


def _analyse_shard(args: tuple[int, list[Utterance], dict, tuple]) -> tuple[int, list[dict], list[tuple[str, str]]]:
    """Stage 1: validate each row of one shard, then tokens and utterance embeddings in mini-batches."""
    from cosytrain.data.speech_tokenizer import to_16k

    shard_id, utts, cfg, specs = args
    tok, emb = _frontends(*specs)
    ok: list[dict] = []
    skipped: list[tuple[str, str]] = []
    batch: list[tuple[Utterance, np.ndarray, int, float, list[str]]] = []

    def flush() -> None:
        if not batch:
            return
        a16 = [to_16k(a, sr) for _, a, sr, _, _ in batch]
        if hasattr(tok, "tokenize_utterances"):  # an alignment: the tokens are looked up by utterance id
            tokens = tok.tokenize_utterances([u.utt for u, *_ in batch], a16)
        else:
            tokens = tok.tokenize_batch(a16)
        embs = emb.embed_batch(a16)
        for (u, a, sr, dur, notes), t, e in zip(batch, tokens, embs):
            if t is None:
                skipped.append((u.utt, f"not in the alignment {Path(specs[0]).name}; align it or remove the row"))
            elif len(t) == 0:
                skipped.append((u.utt, "speech tokenizer returned no tokens"))
            elif not np.isfinite(np.asarray(e, dtype=np.float64)).all():
                skipped.append((u.utt, "speaker embedding has NaN or Inf"))
            else:
                ok.append({"utt": u.utt, "speech_token": [int(x) for x in t], "utt_embedding": list(e),
                           "sample_rate": sr, "duration_s": dur, "num_samples": len(a), "notes": notes})
        batch.clear()

    for u in utts:
        loaded = load_checked(u, cfg["min_duration"], cfg["max_duration"], cfg["min_sample_rate"])
        if isinstance(loaded, str):
            skipped.append((u.utt, loaded))
            continue
        batch.append((u, *loaded))
        if len(batch) >= max(1, cfg["onnx_batch_size"]):
            flush()
    flush()
    return shard_id, ok, skipped


def _write_one_shard(args: tuple[int, str, list[dict]]) -> tuple[int, list[dict], list[tuple[str, str]]]:
    """Stage 2: read each row's original file bytes and write the shard + its two json maps."""
    shard_id, shard_path, rows = args
    out_rows, index, skipped = [], [], []
    for r in rows:
        try:
            data = Path(r["wav"]).read_bytes()
        except OSError as ex:
            skipped.append((r["utt"], f"audio unreadable while writing ({type(ex).__name__})"))
            continue
        row = {k: r[k] for k in S.SHARD_COLUMNS if k != "audio_data"}
        row["audio_data"] = data
        row["num_samples"], row["sample_rate"] = r["num_samples"], r["sample_rate"]  # the index's fact columns
        if r.get("instruct") is not None:
            row["instruct"] = r["instruct"]
        out_rows.append(row)
        index.append(S.index_record(row, shard_path, r["duration_s"], r["sample_rate"]))
    S.write_shard(shard_path, out_rows)
    S.write_shard_jsons(Path(shard_path).parent, shard_id, shard_path, out_rows)
    return shard_id, index, skipped


class _Runner:
    """Maps stage functions over tasks: inline for one worker, else one spawn pool kept for all stages.

    Spawn, not fork: forking after torch/onnxruntime started their thread pools can deadlock, and one
    pool for every stage pays the interpreter + torch start-up once per worker, not once per stage.
    """

    def __init__(self, num_workers: int, progress: bool):
        self.num_workers = max(1, num_workers)
        self.progress = progress
        self._pool = None

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] else self._pool.close()
            self._pool.join()

    def map(self, fn: Callable, tasks: Sequence, desc: str, weight: Callable[[Any], int]) -> Iterator:
        from tqdm import tqdm

        bar = tqdm(total=sum(weight(t) for t in tasks), desc=desc, unit="utt", disable=not self.progress,
                   file=sys.stderr, leave=False)
        try:
            if self.num_workers == 1 or len(tasks) <= 1:
                with _torch_threads(1):
                    for t in tasks:
                        res = fn(t)
                        bar.update(weight(t))
                        yield res
            else:
                if self._pool is None:
                    self._pool = mp.get_context("spawn").Pool(self.num_workers, initializer=_init_worker)
                for res, t in zip(self._pool.imap(fn, tasks), tasks):
                    bar.update(weight(t))
                    yield res
        finally:
            bar.close()


# ------------------------------------------------------------------------------------- helpers


def _file_digest(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _frontend_id(spec: str) -> str:
    return f"{Path(spec).name}:{_file_digest(spec)}"


def _shard_fingerprint(utts: list[Utterance], frontends: str, cfg: PrepareConfig) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([frontends, cfg.min_duration, cfg.max_duration, cfg.min_sample_rate, CHECKS_VERSION],
                        sort_keys=True).encode())
    for u in utts:
        h.update(json.dumps([u.utt, u.wav, u.text, u.spk, u.instruct]).encode())
    return h.hexdigest()


def _entry_path(des: Path, shard_path: str) -> Path:
    return des / ".prepare" / f"{Path(shard_path).name}.json"


def _load_entry(des: Path, shard_path: str) -> dict | None:
    path = _entry_path(des, shard_path)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and "fingerprint" in entry else None


def _write_manifest(des: Path, completed: dict[str, str]) -> None:
    S.atomic_write_text(des / MANIFEST, json.dumps({"version": 1, "completed": completed}, indent=1))


def _fit_builtins(cfg: PrepareConfig, utts: list[Utterance], des: Path, need_tok: bool, need_emb: bool,
                  runner: _Runner) -> None:
    """Stage 0: fit whichever built-in front-ends are missing and save them next to the shards."""
    import torch

    from cosytrain.data.speaker_embedding import BuiltinSpeakerEmbedding
    from cosytrain.data.speech_tokenizer import BuiltinSpeechTokenizer

    per_utt = max(8, cfg.max_fit_frames // max(len(utts), 1))
    n_chunks = max(1, min(len(utts), cfg.num_workers * 4))
    size = math.ceil(len(utts) / n_chunks)
    c = asdict(cfg)
    tasks = [(utts[i:i + size], c, per_utt, need_tok, need_emb) for i in range(0, len(utts), size)]
    frames, labels, stats = [], [], []
    for f, y, s, _ in runner.map(_scan_for_fit, tasks, "fit front-ends", lambda t: len(t[0])):
        frames += f
        labels += y
        stats += s
    nothing = "no usable audio to fit the built-in {} on: every row failed validation (paths, text, durations)"
    if need_tok:
        if not frames:
            raise ValueError(nothing.format("speech tokenizer"))
        x = torch.from_numpy(np.concatenate(frames))
        if labels:  # an alignment's tokens: the nearest-class-mean tokenizer for new audio (zero-shot prompts)
            size = _alignment(cfg.speech_tokenizer, cfg.token_rate).codebook_size
            tok = BuiltinSpeechTokenizer.fit_labelled(x, torch.from_numpy(np.concatenate(labels)), cfg.token_rate,
                                                      size)
        else:
            if x.shape[0] > cfg.max_fit_frames:
                g = torch.Generator().manual_seed(cfg.seed)
                x = x[torch.randperm(x.shape[0], generator=g)[:cfg.max_fit_frames]]
            with _torch_threads(1):  # the same centroids whatever --num_workers is
                tok = BuiltinSpeechTokenizer.fit(x, cfg.token_rate, cfg.codebook_size, seed=cfg.seed)
        tok.save(des / BUILTIN_TOKENIZER_FILE)
        if labels:
            S.atomic_write_text(des / FITTED_FROM_FILE, file_sha256(cfg.speech_tokenizer) + "\n")
    if need_emb:
        if not stats:
            raise ValueError(nothing.format("speaker embedding"))
        BuiltinSpeakerEmbedding.fit(torch.from_numpy(np.stack(stats)), seed=cfg.seed).save(des / BUILTIN_EMBEDDING_FILE)


def _resolve_frontends(cfg: PrepareConfig, utts: list[Utterance], des: Path, runner: _Runner) -> tuple[str, str]:
    """Paths of the tokenizer and embedding files to use, fitting the built-in ones when asked."""
    from cosytrain.data.speech_tokenizer import BuiltinSpeechTokenizer

    tok_spec, emb_spec = cfg.speech_tokenizer, cfg.campplus
    for spec, what in ((tok_spec, "--speech_tokenizer"), (emb_spec, "--campplus")):
        if spec != "builtin" and not Path(spec).is_file():
            raise FileNotFoundError(f"{what} {spec} not found; pass an existing file or 'builtin'")
    need_tok = need_emb = False
    if tok_spec == "builtin":
        tok_spec = str(des / BUILTIN_TOKENIZER_FILE)
        need_tok = True
        if Path(tok_spec).is_file():  # a resumed run reuses its fit when the settings still match
            try:
                old = BuiltinSpeechTokenizer.load(tok_spec)
                need_tok = not (old.token_rate == cfg.token_rate and old.codebook_size == cfg.codebook_size)
            except (ValueError, OSError):
                need_tok = True
    elif tok_spec.endswith(".ctm"):
        # the training tokens come from the alignment; beside them, a tokenizer for new audio that gives its ids
        # (zero-shot prompts of an exported model), refitted when the rate or the alignment's bytes change (a
        # digest, not the file times: a copied or checked-out CTM can be older than the fit and still differ)
        fitted = des / BUILTIN_TOKENIZER_FILE
        try:
            old = BuiltinSpeechTokenizer.load(fitted)
            fitted_from = (des / FITTED_FROM_FILE).read_text().strip()
            need_tok = old.token_rate != cfg.token_rate or fitted_from != file_sha256(tok_spec)
        except (ValueError, OSError):
            need_tok = True
    if emb_spec == "builtin":
        emb_spec = str(des / BUILTIN_EMBEDDING_FILE)
        need_emb = not Path(emb_spec).is_file()
    if need_tok or need_emb:
        _fit_builtins(cfg, utts, des, need_tok, need_emb, runner)
    return tok_spec, emb_spec


# ----------------------------------------------------------------------------------------- main


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Run the whole preparation; raises ``SourceError``/``FileNotFoundError`` with one-line messages."""
    with _Runner(cfg.num_workers, cfg.progress) as runner:
        return _prepare(cfg, runner)


def _prepare(cfg: PrepareConfig, runner: _Runner) -> PrepareResult:
    import torch

    t0 = time.time()
    corpus = read_corpus(cfg.src_dir, cfg.fmt, cfg.speaker, cfg.encoding)
    utts = corpus.utts
    if not utts:
        first = f"; the first of {len(corpus.skipped)} skipped rows: {corpus.skipped[0][0]}: {corpus.skipped[0][1]}" \
            if corpus.skipped else ""
        raise SourceError(f"no usable utterances listed in {cfg.src_dir}{first}")
    des = Path(cfg.des_dir).resolve()
    des.mkdir(parents=True, exist_ok=True)

    # Duplicate ids would make two rows with the same key; keep the first, report the rest.
    seen: set[str] = set()
    dup_skips: list[tuple[str, str]] = []
    unique: list[Utterance] = []
    for u in utts:
        if u.utt in seen:
            dup_skips.append((u.utt, "duplicate utterance id"))
        else:
            seen.add(u.utt)
            unique.append(u)
    utts = unique

    tok_spec, emb_spec = _resolve_frontends(cfg, utts, des, runner)
    frontends = f"{_frontend_id(tok_spec)}|{_frontend_id(emb_spec)}"
    if tok_spec.endswith(".ctm"):  # one alignment gives other tokens at another rate
        frontends += f"|{cfg.token_rate}Hz"

    n = max(1, cfg.num_utts_per_parquet)
    groups = [utts[j:j + n] for j in range(0, len(utts), n)]
    shard_paths = [str(des / S.shard_name(i)) for i in range(len(groups))]
    fingerprints = [_shard_fingerprint(g, frontends, cfg) for g in groups]

    done: dict[int, dict] = {}
    for i, (path, fp) in enumerate(zip(shard_paths, fingerprints)):
        entry = _load_entry(des, path)
        if entry and entry["fingerprint"] == fp and S.check_shard(path) is None:
            done[i] = entry
    pending = [i for i in range(len(groups)) if i not in done]
    entries: dict[int, dict] = dict(done)
    completed = {Path(shard_paths[i]).name: e["fingerprint"] for i, e in sorted(done.items())}
    _write_manifest(des, completed)

    # Stage 1: tokens and utterance embeddings for the pending shards.
    c = asdict(cfg)
    specs = (tok_spec, emb_spec, cfg.onnx_batch_size, cfg.speech_tokenizer_device, cfg.token_rate)
    analysed: dict[int, tuple[list[dict], list[tuple[str, str]]]] = {}
    tasks1 = [(i, groups[i], c, specs) for i in pending]
    for i, ok, skipped in runner.map(_analyse_shard, tasks1, "tokens+embeddings", lambda t: len(t[1])):
        analysed[i] = (ok, skipped)

    # Speaker means over every utterance, those in reused shards included.
    utt2emb: dict[str, list[float]] = {}
    utt2tok: dict[str, list[int]] = {}
    for i in sorted(done):
        for row in S.read_shard_rows(shard_paths[i], columns=["utt", "utt_embedding", "speech_token"]):
            utt2emb[row["utt"]] = row["utt_embedding"]
            utt2tok[row["utt"]] = row["speech_token"]
    for ok, _ in analysed.values():
        for r in ok:
            utt2emb[r["utt"]] = r["utt_embedding"]
            utt2tok[r["utt"]] = r["speech_token"]
    by_utt = {u.utt: u for u in utts}
    spk2embs: dict[str, list[list[float]]] = {}
    for utt, e in utt2emb.items():
        spk2embs.setdefault(by_utt[utt].spk, []).append(e)
    spk2embedding = {s: torch.tensor(v, dtype=torch.float64).mean(0).tolist() for s, v in spk2embs.items()}

    # Stage 2: write pending shards, recording each in the manifest as soon as it is on disk.
    tasks2 = []
    for i in pending:
        ok, _ = analysed[i]
        rows = []
        for r in ok:
            u = by_utt[r["utt"]]
            rows.append({**r, "wav": u.wav, "text": u.text, "spk": u.spk, "instruct": u.instruct,
                         "spk_embedding": spk2embedding[u.spk]})
        tasks2.append((i, shard_paths[i], rows))
    for i, index, write_skips in runner.map(_write_one_shard, tasks2, "write shards", lambda t: len(t[2])):
        written_now = {rec["utt"] for rec in index}
        entries[i] = {"fingerprint": fingerprints[i], "rows": len(index),
                      "skipped": [list(s) for s in analysed[i][1] + write_skips], "index": index,
                      "flagged": [[r["utt"], n] for r in analysed[i][0] if r["utt"] in written_now for n in r["notes"]]}
        S.atomic_write_text(_entry_path(des, shard_paths[i]), json.dumps(entries[i], ensure_ascii=False))
        completed[Path(shard_paths[i]).name] = fingerprints[i]
        _write_manifest(des, completed)

    # Lists, index, skipped report and upstream's side files.
    ordered = [entries[i] for i in range(len(shard_paths))]
    S.write_lists(des, shard_paths, list(range(len(shard_paths))))
    S.write_index(des / S.INDEX_NAME, [rec for e in ordered for rec in e["index"]])
    skipped = corpus.skipped + dup_skips + [tuple(s) for e in ordered for s in e["skipped"]]
    flagged = [tuple(f) for e in ordered for f in e.get("flagged", [])]
    S.atomic_write_text(des / SKIPPED, "utt\treason\n" + "".join(f"{_tsv(u)}\t{_tsv(r)}\n" for u, r in skipped))
    S.atomic_write_text(des / FLAGGED, "utt\tnote\n" + "".join(f"{_tsv(u)}\t{_tsv(n)}\n" for u, n in flagged))
    written = {rec["utt"] for e in ordered for rec in e["index"]}
    for name, obj in (("spk2embedding.pt", spk2embedding),
                      ("utt2embedding.pt", {u: e for u, e in utt2emb.items() if u in written}),
                      ("utt2speech_token.pt", {u: t for u, t in utt2tok.items() if u in written})):
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        S.atomic_write_bytes(des / name, buf.getvalue())
    return PrepareResult(des_dir=des, data_list=des / S.DATA_LIST, shards=shard_paths,
                         num_rows=sum(e["rows"] for e in ordered), skipped=list(skipped),
                         reused_shards=len(done), seconds=time.time() - t0, flagged=flagged)


def _tsv(value: str) -> str:
    """One TSV field: tabs and line breaks of ids/reasons (from hand-made files) would break the table."""
    return " ".join(str(value).split())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cosytrain prepare",
        description="Turn a Kaldi-style (wav.scp, text, utt2spk[, instruct]) or LJSpeech-style "
                    "(metadata.csv, wavs/) folder into upstream CosyVoice parquet shards + data.list.")
    p.add_argument("--src_dir", "--input", required=True, help="corpus folder")
    p.add_argument("--des_dir", "--output", required=True, help="output folder for shards and lists")
    p.add_argument("--format", dest="fmt", default="auto", choices=["auto", "kaldi", "ljspeech"])
    p.add_argument("--speaker", default=None, help="speaker id for an LJSpeech-style folder (default: folder name)")
    p.add_argument("--num_workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--num_utts_per_parquet", type=int, default=1000)
    p.add_argument("--speech_tokenizer", default="builtin",
                   help="upstream speech_tokenizer_v1.onnx / v2.onnx / v3.onnx, a fitted built-in .npz, "
                        "'builtin' (a k-means stand-in fitted on this corpus), or a phone alignment .ctm "
                        "(tokens = phone and half of it per frame, as the demo corpus does)")
    p.add_argument("--campplus", default="builtin",
                   help="upstream campplus.onnx, a fitted built-in .npz, or 'builtin' (a stand-in)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token_rate", type=int, choices=[50, 25], default=None,
                   help="built-in tokenizer or alignment rate: 50 Hz (CosyVoice 1) or 25 Hz (CosyVoice 2/3)")
    g.add_argument("--generation", choices=sorted(GENERATION_TOKEN_RATE), default=None,
                   help="shorthand for --token_rate: v1=50, v2/v3=25")
    p.add_argument("--codebook_size", type=int, default=256, help="built-in tokenizer codebook size")
    p.add_argument("--min_duration", type=float, default=0.3, help="seconds; shorter rows are skipped")
    p.add_argument("--max_duration", type=float, default=60.0, help="seconds; longer rows are skipped")
    p.add_argument("--min_sample_rate", type=int, default=16000,
                   help="Hz; audio below it is skipped (upstream training drops it too)")
    p.add_argument("--encoding", default="utf-8",
                   help="encoding of the corpus' text files, e.g. gbk or latin-1 (default utf-8; UTF-16 files with a"
                        " byte-order mark are detected); lines not valid in it are skipped and reported")
    p.add_argument("--onnx_batch_size", type=int, default=8,
                   help="utterances per tokenizer/embedding batch (padding does not change the tokens)")
    p.add_argument("--speech_tokenizer_device", default=None,
                   help="run the speech tokenizer as s3tokenizer's PyTorch model on this device (e.g. cuda) "
                        "to tokenize a big corpus on a GPU; needs `pip install s3tokenizer`. Default: "
                        "onnxruntime (its CUDA provider when onnxruntime-gpu is installed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    rate = a.token_rate or GENERATION_TOKEN_RATE.get(a.generation or "v1", 50)
    cfg = PrepareConfig(src_dir=a.src_dir, des_dir=a.des_dir, fmt=a.fmt, speaker=a.speaker,
                        num_workers=a.num_workers, num_utts_per_parquet=a.num_utts_per_parquet,
                        speech_tokenizer=a.speech_tokenizer, campplus=a.campplus, token_rate=rate,
                        codebook_size=a.codebook_size, min_duration=a.min_duration,
                        max_duration=a.max_duration, min_sample_rate=a.min_sample_rate, encoding=a.encoding,
                        onnx_batch_size=a.onnx_batch_size, seed=a.seed,
                        speech_tokenizer_device=a.speech_tokenizer_device,
                        progress=not a.no_progress)
    try:
        result = prepare(cfg)
    except (SourceError, FileNotFoundError, ValueError) as ex:
        print(f"prepare: {ex}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0
