"""Collect every shard's facts and text-token lengths: cached, in parallel, shared by the ranks.

Cache (``cache_dir``, shared by every launch and every rank that can see it), per shard, keyed by
its absolute path, size and mtime (``shard_key``):

* ``<key>.facts.npz``: the ``FACT_DTYPE`` records, row-group sizes and the shard's error, if any;
* ``<key>.text-<tokenizer id>.npy``: text-token lengths for one tokenizer (its identity is a hash
  of its kind and vocabulary files, so a changed vocabulary never reuses stale lengths).

Work sharing, with no barrier anywhere: rank ``r`` of ``W`` walks its own shards first
(``s % W == r``), then everybody else's from the end backwards (the owners walk forwards, so
helpers meet them in the middle). Before indexing a shard it *claims* it by creating
``<key>.<tokenizer id>.claim`` with ``O_EXCL``; a shard already cached is loaded, one claimed by
someone else is left for later. At the end a rank waits only for shards other ranks are indexing
at that moment (one shard each at most per process), and takes over a claim whose owner died (same
host: its pid is gone; other host: the claim is older than ``STALE_CLAIM_S``). Nothing waits on a
collective, so nothing can hit a distributed timeout however big the corpus is, and a rank that
dies does not stall the others. Within a rank, ``workers`` spawned processes index shards in
parallel. Without a cache directory every rank indexes every shard itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from cosytrain.data.shard_facts import (FACT_COLUMNS, FACT_DTYPE, FACTS_VERSION, SCAN_COLUMNS, STORED_FIELDS,
                                        ShardFacts, has_fact_columns, scan_group_facts)

log = logging.getLogger(__name__)

STALE_CLAIM_S = 600.0
_POLL_S = 0.2


# ----------------------------------------------------------------------------------- identities


def shard_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{FACTS_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(raw.encode()).hexdigest()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                    "special_tokens_map.json", "tokenizer.model", "multilingual.tiktoken")


def tokenizer_identity(kind: str, path: Optional[str]) -> str:
    """A short id that changes whenever the tokenizer's output could: kind, revision in code, vocabulary files."""
    from cosytrain.data.text_tokenizer import OUTPUT_REVISIONS

    h = hashlib.sha1(f"text-tokenizer|{kind}{OUTPUT_REVISIONS.get(kind, '')}".encode())
    if path is not None:
        p = Path(path)
        files = [p] if p.is_file() else sorted(q for q in p.glob("*") if q.name in _TOKENIZER_FILES)
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    elif kind in ("whisper", "phoneme", "phone"):
        # a bundled vocabulary (whisper) or espeak-ng's rules and phoneme table: the package version names it
        with contextlib.suppress(Exception):  # not installed: the kind alone
            h.update(package_version("openai-whisper" if kind == "whisper" else "espeakng-loader").encode())
    return h.hexdigest()[:16]


def text_token_lengths(kind: str, path: Optional[str], texts: Sequence[str]) -> np.ndarray:
    """``len(tokenizer.encode(t))`` for every text (0 for an empty one), batched where the tokenizer can."""
    if kind == "byte":  # ByteTokenizer: one id per UTF-8 byte; no torch import in index workers
        return np.fromiter((len(t.encode("utf-8")) for t in texts), np.int32, len(texts))
    from cosytrain.data.text_tokenizer import build_text_tokenizer

    tok = build_text_tokenizer(kind, path)
    batched = getattr(tok, "encode_lengths", None)
    if batched is not None:
        out = np.asarray(batched(list(texts)), np.int32)
    else:
        out = np.fromiter((len(tok.encode(t)) for t in texts), np.int32, len(texts))
    out[[not t for t in texts]] = 0
    return out


# ------------------------------------------------------------------------------------ one shard


def read_shard_facts(path: str, batch_rows: int = 64) -> ShardFacts:
    """Facts of every row of ``path``: from the ``cosytrain_*`` columns when present, else by a scan.

    A shard that cannot be opened, lacks a required column or breaks mid-read is returned with its
    one-line ``error`` (the whole shard is skipped, as before).
    """
    import pyarrow.parquet as pq

    from cosytrain.data.shards import _one_line, check_shard

    reason = check_shard(path)
    if reason is not None:
        return ShardFacts.failed(reason)
    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        groups = np.asarray([pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)],
                            np.int64)
        if has_fact_columns(pf.schema_arrow):
            table = pf.read(columns=[*FACT_COLUMNS, "text"], use_threads=False)
            facts = np.zeros(table.num_rows, FACT_DTYPE)
            for name, col in zip(STORED_FIELDS, FACT_COLUMNS):
                facts[name] = table.column(col).to_numpy(zero_copy_only=False)
            texts = [t if isinstance(t, str) else "" for t in table.column("text").to_pylist()]
            facts["text_blank"] = [not t.strip() for t in texts]
            return ShardFacts(facts, texts, groups, None, from_columns=True)
        have = set(pf.schema_arrow.names)
        cols = [c for c in SCAN_COLUMNS if c in have]
        parts, texts = [], []
        for group in range(len(groups)):
            f, t = scan_group_facts(path, pf, group, cols, batch_rows)
            parts.append(f)
            texts += t
        facts = np.concatenate(parts) if parts else np.zeros(0, FACT_DTYPE)
        return ShardFacts(facts, texts, groups)
    except Exception as ex:  # noqa: BLE001 - a shard that breaks mid-read is skipped whole
        return ShardFacts.failed(_one_line(ex))


