"""Processor stages: bad rows skipped and counted, batching, padding keys, features match features.py.

The helpers at the top build tiny parquet shards with pyarrow + soundfile (the shard schema of
``cosytrain/data/shards.py``) and are shared by the dataset and datamodule tests.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from cosytrain.data import pipeline as P
from cosytrain.data.pipeline import FeatureConfig, FilterConfig
from cosytrain.data.text_tokenizer import ByteTokenizer

SR = 22050


def wav_bytes(seconds: float, sr: int = SR, freq: float = 220.0, subtype: str = "PCM_16",
              samples: Optional[np.ndarray] = None, channels: int = 1) -> bytes:
    if samples is None:
        t = np.arange(int(seconds * sr)) / sr
        samples = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels > 1:
        samples = np.stack([samples] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def make_row(utt: str, seconds: float = 0.5, sr: int = SR, text: str = "hello world", n_tokens: Optional[int] = None,
             spk: str = "spk1", emb_dim: int = 192, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n_tokens = int(seconds * 50) if n_tokens is None else n_tokens
    row = {
        "utt": utt, "wav": f"/x/{utt}.wav", "audio_data": wav_bytes(seconds, sr, freq=150 + 10 * (seed % 20)),
        "text": text, "spk": spk,
        "utt_embedding": rng.normal(size=emb_dim).tolist(), "spk_embedding": rng.normal(size=emb_dim).tolist(),
        "speech_token": rng.integers(0, 4096, size=n_tokens).tolist(),
    }
    row.update(overrides)
    return row


SCHEMA = pa.schema([("utt", pa.string()), ("wav", pa.string()), ("audio_data", pa.binary()), ("text", pa.string()),
                    ("spk", pa.string()), ("utt_embedding", pa.list_(pa.float64())),
                    ("spk_embedding", pa.list_(pa.float64())), ("speech_token", pa.list_(pa.int64()))])


def write_shard(path: Path, rows: Sequence[dict[str, Any]], row_group_size: int = 4) -> str:
    table = pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def write_corpus(folder: Path, sizes: Sequence[int], seconds: Sequence[float] = (0.3, 0.5, 0.8, 1.1),
                 name: str = "data.list") -> tuple[str, list[str]]:
    """Shards of the given sizes with varied lengths; returns (data.list path, all utt ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, utts, k = [], [], 0
    for s, size in enumerate(sizes):
        rows = []
        for _ in range(size):
            utt = f"u{k:04d}"
            rows.append(make_row(utt, seconds=seconds[k % len(seconds)] + 0.01 * (k % 7), seed=k,
                                 text="text number %d" % k))
            utts.append(utt)
            k += 1
        shards.append(write_shard(folder / f"parquet_{s:09d}.tar", rows))
    (folder / name).write_text("".join(p + "\n" for p in shards))
    return str(folder / name), utts


def run_rows(rows: list[dict[str, Any]], feat: FeatureConfig = FeatureConfig(), fcfg: FilterConfig = FilterConfig(
        speech_token_size=4096), skipped: Optional[Counter] = None, f0_fn: Any = None) -> list[dict[str, Any]]:
    stages = P.sample_stages(ByteTokenizer(), fcfg, feat, skipped, truncate_rng=lambda s: random.Random(0), f0_fn=f0_fn)
    return list(P.compose([dict(r) for r in rows], stages))


# ---------------------------------------------------------------------------------------- tests


def test_bad_rows_are_skipped_and_counted_by_reason() -> None:
    nan = np.full(SR // 2, np.nan, dtype=np.float32)
    rows = [
        make_row("good"),
        make_row("garbage_audio", audio_data=b"not a wav file at all"),
        make_row("truncated_audio", audio_data=wav_bytes(0.5)[:30]),
        make_row("nan_audio", audio_data=wav_bytes(0.5, samples=nan, subtype="FLOAT")),
        make_row("empty_text", text="   "),
        make_row("token_out_of_range", speech_token=[1, 2, 4096]),
        make_row("negative_token", speech_token=[1, -3, 2]),
        make_row("no_tokens", speech_token=[]),
        make_row("short_embedding", emb_dim=191),
        make_row("nan_embedding", utt_embedding=[float("nan")] * 192),
        make_row("low_rate", sr=8000),
    ]
    skipped: Counter = Counter()
    out = run_rows(rows, skipped=skipped)
    assert [s["utt"] for s in out] == ["good"]
    assert skipped == Counter({"undecodable_audio": 2, "nonfinite_audio": 1, "empty_text": 1,
                               "speech_token_out_of_range": 2, "empty_speech_token": 1, "bad_embedding": 2,
                               "low_sample_rate": 1})


def test_filter_lengths_follow_upstream_units() -> None:
    rows = [make_row("short", seconds=0.2), make_row("ok", seconds=0.5), make_row("long", seconds=1.0),
            make_row("chatty", seconds=0.5, text="x" * 60)]
    skipped: Counter = Counter()
    fcfg = FilterConfig(min_length=30, max_length=80, token_max_length=50, speech_token_size=4096)
    out = run_rows(rows, fcfg=fcfg, skipped=skipped)
    assert [s["utt"] for s in out] == ["ok"]
    assert skipped == Counter({"too_short": 1, "too_long": 1, "too_many_text_tokens": 1})


def test_resample_and_fbank_match_features_module() -> None:
    from cosytrain.data.features import mel_spectrogram
    import torchaudio.functional as AF

    row = make_row("a", seconds=0.6, sr=24000)
    [sample] = run_rows([row])
    wav, sr = sf.read(io.BytesIO(row["audio_data"]), dtype="float32")
    ref_wave = AF.resample(torch.from_numpy(wav).unsqueeze(0), 24000, SR)
    ref = mel_spectrogram(ref_wave, n_fft=1024, num_mels=80, sampling_rate=SR, hop_size=256, win_size=1024,
                          fmin=0, fmax=8000, center=False).squeeze(0).transpose(0, 1)
    assert sample["sample_rate"] == SR
    assert sample["speech_feat"].shape == ref.shape and ref.shape[1] == 80
    torch.testing.assert_close(sample["speech_feat"], ref)
    facts = P.row_facts(row)
    assert P.expected_feat_frames(facts, FeatureConfig()) == ref.shape[0]


def test_planned_frames_equal_real_frames_for_v2_options() -> None:
    feat = FeatureConfig(sample_rate=24000, n_fft=1920, hop_size=480, win_size=1920, fmax=8000, num_frames=960,
                         token_mel_ratio=2)
    for i, (sec, sr, ntok) in enumerate([(0.53, 24000, 10), (0.71, 22050, 40), (0.9, 16000, 22)]):
        row = make_row(f"r{i}", seconds=sec, sr=sr, n_tokens=ntok, speech_token=list(range(ntok)))
        [s] = run_rows([row], feat=feat)
        assert s["speech_feat"].shape[0] == P.expected_feat_frames(P.row_facts(row), feat)
        assert s["speech_feat"].shape[0] == 2 * len(s["speech_token"])
        assert s["speech"].shape[1] % 960 == 0


def test_dynamic_batch_respects_frame_budget_and_never_yields_empty() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(10, 120) for _ in range(200)] + [500]  # the last one alone exceeds the budget
    batches = list(P.dynamic_batch(lengths, max_frames_in_batch=300, key=lambda x: x))
    assert all(batches) and sum(len(b) for b in batches) == len(lengths)
    for b in batches:
        assert len(b) == 1 or max(b) * len(b) <= 300
    assert [500] in batches
    static = list(P.static_batch(range(10), 4))
    assert [len(b) for b in static] == [4, 4, 2]


def test_sort_within_buffer_and_seeded_shuffle() -> None:
    data = list(range(100))
    a = list(P.shuffle(data, 30, random.Random(7)))
    b = list(P.shuffle(data, 30, random.Random(7)))
    c = list(P.shuffle(data, 30, random.Random(8)))
    assert a == b and a != c and sorted(a) == data
    assert sorted(a[:30]) == data[:30]  # buffered: the first window only mixes the first 30
    out = list(P.sort(a, 25, key=lambda x: x))
    for i in range(0, 100, 25):
        assert out[i:i + 25] == sorted(a[i:i + 25])


def test_padding_keys_dtypes_and_order() -> None:
    rows = [make_row("short", seconds=0.3, text="hi"), make_row("long", seconds=0.9, text="a longer text"),
            make_row("mid", seconds=0.6, text="mid")]
    samples = run_rows(rows)
    batch = P.collate(samples, use_spk_embedding=False)
    assert batch["utts"] == ["long", "mid", "short"] and batch["text"] == ["a longer text", "mid", "hi"]
    expect = {"text_token": torch.int64, "text_token_len": torch.int32, "speech_token": torch.int64,
              "speech_token_len": torch.int32, "speech_feat": torch.float32, "speech_feat_len": torch.int32,
              "embedding": torch.float32, "utt_embedding": torch.float32, "spk_embedding": torch.float32}
    for key, dtype in expect.items():
        assert batch[key].dtype == dtype, key
    assert "speech" not in batch and "pitch_feat" not in batch
    B = 3
    assert batch["speech_feat"].shape[0] == B and batch["speech_feat"].shape[2] == 80
    assert batch["embedding"].shape == (B, 192)
    assert torch.equal(batch["embedding"], batch["utt_embedding"])
    lens = batch["speech_feat_len"].tolist()
    assert lens == sorted(lens, reverse=True) and batch["speech_feat"].shape[1] == lens[0]
    assert torch.all(batch["speech_feat"][2, lens[2]:] == 0)
    assert batch["text_token_len"].tolist() == [13, 3, 2]
    assert torch.all(batch["text_token"][2, 2:] == 0)
    torch.testing.assert_close(batch["embedding"].norm(dim=1), torch.ones(B))  # normalised as upstream
    spk = P.collate(samples, use_spk_embedding=True)
    assert torch.equal(spk["embedding"], spk["spk_embedding"]) and not torch.equal(spk["embedding"], batch["embedding"])


def test_instruct_rows_mixed_with_plain_rows_keep_their_instructions() -> None:
    """Upstream (and cosytrain before) emitted instruct_token only when EVERY row had one: one plain row in
    the batch dropped the instructions of all the others. Rows without one are padded to length 0."""
    rows = [make_row("ins", seconds=0.9, text="a b"), make_row("plain", seconds=0.6, text="c"),
            make_row("empty", seconds=0.3, text="d")]
    rows[0]["instruct"] = "speak slowly"
    rows[2]["instruct"] = ""  # an empty instruct value: tokens [] as upstream, not a missing key
    batch = P.collate(run_rows(rows))
    assert batch["utts"] == ["ins", "plain", "empty"]
    tok = ByteTokenizer()
    assert batch["instruct_token_len"].tolist() == [len("speak slowly"), 0, 0]
    assert batch["instruct_token"].dtype == torch.int64 and batch["instruct_token_len"].dtype == torch.int32
    assert batch["instruct_token"][0].tolist() == tok.encode("speak slowly")
    assert torch.all(batch["instruct_token"][1:] == 0)
    assert "instruct_token" not in P.collate(run_rows([make_row("p1"), make_row("p2", seconds=0.6)]))


def test_vocoder_mode_adds_speech_and_pitch() -> None:
    feat = FeatureConfig(vocoder=True, truncate_length=256 * 40)
    rows = [make_row("long", seconds=0.9), make_row("short", seconds=0.2)]
    calls = []

    def fake_f0(wave, sr, hop, n):
        calls.append((wave.shape, sr, hop, n))
        return torch.full((n,), 100.0, dtype=torch.float64)

    samples = run_rows(rows, feat=feat, f0_fn=fake_f0)
    batch = P.collate(samples, gan=True)
    assert batch["speech"].shape == (2, 256 * 40) and batch["speech"].dtype == torch.float32
    assert batch["pitch_feat"].shape == batch["speech_feat"].shape[:2] and batch["pitch_feat"].dtype == torch.float32
    assert batch["speech_feat"].shape[1] == 40 and [c[3] for c in calls] == [40, 40]
    assert torch.all(batch["speech"][1, int(0.2 * SR):] == 0)  # short one zero-padded up to truncate_length


def test_parquet_opener_skips_a_corrupt_shard(tmp_path: Path) -> None:
    good = write_shard(tmp_path / "good.parquet", [make_row("a"), make_row("b")])
    data = Path(good).read_bytes()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(data[: len(data) // 2])
    skipped: Counter = Counter()
    rows = list(P.parquet_opener([str(bad), good], skipped=skipped))
    assert [r["utt"] for r in rows] == ["a", "b"] and skipped == Counter({"corrupt_shard": 1})


# ------------------------------------------------------------------------------- text tokenizers


def test_byte_tokenizer_and_unknown_kind() -> None:
    from cosytrain.data.pipeline import DataError
    from cosytrain.data.text_tokenizer import build_text_tokenizer

    tok = build_text_tokenizer("byte")
    ids = tok.encode("hé")
    assert ids == [ord("h") + 1, 0xC3 + 1, 0xA9 + 1] and tok.vocab_size == 257 and 0 not in ids
    assert tok.decode(ids) == "hé"
    with pytest.raises(DataError, match="unknown text tokenizer"):
        build_text_tokenizer("sentencepiece")


def test_phoneme_tokenizer_reads_sounds_not_spelling() -> None:
    from cosytrain.data.phonemes import phonemize
    from cosytrain.data.text_tokenizer import build_text_tokenizer

    tok = build_text_tokenizer("phoneme")
    texts = ["Knight and night.", "Cough, though!", "Zorblax quantified it."]
    ids = [tok.encode(t) for t in texts]
    assert tok.vocab_size == 257 and all(0 not in x for x in ids)
    said = [tok.decode(x) for x in ids]
    assert said == [phonemize(t) for t in texts] and " | " in said[1]  # a clause break where the comma is
    knight, night = said[0].split(" ", 1)[0], said[0].split(" ")[-1]
    assert knight == night and "k" not in knight.lower()  # the same sounds, the silent letter gone
    assert phonemize("Cough") != phonemize("though") and all(said)  # an unknown word still gets phonemes
    assert tok.encode_lengths(texts) == [len(x) for x in ids]
    assert tok.encode(texts[0]) == ids[0]  # deterministic


def test_phone_tokenizer_gives_one_id_per_phone_from_espeaks_table() -> None:
    from cosytrain.data.phonemes import PHONES, phone_sequence, phonemize
    from cosytrain.data.text_tokenizer import build_text_tokenizer

    tok = build_text_tokenizer("phone")
    text = "The sky turned pink. Cough, though!"
    ids = tok.encode(text)
    assert tok.vocab_size == 257 and 0 not in ids and tok.unknown_id not in ids
    names = tok.decode(ids).split()
    assert names == list(phone_sequence(text)) + ["_"] and names[:4] == ["D", "@2", "s", "k"]
    assert names[4:6] == ["'", "aI"]  # the stress mark is its own id, before the vowel
    assert names.count("_") == 3  # a pause between the three clauses and one at the end, no word breaks
    # so a zero-shot prompt's text followed by the target's reads as one two-sentence utterance
    prompt, target = "The sky turned pink.", "Cough, though!"
    assert tok.encode(prompt) + tok.encode(target) == tok.encode(f"{prompt} {target}") == ids
    # the same phones as the phoneme string, without its spaces and clause marks
    assert "".join(n for n in names if n != "_") == phonemize(text).replace(" | ", "").replace(" ", "")
    assert tok.encode_lengths([text, "Hello."]) == [len(ids), len(tok.encode("Hello."))]
    # far fewer ids than the phoneme bytes: upstream's minimum of 2 speech tokens per text id stays low
    assert len(ids) < 0.75 * len(build_text_tokenizer("phoneme").encode(text))
    assert tok.encode("Zorblax quantified it.")[0] == 1 + PHONES.index("z")


def test_phone_tokenizer_splits_stress_marks_and_maps_unknown_names(monkeypatch) -> None:
    from cosytrain.data import phonemes
    from cosytrain.data.text_tokenizer import PhoneTokenizer

    assert phonemes._split_stress("''aI") == ["''", "aI"] and phonemes._split_stress(",'V") == [",", "'", "V"]
    assert phonemes._split_stress("'") == ["'"] and phonemes._split_stress("t#") == ["t#"]
    tok = PhoneTokenizer()
    monkeypatch.setattr(phonemes, "phone_sequence", lambda text: ("k", "Zz9", "_"))  # a name no table has
    ids = tok.encode("anything")
    assert ids == [1 + phonemes.PHONES.index("k"), 256, 1 + phonemes.PHONES.index("_")] and tok.unknown_id == 256
    assert tok.decode(ids) == "k <unk> _"


def test_phone_table_is_espeak_ngs_en_us_table() -> None:
    """PHONES is written out in phonemes.py; this reads espeak-ng's compiled phoneme tables (phontab of the
    installed espeakng-loader) and checks it is the en-us table in code order, so a different espeak-ng
    whose codes moved fails here rather than silently renumbering the demo LLM's text ids."""
    import struct

    import espeakng_loader

    from cosytrain.data.phonemes import PHONES

    data = (Path(espeakng_loader.get_data_path()) / "phontab").read_bytes()
    tables: dict[str, tuple[int, list[tuple[int, str]]]] = {}
    order, pos = [], 4
    for _ in range(data[0]):
        count, includes = data[pos], data[pos + 1]
        name = data[pos + 4:pos + 36].split(b"\0")[0].decode()
        pos += 36
        entries = []
        for _ in range(count):
            mnemonic, _, _, code = struct.unpack_from("<IIHB", data, pos)
            entries.append((code, mnemonic.to_bytes(4, "little").rstrip(b"\0").decode("latin1")))
            pos += 16
        tables[name] = (includes, entries)
        order.append(name)

    def table(name: str) -> dict[int, str]:
        includes, entries = tables[name]
        out = table(order[includes - 1]) if includes else {}
        out.update(entries)
        return out

    en_us = table("en-us")
    assert tuple(n for _, n in sorted(en_us.items()) if n and n.isprintable()) == PHONES


def test_whisper_tokenizer_missing_dependency_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    """Without openai-whisper (simulated) the error names the extra; a wrong vocabulary path names the file."""
    import sys

    from cosytrain.data.text_tokenizer import TokenizerUnavailableError, WhisperTokenizer

    with pytest.raises(TokenizerUnavailableError, match="not found"):
        WhisperTokenizer(str(tmp_path / "multilingual.tiktoken"))
    monkeypatch.setitem(sys.modules, "whisper", None)
    monkeypatch.setitem(sys.modules, "whisper.tokenizer", None)
    with pytest.raises(TokenizerUnavailableError, match=r"pip install 'cosytrain\[whisper\]'") as err:
        WhisperTokenizer()
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(TokenizerUnavailableError, match=r"cosytrain\[whisper\]"):
        WhisperTokenizer(str(tmp_path / "multilingual.tiktoken"))


def test_whisper_tokenizer_is_the_real_v1_vocabulary_and_offline(tmp_path: Path, monkeypatch) -> None:
    """The v1 recipes' tokenizer: openai-whisper's multilingual BPE (51866 ids = llm_v1 text_token_size),
    built with the network blocked and an empty tiktoken cache; the tiktoken-only path over the same
    vocabulary file gives the same ids, special tokens included."""
    import socket

    import yaml

    from cosytrain.data.text_tokenizer import WhisperTokenizer
    from tests.conftest import require_module

    wt = require_module("whisper.tokenizer", "pip install -e '.[whisper]' (part of the test extra)")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "empty_cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("the whisper tokenizer touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    ours = WhisperTokenizer()
    vocab_file = Path(wt.__file__).parent / "assets" / "multilingual.tiktoken"
    rebuilt = WhisperTokenizer(str(vocab_file))
    conf = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / "model" / "llm_v1.yaml").read_text())
    assert ours.vocab_size == rebuilt.vocab_size == 51866 == conf["init_args"]["text_token_size"]
    for text in ("Hello world.", "你好，世界", "Grüße aus Köln <|en|>", "<|endoftext|><|notimestamps|> 1.5 s"):
        assert ours.encode(text) == rebuilt.encode(text), text
    assert ours.encode("Hello world") == [15947, 1002]  # GPT-2 BPE ids, also whisper's
    assert ours.encode("<|en|>") == [50259] and ours.decode(ours.encode("你好")) == "你好"


def _tiny_hf_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))


