"""Oracle script: cosytrain's shards through upstream's own ``cosyvoice/dataset`` processors.

Request: ``{"cases": {name: {"data_list": path, "config": <upstream example cosyvoice*.yaml>,
"gan": bool, "tokenizer_dir": dir (v2/v3: where a Qwen-layout tokenizer is written)}}}`` (one
process for every case: importing upstream's stack is most of the cost).

The example config is loaded with ``load_hyperpyyaml`` without its model sections (``llm``,
``flow``, ``hift``, ``hifigan``: only the data side is under test, and building official-size
models would cost a minute); its ``data_pipeline`` (or ``data_pipeline_gan``) then runs through
``cosyvoice.dataset.dataset.Dataset`` exactly as upstream's training does, with shuffling and
partitioning off so every utterance is seen once. Returns per utterance what upstream's padded
batches hold.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from _upstream_env import main

MODEL_SECTIONS = {"llm", "flow", "hift", "hifigan"}


def data_side(text: str) -> str:
    """The config without its top-level model sections (each runs until the next top-level key)."""
    out, skipping = [], False
    for line in text.splitlines():
        top = re.match(r"^([A-Za-z_][\w]*)\s*:", line)
        if top:
            skipping = top.group(1) in MODEL_SECTIONS
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def _fbank_taking_token_mel_ratio(step: Any) -> Any:
    """Upstream quirk (ace7c47): ``Dataset(gan=True)`` binds ``token_mel_ratio=0`` to the pipeline's
    ``compute_fbank``, whose signature no longer has that argument, so upstream's own vocoder data
    path raises TypeError for every config. The step is rewrapped (same name, same processor) to
    accept and drop it; the processor itself runs unchanged."""
    import functools

    if getattr(step, "func", None) is None or step.func.__name__ != "compute_fbank":
        return step
    upstream = step.func

    def compute_fbank(data: Any, *args: Any, token_mel_ratio: int = 0, **kwargs: Any) -> Any:
        return upstream(data, *args, **kwargs)

    return functools.partial(compute_fbank, *step.args, **step.keywords)


def run(request: dict[str, Any]) -> dict[str, Any]:
    return {name: read(case) for name, case in request["cases"].items()}


def read(request: dict[str, Any]) -> dict[str, Any]:
    import matcha.utils.audio
    import torch

    # Matcha quirk: mel_spectrogram caches its mel basis and Hann window in module-level dicts keyed by
    # fmax and device only, so a second config with another n_fft/win_size (v1 1024, v2 1920) would reuse
    # the first one's window; each case starts with empty caches, as a fresh upstream process would
    matcha.utils.audio.mel_basis.clear()
    matcha.utils.audio.hann_window.clear()
    from cosyvoice.dataset.dataset import Dataset
    from hyperpyyaml import load_hyperpyyaml

    overrides = {}
    if request.get("tokenizer_dir"):
        from build_bases import byte_level_tokenizer

        folder = Path(request["tokenizer_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        byte_level_tokenizer(folder)
        overrides["qwen_pretrain_path"] = str(folder)
    configs = load_hyperpyyaml(data_side(Path(request["config"]).read_text()), overrides=overrides)
    gan = bool(request.get("gan"))
    pipeline = configs["data_pipeline_gan" if gan else "data_pipeline"]
    if gan:
        pipeline = [_fbank_taking_token_mel_ratio(f) for f in pipeline]
    dataset = Dataset(request["data_list"], data_pipeline=pipeline, mode="train", gan=gan, shuffle=False,
                      partition=False)
    utts: dict[str, Any] = {}
    batches = 0
    for batch in dataset:
        batches += 1
        for i, utt in enumerate(batch["utts"]):
            row = {"text": batch["text"][i], "text_token_len": int(batch["text_token_len"][i]),
                   "speech_token_len": int(batch["speech_token_len"][i]),
                   "speech_feat_len": int(batch["speech_feat_len"][i]),
                   "feat_dim": int(batch["speech_feat"].shape[2]),
                   "embedding_dim": int(batch["embedding"].shape[1]),
                   "finite": bool(torch.isfinite(batch["speech_feat"][i]).all()
                                  and torch.isfinite(batch["embedding"][i]).all())}
            if gan:
                row["speech_len"] = int(batch["speech_len"][i])
                row["pitch_feat_len"] = int(batch["pitch_feat_len"][i])
            utts[utt] = row
    return {"batches": batches, "utts": utts, "keys": sorted(batch.keys()) if batches else []}


if __name__ == "__main__":
    main(run)
