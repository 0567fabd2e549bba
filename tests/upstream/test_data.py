"""Data both ways: shards written by ``cosytrain prepare`` stream through upstream's own
``cosyvoice/dataset`` pipeline (``Dataset`` + the example config's processors: parquet_opener,
tokenize, filter, resample, compute_fbank, parse_embedding, shuffle, sort, batch, padding; and the
vocoder's ``data_pipeline_gan`` with compute_f0), in the oracle. (Upstream's shards through
cosytrain's readers are tested in tests/data/test_shards.py.)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from tests.conftest import reference_dir
from tests.upstream._oracle import Oracle

# the session fixtures train, export and run upstream before the first test: more than the suite's 900 s
# default on a busy 2-core machine
pytestmark = pytest.mark.timeout(1800)


# upstream example config per token rate, and its filter's bounds (10 ms frames)
CASES = {"v1_50hz": ("cosyvoice.yaml", (0, 40960)), "v2_25hz": ("cosyvoice2.yaml", (100, 6000))}


@pytest.fixture(scope="module")
def shards(demo_corpus: Any, data_25hz: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cosytrain.data.demo_corpus import demo_shard_dir

    # v1: the first shard of the full demo corpus (upstream's pipeline on all of its 2,248 utterances costs minutes)
    full = demo_shard_dir(demo_corpus[0], 50) / "data.list"
    first = tmp_path_factory.mktemp("v1_shard") / "data.list"
    first.write_text(full.read_text().splitlines()[0] + "\n")
    return {"v1_50hz": first, "v2_25hz": data_25hz}


def _rows(data_list: Path) -> dict[str, dict[str, Any]]:
    from cosytrain.data.shards import iter_rows

    out = {}
    for row in iter_rows(data_list, columns=["utt", "text", "speech_token", "audio_data", "utt_embedding"]):
        info = sf.info(io.BytesIO(row["audio_data"]))
        out[row["utt"]] = {"text": row["text"], "tokens": len(row["speech_token"]),
                           "frames_10ms": info.frames / info.samplerate * 100, "emb": len(row["utt_embedding"])}
    return out


@pytest.fixture(scope="module")
def upstream_reads(oracle: Oracle, shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``<case>-<tts|vocoder>`` -> what upstream's pipeline yielded, all in one oracle process."""
    tok = tmp_path_factory.mktemp("qwen_tok")
    cases = {f"{case}-{'vocoder' if gan else 'tts'}": {
        "data_list": str(shards[case]), "config": str(reference_dir() / "configs" / CASES[case][0]), "gan": gan,
        "tokenizer_dir": str(tok) if case != "v1_50hz" else ""} for case in CASES for gan in (False, True)}
    return oracle.run("read_shards", {"cases": cases})


@pytest.mark.parametrize("gan", [False, True], ids=["tts", "vocoder"])
@pytest.mark.parametrize("case", list(CASES))
def test_prepared_shards_stream_through_upstreams_dataset_processors(
        case: str, gan: bool, upstream_reads: dict[str, Any], shards: dict[str, Path]) -> None:
    _, (lo, hi) = CASES[case]
    result = upstream_reads[f"{case}-{'vocoder' if gan else 'tts'}"]
    ours = _rows(shards[case])
    kept = {u for u, r in ours.items() if lo <= r["frames_10ms"] <= hi}
    assert kept and set(result["utts"]) == kept, (sorted(result["utts"]), sorted(kept))
    assert {"speech_token", "speech_feat", "text_token", "embedding"} <= set(result["keys"])
    mel_per_token = 2 if case == "v2_25hz" else 22050 / 256 / 50  # upstream's mel frames per speech token
    for utt, got in result["utts"].items():
        assert got["text"] == ours[utt]["text"] and got["speech_token_len"] == ours[utt]["tokens"], utt
        assert got["text_token_len"] > 0 and got["feat_dim"] == 80 and got["finite"], (utt, got)
        assert got["embedding_dim"] == ours[utt]["emb"] == 192, utt
        if not gan:  # our tokens and upstream's mel describe the same duration (within one token)
            assert abs(got["speech_feat_len"] - mel_per_token * got["speech_token_len"]) <= 2, (utt, got)
        else:
            assert got["pitch_feat_len"] == got["speech_feat_len"] and got["speech_len"] > 0, (utt, got)


def test_a_shard_in_upstreams_layout_streams_page_by_page_like_arrow(oracle: Oracle, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard written as upstream's make_parquet_list.py writes it (pandas ``to_parquet`` in the oracle): its
    audio (one page, over the streaming threshold) read by cosytrain's page streamer, by the row reader and by
    the first-launch scan equals what Arrow reads."""
    import random

    import numpy as np
    import pyarrow.parquet as pq

    from cosytrain.data import shard_facts
    from cosytrain.data.index_build import read_shard_facts
    from cosytrain.data.parquet_pages import STREAM_MIN_BYTES, chunk_bytes, stream_values
    from cosytrain.data.row_reader import RowReader

    path = tmp_path / "parquet_000000000.tar"
    made = oracle.run("pandas_shard", {"path": str(path), "rows": 200, "seconds": 1.5, "sample_rate": 22050})
    pf = pq.ParquetFile(path)
    assert pf.metadata.num_row_groups == 1 and chunk_bytes(pf.metadata, 0, "audio_data") > STREAM_MIN_BYTES
    want = pf.read(columns=["utt", "audio_data"]).to_pydict()
    rows = sorted(random.Random(0).sample(range(200), 25)) + [199]
    got = {r: v for rs, v in stream_values(str(path), pf.metadata, 0, "audio_data", rows) for r in rs}
    assert got == {r: want["audio_data"][r] for r in rows}

    demand = (np.zeros(len(rows), np.int64), np.asarray(rows), np.arange(len(rows)))
    reader = RowReader([str(path)], [np.array([0])], np.array([200]), demand, budget=4 << 20)
    for pos, r in enumerate(rows):
        row = reader.get_batch([(0, r)], pos)[0]
        assert row["utt"] == want["utt"][r] and row["audio_data"] == want["audio_data"][r]
    assert reader.page_streams == reader.group_reads >= 1

    streamed: list[int] = []
    real = shard_facts.stream_values
    monkeypatch.setattr(shard_facts, "stream_values", lambda *a: streamed.append(a[2]) or real(*a))
    facts = read_shard_facts(str(path))
    assert facts.error is None and streamed == [0]
    assert facts.facts["num_samples"].tolist() == made["samples"] and set(facts.facts["sample_rate"]) == {22050}