@pytest.mark.parametrize("kind", ["qwen", "qwen3"])
def test_qwen_tokenizer_adds_upstream_special_tokens_in_order(tmp_path: Path, kind: str) -> None:
    from cosytrain.data.text_tokenizer import QWEN_V2_SPECIALS, QWEN_V3_SPECIALS, build_text_tokenizer

    _tiny_hf_tokenizer(tmp_path / "blank")
    tok = build_text_tokenizer(kind, str(tmp_path / "blank"))
    specials = QWEN_V3_SPECIALS if kind == "qwen3" else QWEN_V2_SPECIALS
    assert tok.vocab_size == 4 + len(specials)
    assert tok.encode("hello [breath] world") == [2, 4 + specials.index("[breath]"), 3]
    assert tok.encode("<|endofprompt|>") == [4 + 2]
    if kind == "qwen3":
        assert tok.encode("[AA1]") == [4 + specials.index("[AA1]")]
        assert specials[:len(QWEN_V2_SPECIALS) + 1] == QWEN_V2_SPECIALS + ("<|endofsystem|>",)
    assert len(set(specials)) == len(specials)


def test_qwen_tokenizer_missing_folder(tmp_path: Path) -> None:
    from cosytrain.data.text_tokenizer import TokenizerUnavailableError, build_text_tokenizer

    with pytest.raises(TokenizerUnavailableError, match="CosyVoice-BlankEN"):
        build_text_tokenizer("qwen", str(tmp_path / "nope"))
    with pytest.raises(TokenizerUnavailableError, match="text_tokenizer_path"):
        build_text_tokenizer("qwen", None)
