"""Write a config-only Qwen2 folder (a ``CosyVoice-BlankEN`` stand-in) for the tiny CosyVoice 2/3 recipes.

No pretrained Qwen weights are available offline and a tiny model need not start from any:
``cosytrain.models.llm.qwen_lm.build_qwen2`` builds a randomly initialised Qwen2 from a folder that
holds only ``config.json``. The vocabulary is the byte text tokenizer's 257 ids (the demo corpus's
``text_tokenizer: byte``), so the text embedding table is exactly as large as the ids fed to it.

    python tools/make_tiny_qwen.py conf/model/qwen2_tiny      # what the tiny recipes point at
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# hidden 64 = llm_input_size/llm_output_size of conf/model/llm_v2_tiny.yaml and llm_v3_tiny.yaml
TINY_QWEN2_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 257,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}


def write_tiny_qwen(folder: str | Path, **overrides: Any) -> Path:
    """Write ``folder/config.json`` (tiny Qwen2, overridable) and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**TINY_QWEN2_CONFIG, **overrides}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder to write config.json into")
    write_tiny_qwen(parser.parse_args().folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
