"""``python -m cosytrain dpo-pairs``: candidates sampled from a model directory, scored, paired into
shards that the data pipeline batches with upstream's DPO keys; the scorers themselves."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosytrain.cli import main as cli_main
from cosytrain.data.shards import iter_rows, read_data_list, write_shard
from cosytrain.preference.scorers import Candidate, LengthScorer, SpeakerSimilarityScorer, Utterance, WerScorer, \
    parse_scorer_specs
from tests.inference import _tiny_v1 as tiny

TEXTS = ["HELLO THERE", "GOOD MORNING", "A CAT SAT", "ONE TWO THREE"]  # byte ids below the tiny llm's 100


def _wav_bytes(seconds: float, freq: float, sr: int = 22050) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    """A v1 tiny model directory (with a built-in speaker encoder) and a 4-utterance prepared corpus."""
    from cosytrain.data.speaker_embedding import BuiltinSpeakerEmbedding, fbank_stats
    from cosytrain.preference.pairs import _to_16k

    model_dir = tiny.make_model_dir(tmp_path / "model", front_end=False)
    rows, stats = [], []
    for i, text in enumerate(TEXTS):
        audio = _wav_bytes(0.6 + 0.1 * i, 180 + 40 * i)
        wav, sr = sf.read(io.BytesIO(audio), dtype="float32")
        stats.append(fbank_stats(_to_16k(torch.from_numpy(wav), sr)))
        g = torch.Generator().manual_seed(i)
        rows.append({"utt": f"u{i}", "wav": f"u{i}.wav", "audio_data": audio, "text": text, "spk": f"s{i % 2}",
                     "utt_embedding": torch.randn(192, generator=g).tolist(),
                     "spk_embedding": torch.randn(192, generator=g).tolist(),
                     "speech_token": torch.randint(0, 40, (10 + 3 * i,), generator=g).tolist()})
    BuiltinSpeakerEmbedding.fit(torch.stack(stats)).save(model_dir / "campplus_builtin.npz")
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "parquet_000000000.tar", rows)
    (data / "data.list").write_text(f"{data / 'parquet_000000000.tar'}\n")
    torch.save({"s0": [0.0] * 192}, data / "spk2embedding.pt")
    return model_dir, data / "data.list"


def test_pairs_are_best_and_worst_candidates_and_batch_for_dpo(tmp_path: Path, corpus) -> None:
    model_dir, data_list = corpus
    out = tmp_path / "pairs"
    args = ["dpo-pairs", "--model_dir", str(model_dir), "--data", str(data_list), "-o", str(out),
            "--num_candidates", "3", "--max_token_text_ratio", "3", "--min_token_text_ratio", "1",
            "--text_tokenizer", "byte", "--scorer", "speaker", "--scorer", "length:0.5", "--device", "cpu",
            "--speaker_encoder", "builtin"]  # auto would load resemblyzer (librosa's JIT: ~10 s on a first call)
    assert cli_main(args) == 0
    summary = json.loads((out / "pairs.json").read_text())
    reports = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert summary["utterances"] == 4 == len(reports) and summary["pairs"] >= 1
    assert summary["scorers"] == ["speaker:1", "length:0.5"]
    source = {r["utt"]: r for r in iter_rows(data_list)}
    paired = {r["utt"]: r for r in iter_rows(out / "data.list")}
    assert len(paired) == summary["pairs"] and (out / "spk2embedding.pt").is_file()
    for report in reports:
        if "skipped" in report:
            continue
        totals = [s["total"] for s in report["scores"]]
        for s in report["scores"]:
            assert s["total"] == pytest.approx(s["speaker"] + 0.5 * s["length"])
            assert -1.0 <= s["speaker"] <= 1.0 and s["length"] <= 0.0
        assert totals[report["chosen"]] == max(totals) and totals[report["rejected"]] == min(totals)
        row = paired[report["utt"]]
        assert len(row["speech_token"]) == report["lengths"][report["chosen"]]
        assert len(row["reject_speech_token"]) == report["lengths"][report["rejected"]]
        assert row["speech_token"] != row["reject_speech_token"]
        assert row["audio_data"] == source[report["utt"]]["audio_data"] and row["text"] == source[report["utt"]]["text"]
    # reproducible: same seed, same candidates and scores (two utterances are enough to see it)
    again = tmp_path / "again"
    assert cli_main(args[:6] + [str(again)] + args[7:] + ["--max_utts", "2"]) == 0
    assert (again / "pairs.jsonl").read_text().splitlines() == (out / "pairs.jsonl").read_text().splitlines()[:2]

    # the data pipeline batches them with upstream's DPO keys
    from cosytrain.data.datamodule import CosyDataModule

    dm = CosyDataModule(train_data=str(out / "data.list"), text_tokenizer="byte", speech_token_size=40,
                        batch_type="static", batch_size=2, shuffle_size=4, sort_size=4, index_cache_dir=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["reject_speech_token"].shape[0] == batch["speech_token"].shape[0]
    for utt, tokens, n in zip(batch["utts"], batch["reject_speech_token"], batch["reject_speech_token_len"]):
        assert tokens[:int(n)].tolist() == paired[utt]["reject_speech_token"]
    assert read_data_list(out / "data.list")[0].startswith(str(out.resolve()))


def test_bad_arguments_are_one_line(tmp_path: Path, corpus, capsys: pytest.CaptureFixture) -> None:
    model_dir, data_list = corpus
    base = ["dpo-pairs", "--model_dir", str(model_dir), "-o", str(tmp_path / "o")]
    assert cli_main(base + ["--data", str(tmp_path / "nope.list")]) == 2
    assert "nope.list not found" in capsys.readouterr().err
    assert cli_main(base + ["--data", str(data_list), "--scorer", "mos"]) == 2
    assert "unknown scorer 'mos'" in capsys.readouterr().err
    assert cli_main(base + ["--data", str(data_list), "--scorer", "wer"]) == 2
    assert "--scorer wer needs an ASR backend: --asr kind:path" in capsys.readouterr().err
    assert cli_main(base + ["--data", str(data_list), "--scorer", "wer", "--asr", f"whisper:{tmp_path}/none.pt"]) == 2
    assert "none.pt not found" in capsys.readouterr().err
    assert cli_main(base + ["--data", str(data_list), "--num_candidates", "1"]) == 2
    assert "--num_candidates must be at least 2" in capsys.readouterr().err
    (model_dir / "campplus_builtin.npz").unlink()
    assert cli_main(base + ["--data", str(data_list), "--speaker_encoder", "builtin"]) == 2
    assert "campplus_builtin.npz not found" in capsys.readouterr().err
    assert cli_main(base + ["--data", str(data_list), "--speaker_encoder", "campplus"]) == 2
    assert "no campplus.onnx in" in capsys.readouterr().err


def test_scorers() -> None:
    utt = Utterance("u", "hi", [1] * 9)
    assert LengthScorer().score(utt, [Candidate([2] * 9), Candidate([2] * 19), Candidate([2] * 4)]) == \
        pytest.approx([0.0, -np.log(2.0), -np.log(2.0)])

    class Echo:  # embeds a signal as (its mean, its energy): the candidate closer to the recording wins
        def embed(self, audio):
            return np.array([float(np.mean(audio)), float(np.mean(audio * audio))])

    utt.wav16k = np.array([1.0, 2.0, 3.0])
    near, far = Candidate([1], np.array([1.0, 2.0, 3.1])), Candidate([1], np.array([-3.0, 0.0, 0.5]))
    scores = SpeakerSimilarityScorer(Echo()).score(utt, [near, far])
    assert scores[0] > 0.99 and scores[1] < scores[0]

    class Asr:  # hears "hi there" in the near candidate and "hi where now" in the far one
        def transcribe(self, wav):
            return "hi there" if wav[-1] > 3 else "hi where now"

    assert WerScorer(Asr()).score(Utterance("u", "Hi, there!", [1]), [near, far]) == pytest.approx([0.0, -1.0])
    assert parse_scorer_specs(["speaker:2", "length"]) == [("speaker", 2.0), ("length", 1.0)]
    with pytest.raises(ValueError, match="must be a number"):
        parse_scorer_specs(["length:x"])
