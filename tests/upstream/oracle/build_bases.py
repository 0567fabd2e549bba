"""Oracle script: official-size CosyVoice model directories built by upstream's own classes.

Request: ``{"out": dir, "gens": ["v1", "v2", "v3"], "configs": <reference configs dir>,
"front_end": <dir with campplus.onnx and speech_tokenizer_v{1,2,3}.onnx stand-ins>}``.

Per generation, ``<out>/<gen>/`` gets what a released model directory holds, at the released sizes
with random weights: the upstream example config (``examples/libritts/*/conf``) as
``cosyvoice*.yaml``, built with ``load_hyperpyyaml`` exactly as upstream's cli does, each part's
``state_dict()`` saved by ``torch.save`` as ``llm.pt``/``flow.pt``/``hift.pt``, the stand-in ONNX
front ends, an ``spk2info.pt`` with one speaker, and for v2/v3 a ``CosyVoice-BlankEN`` folder:
Qwen2.5-0.5B's config (hidden 896, 24 layers, 14 heads, 2 KV heads, vocab 151936, tied
embeddings), random weights in bfloat16 (as the released folder ships them; ``llm.pt`` overwrites
them) written by ``Qwen2ForCausalLM.save_pretrained``, and a byte-level BPE tokenizer with
Qwen's special tokens, built with ``tokenizers`` (the real Qwen vocabulary cannot be downloaded
here; upstream's front end only needs ids below the vocabulary size).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from _upstream_env import main

CONFIG = {"v1": "cosyvoice.yaml", "v2": "cosyvoice2.yaml", "v3": "cosyvoice3.yaml"}
TOKENIZER = {"v1": "speech_tokenizer_v1.onnx", "v2": "speech_tokenizer_v2.onnx", "v3": "speech_tokenizer_v3.onnx"}
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False,
              "sliding_window": 32768, "max_window_layers": 21, "bos_token_id": 151643, "eos_token_id": 151643}


def blank_en(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B))
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    del model
    byte_level_tokenizer(folder)


def byte_level_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (256 byte tokens, no merges) with Qwen's end-of-text token, in
    Hugging Face's layout: ``AutoTokenizer.from_pretrained(folder)`` opens it as upstream's
    ``QwenTokenizer`` does, then upstream adds its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    # Qwen's 151643 regular entries (unreachable fillers past the 256 bytes: no merges make them), so that
    # <|endoftext|>, <|im_start|>, <|im_end|> get Qwen's ids 151643-151645 and the special tokens upstream's
    # tokenizer adds land on the released ids (CosyVoice3's llm asserts <|endofprompt|> == 151646)
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), QWEN25_05B["bos_token_id"])})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.save_pretrained(folder)


def build(gen: str, out: Path, configs: Path, front_end: Path) -> dict[str, Any]:
    import torch
    from hyperpyyaml import load_hyperpyyaml

    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(configs / CONFIG[gen], tmp / CONFIG[gen])
    overrides = {}
    if gen != "v1":
        blank_en(tmp / "CosyVoice-BlankEN")
        overrides = {"qwen_pretrain_path": str(tmp / "CosyVoice-BlankEN")}
    with open(tmp / CONFIG[gen]) as f:
        parts = load_hyperpyyaml(f, overrides=overrides) if overrides else load_hyperpyyaml(f)
    sizes = {}
    for part in ("llm", "flow", "hift"):
        state = parts[part].state_dict()
        sizes[part] = sum(v.numel() for v in {id(v): v for v in state.values()}.values())
        torch.save(state, tmp / f"{part}.pt")
    del parts
    shutil.copyfile(front_end / "campplus.onnx", tmp / "campplus.onnx")
    shutil.copyfile(front_end / TOKENIZER[gen], tmp / TOKENIZER[gen])
    gen_ = torch.Generator().manual_seed(1)
    torch.save({"base_speaker": {"embedding": torch.randn(1, 192, generator=gen_)}}, tmp / "spk2info.pt")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"path": str(out), "elements": sizes, "seconds": round(time.perf_counter() - t0, 1)}


def run(request: dict[str, Any]) -> dict[str, Any]:
    out = Path(request["out"])
    return {gen: build(gen, out / gen, Path(request["configs"]), Path(request["front_end"]))
            for gen in request["gens"]}


if __name__ == "__main__":
    main(run)
