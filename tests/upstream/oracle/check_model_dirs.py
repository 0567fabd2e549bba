"""Oracle script: hand model directories to upstream CosyVoice's own code, as its cli does.

Runs in the oracle's python (see ``_upstream_env``). Request::

    {"dirs": [{"name": str, "path": str, "tokens": int, "auto": bool,
               "token2wav": bool (default true), "auto_modes": ["sft", "zero_shot"] (the default)}],
     "prompt_wav": str, "out_dir": str}

For each directory, in order (a stage runs only when the one before passed):

``build``      ``hyperpyyaml.load_hyperpyyaml`` of the generation's yaml, with ``qwen_pretrain_path``
               overridden to ``<dir>/CosyVoice-BlankEN`` for v2/v3 exactly as ``CosyVoice2``/``3`` do
``model_type`` ``cosyvoice.utils.class_utils.get_model_type`` -> the model class
``load``       that class's ``load(llm.pt, flow.pt, hift.pt)``: ``load_state_dict(strict=True)`` each
``offline`` / ``stream``  upstream's token2wav path with known speech tokens: the model's ``tts()`` fed
               ``source_speech_token`` (its voice-conversion entry, which skips the LLM and runs
               ``token2wav`` = ``flow.inference`` then ``hift.inference``), ``stream=False`` and ``True``
``auto``       (when asked, after the stages above passed) ``cosyvoice.cli.cosyvoice.AutoModel(model_dir=...)``:
               ``inference_sft`` with its first speaker and ``inference_zero_shot`` with the prompt
               wav, each written to a wav with soundfile; its error goes to ``auto_error`` (a directory
               without upstream's ONNX front ends must be refused, and the test says so)

The verdict per directory names the first failing stage and its error in one line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from _upstream_env import error_line, fresh_mel_caches, main

CONFIGS = {"cosyvoice.yaml": "v1", "cosyvoice2.yaml": "v2", "cosyvoice3.yaml": "v3"}


def _audio(chunks: list[Any]) -> dict[str, Any]:
    import torch

    speech = torch.cat([c["tts_speech"] for c in chunks], dim=1)
    return {"chunks": len(chunks), "chunk_samples": [int(c["tts_speech"].shape[1]) for c in chunks],
            "samples": int(speech.shape[1]), "channels": int(speech.shape[0]),
            "finite": bool(torch.isfinite(speech).all()), "rms": float(speech.float().pow(2).mean().sqrt()),
            "speech": speech}


def _token2wav(model: Any, configs: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    import torch

    flow = configs["flow"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, int(flow.vocab_size), (1, n_tokens), generator=gen, dtype=torch.int64).to(torch.int32)
    dim = int(flow.spk_embed_affine_layer.in_features)
    embedding = torch.nn.functional.normalize(torch.randn(1, dim, generator=gen), dim=1)
    out: dict[str, Any] = {"tokens": n_tokens}
    for stream in (False, True):
        torch.manual_seed(0)
        with torch.no_grad():
            chunks = list(model.tts(source_speech_token=tokens, flow_embedding=embedding, stream=stream))
        audio = _audio(chunks)
        audio.pop("speech")
        out["stream" if stream else "offline"] = audio
    return out


def _auto(path: Path, prompt_wav: str, out_dir: Path, name: str, modes: list[str]) -> dict[str, Any]:
    import soundfile
    import torch
    from cosyvoice.cli.cosyvoice import AutoModel

    model = AutoModel(model_dir=str(path))
    result: dict[str, Any] = {"class": type(model).__name__, "sample_rate": int(model.sample_rate),
                              "speakers": list(model.list_available_spks())}
    if not result["speakers"]:
        raise RuntimeError(f"{path}/spk2info.pt: upstream's front end finds no speaker for inference_sft")
    torch.manual_seed(0)
    # not shorter: a random-weight llm (the official-size bases) stops anywhere between upstream's min_len and
    # max_len (2 and 20 speech tokens per text token); with "Hi." v3 stopped at 6 tokens, too short for its
    # flow/vocoder convolutions ("Kernel size can't be greater than actual input size")
    text = "Hi there."
    # CosyVoice3's llm asserts <|endofprompt|> in the text or prompt text (upstream's examples carry it); the
    # assertion dies in upstream's llm thread, so without it inference_sft fails later, in the flow, on zero tokens
    system = "You are a helpful assistant.<|endofprompt|>" if result["class"] == "CosyVoice3" else ""
    runs = {"sft": lambda: model.inference_sft(system + text, result["speakers"][0], stream=False),
            "zero_shot": lambda: model.inference_zero_shot(text, system + "A short prompt.", prompt_wav, stream=False)}
    for mode, call in ((m, runs[m]) for m in modes):
        t0 = time.perf_counter()
        with torch.no_grad():
            audio = _audio(list(call()))
        wav = out_dir / f"{name}_{mode}.wav"
        soundfile.write(str(wav), audio.pop("speech")[0].numpy(), model.sample_rate)
        result[mode] = {**audio, "wav": str(wav), "seconds": round(time.perf_counter() - t0, 2)}
    return result


def check(entry: dict[str, Any], prompt_wav: str, out_dir: Path) -> dict[str, Any]:
    from hyperpyyaml import load_hyperpyyaml

    path = Path(entry["path"])
    verdict: dict[str, Any] = {"path": str(path), "passed": [], "failed": None, "error": None, "stage_seconds": {}}
    stage = "build"
    t0 = lap = time.perf_counter()

    def passed(name: str) -> None:
        nonlocal lap
        verdict["passed"].append(name)
        verdict["stage_seconds"][name] = round(time.perf_counter() - lap, 2)
        lap = time.perf_counter()

    try:
        names = [n for n in CONFIGS if (path / n).is_file()]
        if len(names) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one of {sorted(CONFIGS)}, found {names}")
        verdict["config"] = names[0]
        generation = verdict["generation"] = CONFIGS[names[0]]
        overrides = {} if generation == "v1" else {"qwen_pretrain_path": os.path.join(path, "CosyVoice-BlankEN")}
        with open(path / names[0]) as f:
            configs = load_hyperpyyaml(f, overrides=overrides) if overrides else load_hyperpyyaml(f)
        verdict["classes"] = {p: f"{type(configs[p]).__module__}.{type(configs[p]).__name__}"
                              for p in ("llm", "flow", "hift")}
        passed(stage)

        stage = "model_type"
        from cosyvoice.utils.class_utils import get_model_type

        model_class = get_model_type(configs)
        verdict["model_type"] = model_class.__name__
        passed(stage)

        stage = "load"
        model = model_class(configs["llm"], configs["flow"], configs["hift"], False)
        model.load(str(path / "llm.pt"), str(path / "flow.pt"), str(path / "hift.pt"))
        verdict["num_keys"] = {p: len(getattr(model, p).state_dict()) for p in ("llm", "flow", "hift")}
        verdict["sample_rate"] = int(configs["sample_rate"])
        passed(stage)

        stage = "token2wav"
        if entry.get("token2wav", True):
            verdict["token2wav"] = _token2wav(model, configs, int(entry["tokens"]))
            passed(stage)
        del model, configs

    except BaseException as exc:  # the verdict names any failure; the pytest side asserts
        verdict["failed"], verdict["error"] = stage, error_line(exc)
    if entry.get("auto") and verdict["failed"] is None:  # its own verdict: some directories must refuse it
        fresh_mel_caches()  # zero-shot computes the prompt's mel: v1 (n_fft 1024) and v2/v3 (1920) in one process
        try:
            modes = entry.get("auto_modes", ["sft", "zero_shot"])
            verdict["auto"], verdict["auto_error"] = _auto(path, prompt_wav, out_dir, entry["name"], modes), None
            verdict["stage_seconds"]["auto"] = round(time.perf_counter() - lap, 2)
        except BaseException as exc:
            verdict["auto"], verdict["auto_error"] = None, error_line(exc)
    verdict["seconds"] = round(time.perf_counter() - t0, 2)
    return verdict


def run(request: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(request["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    return {entry["name"]: check(entry, request.get("prompt_wav", ""), out_dir) for entry in request["dirs"]}


if __name__ == "__main__":
    main(run)