# ----------------------------------------------------------------------------------------- cache


@dataclass
class ShardEntry:
    """What the index needs of one shard (texts dropped once their lengths are known)."""

    facts: np.ndarray
    text_len: np.ndarray
    row_groups: np.ndarray
    error: Optional[str]


def _facts_file(cache: Path, key: str) -> Path:
    return cache / f"{key}.facts.npz"


def _text_file(cache: Path, key: str, tok_id: str) -> Path:
    return cache / f"{key}.text-{tok_id}.npy"


def _write_npy(path: Path, arr: np.ndarray) -> None:
    from cosytrain.utils.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _write_facts(path: Path, sf: ShardFacts) -> None:
    from cosytrain.utils.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        np.savez(f, facts=sf.facts, row_groups=sf.row_groups, error=np.array(sf.error or ""))


def load_cached(cache: Path, key: str, tok_id: str) -> Optional[ShardEntry]:
    """The cached entry, or None when a file is missing or unreadable (then it is rebuilt)."""
    try:
        with np.load(_facts_file(cache, key), allow_pickle=False) as z:
            facts, groups, error = z["facts"], z["row_groups"], str(z["error"])
        text_len = np.load(_text_file(cache, key, tok_id), allow_pickle=False)
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if facts.dtype != FACT_DTYPE or text_len.shape != facts.shape:
        return None
    return ShardEntry(facts, text_len, groups, error or None)


def index_one_shard(path: str, key: Optional[str], tok_kind: str, tok_path: Optional[str], tok_id: str,
                    cache_dir: Optional[str]) -> tuple[ShardEntry, float]:
    """Facts + text lengths of one shard (reusing cached facts for a new tokenizer); writes the cache.

    Runs in index worker processes; returns the entry and the seconds spent.
    """
    t0 = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None and key is not None else None
    sf: Optional[ShardFacts] = None
    if cache is not None:  # facts known from another tokenizer's run: only the texts are read again
        try:
            with np.load(_facts_file(cache, key), allow_pickle=False) as z:
                cached = ShardFacts(z["facts"], None, z["row_groups"], str(z["error"]) or None)
            if cached.facts.dtype == FACT_DTYPE:
                sf = cached
        except (OSError, ValueError, KeyError, EOFError):
            sf = None
    if sf is not None and sf.error is None:
        sf.texts = _read_texts(path)
        if sf.texts is None or len(sf.texts) != len(sf.facts):
            sf = None
    fresh = sf is None
    if sf is None:
        sf = read_shard_facts(path) if os.path.exists(path) else ShardFacts.failed(f"shard {path} not found")
    text_len = (text_token_lengths(tok_kind, tok_path, sf.texts or []) if sf.error is None
                else np.zeros(0, np.int32))
    if cache is not None and os.path.exists(path):
        try:
            if fresh:
                _write_facts(_facts_file(cache, key), sf)
            _write_npy(_text_file(cache, key, tok_id), text_len)
        except OSError as ex:
            log.warning("cannot cache the index of %s in %s (%s); continuing without the cache", path, cache, ex)
    return ShardEntry(sf.facts, text_len, sf.row_groups, sf.error), time.perf_counter() - t0


def _read_texts(path: str) -> Optional[list[str]]:
    import pyarrow.parquet as pq

    try:
        col = pq.ParquetFile(path).read(columns=["text"], use_threads=False).column("text").to_pylist()
    except Exception:  # noqa: BLE001 - the facts path rereads the shard and reports the error
        return None
    return [t if isinstance(t, str) else "" for t in col]


# ---------------------------------------------------------------------------------------- claims


def _claim_file(cache: Path, key: str, tok_id: str) -> Path:
    return cache / f"{key}.{tok_id}.claim"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the
    claimer; "" where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _try_claim(claim: Path) -> bool:
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid()) or '-'}\n")
    return True


def _claim_is_stale(claim: Path) -> bool:
    """A claim whose owner is gone: same host and its process (pid + start time) no longer runs, or
    another host and older than ``STALE_CLAIM_S``."""
    try:
        host, pid, started = (claim.read_text().split() + ["-"])[:3]
        age = time.time() - claim.stat().st_mtime
    except (OSError, ValueError):
        return not claim.exists()
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
        return started != "-" and _start_time(int(pid)) not in ("", started)
    return age > STALE_CLAIM_S


def _release(claim: Optional[Path]) -> None:
    if claim is not None:
        claim.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- build


@dataclass
class BuildStats:
    """What this rank did: shards it indexed itself, loaded from the cache, waited for, took over."""

    indexed: list[int] = field(default_factory=list)
    loaded: int = 0
    waited: int = 0
    taken_over: int = 0
    seconds: float = 0.0


