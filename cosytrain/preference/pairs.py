"""``python -m cosytrain dpo-pairs``: preference pairs for DPO from a model and a prepared corpus.

For every utterance of the corpus (a ``data.list`` of prepared shards) the model directory's LLM
samples ``--num_candidates`` speech-token sequences (each from its own seed, so a run is
reproducible), the scorers rate them (:mod:`cosytrain.preference.scorers`: speaker similarity of
their synthesis to the recording, WER of their synthesis through an offline ASR, closeness of their
length to the recording's; weighted sum), and
the best becomes ``speech_token`` (chosen) and the worst ``reject_speech_token`` (rejected) of a copy
of the row - upstream's DPO columns, so the shards train with ``DPOTask`` here and with upstream's
``--dpo``. ``--chosen recording`` keeps the recording's own tokens as chosen instead.

An utterance is left out (and counted) when fewer than two candidates have tokens, or when the best
and worst scores are closer than ``--min_margin`` (a pair the scorers cannot tell apart teaches
nothing - "rejected" should be worse, not merely whatever the model produced). ``pairs.jsonl``
lists every utterance's candidates, scores and choice. The output folder is written whole or not at
all (built beside and renamed into place), with ``data.list`` and upstream's ``utt2parquet``/``spk2parquet``
files, and the corpus' ``spk2embedding.pt`` and built-in front-end files copied along.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from cosytrain.preference.scorers import SAMPLE_RATE_16K, Candidate, Scorer, Utterance, build_scorers, \
    parse_scorer_specs

__all__ = ["PairOptions", "make_pairs", "main"]

_COPIED = ("spk2embedding.pt", "utt2embedding.pt", "speech_tokenizer_builtin.npz", "campplus_builtin.npz")


@dataclass
class PairOptions:
    num_candidates: int = 4
    seed: int = 1986
    chosen: str = "best"  # or "recording"
    min_margin: float = 0.0
    max_utts: Optional[int] = None
    min_token_text_ratio: float = 2.0
    max_token_text_ratio: float = 20.0
    sampling: int = 25
    embedding: str = "utt"  # which row embedding conditions the llm (v1) and the flow: utt or spk
    rows_per_shard: int = 1000


def _seed_everything(*key: Any) -> None:
    seed = int(hashlib.sha256(":".join(map(str, key)).encode()).hexdigest()[:15], 16)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _to_16k(wav: torch.Tensor, sample_rate: int) -> np.ndarray:
    import torchaudio.functional as AF

    wav = wav.detach().float().cpu().reshape(-1)
    if sample_rate != SAMPLE_RATE_16K:
        wav = AF.resample(wav, int(sample_rate), SAMPLE_RATE_16K)
    return wav.numpy()


class _Model:
    """The model directory's llm (and flow + vocoder when a scorer needs audio)."""

    def __init__(self, model_dir: Path, audio: bool, device: str) -> None:
        from cosytrain.inference import model as engines
        from cosytrain.modeldir import load_model_dir

        self.device = torch.device(device)
        parts_wanted = ["llm", "flow", "hift"] if audio else ["llm"]
        self.directory, parts = load_model_dir(model_dir, parts_wanted, device=self.device)
        self.llm = parts["llm"]
        self.engine = None
        if audio:
            cls = {"v1": engines.CosyVoiceModel, "v2": engines.CosyVoice2Model,
                   "v3": engines.CosyVoice3Model}[self.directory.generation]
            self.engine = cls(parts["llm"], parts["flow"], parts["hift"], device=self.device)

    def sample(self, text: list[int], embedding: torch.Tensor, instruct: Optional[list[int]],
               opts: PairOptions) -> list[int]:
        d = self.device
        empty = torch.zeros(1, 0, dtype=torch.int32, device=d)
        kwargs: dict[str, Any] = {}
        if instruct and self.directory.generation == "v3":
            kwargs["instruct_token"] = torch.tensor([instruct], dtype=torch.int32, device=d)
        with torch.inference_mode():
            tokens = self.llm.inference(
                text=torch.tensor([text], dtype=torch.int32, device=d),
                text_len=torch.tensor([len(text)], dtype=torch.int32, device=d),
                prompt_text=empty, prompt_text_len=torch.zeros(1, dtype=torch.int32, device=d),
                prompt_speech_token=empty, prompt_speech_token_len=torch.zeros(1, dtype=torch.int32, device=d),
                embedding=embedding.to(d), sampling=opts.sampling, max_token_text_ratio=opts.max_token_text_ratio,
                min_token_text_ratio=opts.min_token_text_ratio, **kwargs)
            return [int(t) for t in tokens]

    def synthesize_16k(self, tokens: list[int], embedding: torch.Tensor) -> np.ndarray:
        assert self.engine is not None
        chunks = [out["tts_speech"] for out in self.engine.tts(
            source_speech_token=torch.tensor([tokens], dtype=torch.int32), flow_embedding=embedding)]
        return _to_16k(torch.cat(chunks, dim=1), self.engine.sample_rate)


