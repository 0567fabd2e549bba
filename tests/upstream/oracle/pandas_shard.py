"""Oracle script: write a shard the way upstream's ``tools/make_parquet_list.py`` (ace7c47) does, with the
oracle's pandas and pyarrow: one ``pandas.DataFrame`` of the shard's rows (utt, wav, audio_data, text, spk,
utt_embedding, spk_embedding, speech_token) and ``df.to_parquet(path)``, so the file has pandas' layout
(one row group, dictionary-then-plain encoding, snappy).

Request: ``{"path", "rows", "seconds", "sample_rate"}``; result: the versions that wrote it and each row's
sample count. The audio is a deterministic tone plus noise per row (distinct rows, partly compressible).
"""

from __future__ import annotations

import io
from typing import Any

from _upstream_env import main


def run(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    import pyarrow
    import soundfile as sf

    rate, n = int(request["sample_rate"]), int(request["rows"])
    rng = np.random.default_rng(0)
    audio, samples = [], []
    for i in range(n):
        k = int(request["seconds"] * rate) + i
        wav = 0.3 * np.sin(np.arange(k) * 2 * np.pi * (110 + 7 * i) / rate) + 0.01 * rng.standard_normal(k)
        buf = io.BytesIO()
        sf.write(buf, wav.astype(np.float32), rate, format="WAV", subtype="PCM_16")
        audio.append(buf.getvalue())
        samples.append(k)
    df = pd.DataFrame()
    df["utt"] = [f"spk{i % 3}_{i:04d}" for i in range(n)]
    df["wav"] = [f"/data/{u}.wav" for u in df["utt"]]
    df["audio_data"] = audio
    df["text"] = [f"sentence number {i}" for i in range(n)]
    df["spk"] = [f"spk{i % 3}" for i in range(n)]
    df["utt_embedding"] = [rng.standard_normal(192).tolist() for _ in range(n)]
    df["spk_embedding"] = [rng.standard_normal(192).tolist() for _ in range(n)]
    df["speech_token"] = [rng.integers(0, 4096, 25 + i % 10).tolist() for i in range(n)]
    df.to_parquet(request["path"])
    return {"pandas": pd.__version__, "pyarrow": pyarrow.__version__, "samples": samples}


if __name__ == "__main__":
    main(run)