def walk_order(n: int, rank: int, world_size: int) -> list[int]:
    """Own shards forwards, then the others backwards (see the module docstring)."""
    own = list(range(rank, n, world_size))
    mine = set(own)
    return own + [s for s in range(n - 1, -1, -1) if s not in mine]


def shard_keys(shards: Sequence[str]) -> list[Optional[str]]:
    """``shard_key`` of every shard; None for a missing one (indexed as an error locally, never cached)."""
    keys: list[Optional[str]] = []
    for p in shards:
        try:
            keys.append(shard_key(p))
        except OSError:
            keys.append(None)
    return keys


def collect_shards(shards: Sequence[str], tok_kind: str, tok_path: Optional[str], cache_dir: Optional[str],
                   rank: int = 0, world_size: int = 1, workers: int = 1, stats: Optional[BuildStats] = None,
                   keys: Optional[list[Optional[str]]] = None) -> Iterator[tuple[int, ShardEntry]]:
    """Yield ``(shard number, entry)`` once for every shard, in no particular order."""
    t0 = time.perf_counter()
    stats = stats if stats is not None else BuildStats()
    tok_id = tokenizer_identity(tok_kind, tok_path)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as ex:
            log.warning("index cache %s unusable (%s); every rank indexes every shard itself", cache, ex)
            cache = None
    keys = shard_keys(shards) if keys is None else keys
    order = walk_order(len(shards), rank, world_size) if cache is not None else list(range(len(shards)))
    if workers > 1:  # a pool pays process start-up: only worth it for more than a few shards to index
        todo = sum(1 for s, k in enumerate(keys) if cache is None or k is None
                   or not (_facts_file(cache, k).exists() and _text_file(cache, k, tok_id).exists()))
        if todo < max(4, 2 * workers):
            workers = 1
    pool: Optional[ProcessPoolExecutor] = None
    running: dict[Future, tuple[int, Optional[Path]]] = {}
    deferred: list[int] = []
    last_log = time.monotonic()

    def submit(s: int, claim: Optional[Path]) -> None:
        nonlocal pool
        args = (shards[s], keys[s], tok_kind, tok_path, tok_id, str(cache) if cache is not None else None)
        if workers <= 1:
            try:
                entry, _ = index_one_shard(*args)
            finally:
                _release(claim)
            stats.indexed.append(s)
            done.append((s, entry))
            return
        if pool is None:
            import multiprocessing as mp

            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        running[pool.submit(index_one_shard, *args)] = (s, claim)

    def from_cache(s: int) -> Optional[ShardEntry]:
        """The shard's finished index entry from the cache (counted as loaded), or None."""
        entry = load_cached(cache, keys[s], tok_id)
        if entry is not None:
            stats.loaded += 1
        return entry

    def drain(block: bool) -> None:
        if not running:
            return
        finished, _ = wait(list(running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for fut in finished:
            s, claim = running.pop(fut)
            try:
                entry, _ = fut.result()
            finally:
                _release(claim)
            stats.indexed.append(s)
            done.append((s, entry))

    done: list[tuple[int, ShardEntry]] = []
    try:
        for s in order:
            while len(running) >= 2 * workers:
                drain(block=True)
            drain(block=False)
            yield from done
            done.clear()
            if cache is None or keys[s] is None:
                submit(s, None)
                continue
            entry = from_cache(s)
            if entry is not None:
                yield s, entry
                continue
            claim = _claim_file(cache, keys[s], tok_id)
            if _try_claim(claim):
                entry = load_cached(cache, keys[s], tok_id)  # finished between our look and our claim
                if entry is not None:
                    _release(claim)
                    stats.loaded += 1
                    yield s, entry
                else:
                    submit(s, claim)
            else:
                deferred.append(s)
        yield from done
        done.clear()
        while running:
            drain(block=True)
            yield from done
            done.clear()
        # shards other ranks were indexing when we passed them: wait for their files, or take over
        if deferred:
            stats.waited = len(deferred)
        while deferred:
            still = []
            for s in deferred:
                assert cache is not None and keys[s] is not None
                entry = from_cache(s)
                if entry is not None:
                    yield s, entry
                    continue
                claim = _claim_file(cache, keys[s], tok_id)
                held = claim.exists()
                if not held or _claim_is_stale(claim):
                    if held:
                        claim.unlink(missing_ok=True)
                    if _try_claim(claim):
                        entry = load_cached(cache, keys[s], tok_id)
                        if entry is None:
                            stats.taken_over += int(held)
                            try:
                                entry, _ = index_one_shard(shards[s], keys[s], tok_kind, tok_path, tok_id, str(cache))
                            finally:
                                _release(claim)
                            stats.indexed.append(s)
                        else:
                            _release(claim)
                            stats.loaded += 1
                        yield s, entry
                        continue
                still.append(s)
            deferred = still
            if deferred:
                if time.monotonic() - last_log > 30:
                    log.info("index: rank %d waits for %d shard(s) other ranks are indexing", rank, len(deferred))
                    last_log = time.monotonic()
                time.sleep(_POLL_S)
    finally:
        for fut, (_, claim) in list(running.items()):
            fut.cancel()
            _release(claim)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        stats.seconds = time.perf_counter() - t0