def _text_tokenizer(model_dir: Path, generation: str, kind: Optional[str], path: Optional[str]) -> Any:
    from cosytrain.data.text_tokenizer import build_text_tokenizer
    from cosytrain.inference.frontend import text_tokenizer_spec

    if kind is None:
        kind, path = text_tokenizer_spec(model_dir, generation)
    return build_text_tokenizer(kind, path)


def _total(candidate: Candidate, weights: dict[str, float]) -> float:
    return sum(weights[name] * value for name, value in candidate.scores.items())


def _pair(row: dict[str, Any], model: _Model, tokenizer: Any, scorers: list[tuple[Scorer, float]],
          opts: PairOptions) -> tuple[Optional[dict[str, Any]], dict[str, Any]]:
    """(the preference row or None, this utterance's report line)."""
    from cosytrain.data.pipeline import SkipSample, decode_wav

    utt = str(row.get("utt"))
    report: dict[str, Any] = {"utt": utt}
    text = tokenizer.encode(row.get("text") or "")
    instruct = tokenizer.encode(row["instruct"]) if isinstance(row.get("instruct"), str) and row["instruct"] else None
    embedding = torch.tensor(row.get(f"{opts.embedding}_embedding") or [], dtype=torch.float32).reshape(1, -1)
    if not text or embedding.shape[1] == 0:
        return None, {**report, "skipped": "no text or no embedding"}
    candidates = []
    for k in range(opts.num_candidates):
        _seed_everything(opts.seed, utt, k)
        candidates.append(Candidate(model.sample(text, embedding, instruct, opts)))
    if opts.chosen == "recording":
        candidates.append(Candidate([int(t) for t in row.get("speech_token") or []]))
    report["lengths"] = [len(c.tokens) for c in candidates]
    usable = [c for c in candidates if c.tokens]
    if len(usable) < 2:
        return None, {**report, "skipped": "fewer than two candidates with tokens"}
    reference = Utterance(utt, str(row.get("text")), [int(t) for t in row.get("speech_token") or []])
    if any(s.needs_audio for s, _ in scorers):
        try:
            wav, sr = decode_wav(row.get("audio_data"))
        except SkipSample as exc:
            return None, {**report, "skipped": f"recording: {exc.reason}"}
        reference.wav16k = _to_16k(wav, sr)
        for c in usable:
            c.wav16k = model.synthesize_16k(c.tokens, embedding)
    weights = {s.name: w for s, w in scorers}
    for scorer, _ in scorers:
        for c, value in zip(usable, scorer.score(reference, usable)):
            c.scores[scorer.name] = float(value)
    totals = [_total(c, weights) for c in usable]
    report["scores"] = [{**c.scores, "total": t} for c, t in zip(usable, totals)]
    if opts.chosen == "recording":
        chosen = candidates[-1]
        if not chosen.tokens:
            return None, {**report, "skipped": "the recording has no speech tokens"}
        pool = [c for c in usable if c is not chosen]
    else:
        chosen, pool = usable[int(np.argmax(totals))], usable
    pool_totals = [_total(c, weights) for c in pool]
    rejected = pool[int(np.argmin(pool_totals))]
    margin = _total(chosen, weights) - _total(rejected, weights)
    report.update(chosen=usable.index(chosen), rejected=usable.index(rejected), margin=margin)
    if rejected.tokens == chosen.tokens or margin <= 0 or margin < opts.min_margin:
        return None, {**report, "skipped": f"margin {margin:.4g} below --min_margin {opts.min_margin:g} (or a tie)"}
    return {**row, "speech_token": list(chosen.tokens), "reject_speech_token": list(rejected.tokens)}, report


def _write_shards(tmp: Path, final: Path, rows: list[dict[str, Any]], rows_per_shard: int) -> int:
    from cosytrain.data.shards import (DATA_LIST, SPK2DATA_LIST, UTT2DATA_LIST, atomic_write_text, shard_name,
                                       spk2parquet_name, utt2parquet_name, write_shard, write_shard_jsons)

    paths = []
    for i in range(0, len(rows), rows_per_shard):
        chunk, index = rows[i:i + rows_per_shard], i // rows_per_shard
        write_shard(tmp / shard_name(index), chunk)
        write_shard_jsons(tmp, index, str(final / shard_name(index)), chunk)
        paths.append(index)
    atomic_write_text(tmp / DATA_LIST, "".join(f"{final / shard_name(i)}\n" for i in paths))
    atomic_write_text(tmp / UTT2DATA_LIST, "".join(f"{final / utt2parquet_name(i)}\n" for i in paths))
    atomic_write_text(tmp / SPK2DATA_LIST, "".join(f"{final / spk2parquet_name(i)}\n" for i in paths))
    return len(paths)


def make_pairs(model_dir: str | Path, data_list: str | Path, output: str | Path, scorer_specs: Sequence[str],
               opts: PairOptions = PairOptions(), device: str = "cpu", text_tokenizer: Optional[str] = None,
               text_tokenizer_path: Optional[str] = None, overwrite: bool = False, speaker_encoder: str = "auto",
               asr: Optional[str] = None) -> dict[str, Any]:
    """Write the preference shards of ``data_list`` to ``output``; returns the summary (also in ``pairs.json``)."""
    from cosytrain.data.shards import ReadStats, iter_rows, read_data_list
    from cosytrain.utils.atomic import atomic_directory

    if opts.num_candidates < 2 and opts.chosen != "recording":
        raise ValueError("--num_candidates must be at least 2 (or 1 with --chosen recording)")
    if opts.chosen not in ("best", "recording") or opts.embedding not in ("utt", "spk"):
        raise ValueError("--chosen is best or recording; --embedding is utt or spk")
    model_dir, output = Path(model_dir), Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: already exists; pass --overwrite to replace it")
    read_data_list(data_list)  # a missing list is one line before any model loads
    scorers = build_scorers(parse_scorer_specs(scorer_specs), model_dir, speaker_encoder, asr, device)
    model = _Model(model_dir, any(s.needs_audio for s, _ in scorers), device)
    tokenizer = _text_tokenizer(model_dir, model.directory.generation, text_tokenizer, text_tokenizer_path)
    rows, reports, skipped, stats = [], [], Counter(), ReadStats()
    for n, row in enumerate(iter_rows(data_list, stats=stats)):
        if opts.max_utts is not None and n >= opts.max_utts:
            break
        pair, report = _pair(row, model, tokenizer, scorers, opts)
        reports.append(report)
        if pair is None:
            skipped[report["skipped"].split(":")[0].split(" (")[0]] += 1
        else:
            rows.append(pair)
    if not rows:
        raise ValueError(f"dpo-pairs: no utterance of {data_list} gave a pair ({dict(skipped)}); more candidates,"
                         " another scorer or a lower --min_margin")
    summary = {"model_dir": str(model_dir.resolve()), "data": str(Path(data_list).resolve()),
               "scorers": [f"{s.name}:{w:g}" for s, w in scorers], "options": opts.__dict__,
               "utterances": len(reports), "pairs": len(rows), "skipped": dict(skipped),
               "corrupt_shards": [path for path, _ in stats.bad]}

    def fill(tmp: Path) -> None:
        summary["shards"] = _write_shards(tmp, output.resolve(), rows, opts.rows_per_shard)
        for name in _COPIED:
            source = Path(data_list).parent / name
            if source.is_file():
                shutil.copyfile(source, tmp / name)
        (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports), encoding="utf-8")
        (tmp / "pairs.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    atomic_directory(output, fill, overwrite=overwrite)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cosytrain dpo-pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True, help="the model whose samples are scored (exported directory)")
    p.add_argument("--data", required=True, help="data.list of prepared shards (text, audio, tokens, embeddings)")
    p.add_argument("-o", "--output", required=True, help="folder for the preference shards and data.list")
    p.add_argument("--scorer", action="append", metavar="NAME[:WEIGHT]",
                   help="speaker, wer, length (repeatable; weighted sum); default: speaker and length")
    p.add_argument("--speaker_encoder", default="auto",
                   help="speaker scorer's encoder: auto (the model's campplus.onnx, else resemblyzer), campplus,"
                        " resemblyzer, builtin (the model's campplus_builtin.npz) or a campplus .onnx path")
    p.add_argument("--asr", help="wer scorer's offline ASR backend, kind:path (transformers, whisper, faster-whisper,"
                                 " funasr)")
    defaults = PairOptions()
    for name in ("num_candidates", "seed", "min_margin", "max_utts", "min_token_text_ratio", "max_token_text_ratio",
                 "sampling", "rows_per_shard"):
        value = getattr(defaults, name)
        p.add_argument(f"--{name}", type=float if isinstance(value, float) else int, default=value)
    p.add_argument("--chosen", choices=("best", "recording"), default="best",
                   help="chosen = the best candidate, or the recording's own tokens (rejected: the worst candidate)")
    p.add_argument("--embedding", choices=("utt", "spk"), default="utt",
                   help="the row embedding given to the llm (v1) and the flow; as the training data's use_spk_embedding")
    p.add_argument("--text_tokenizer", help="override the model directory's text tokenizer (byte, whisper, qwen, qwen3)")
    p.add_argument("--text_tokenizer_path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from cosytrain.data.pipeline import DataError
    from cosytrain.modeldir import ModelDirError

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    opts = PairOptions(**{k: getattr(args, k) for k in PairOptions.__dataclass_fields__})
    try:
        summary = make_pairs(args.model_dir, args.data, args.output, args.scorer or ["speaker", "length"], opts,
                             args.device, args.text_tokenizer, args.text_tokenizer_path, args.overwrite,
                             args.speaker_encoder, args.asr)
    except (DataError, ModelDirError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"cosytrain dpo-pairs: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {summary['pairs']} preference pairs of {summary['utterances']} utterances to {args.output}"
          f" (skipped: {summary['skipped'] or 'none'})")
    return 0
