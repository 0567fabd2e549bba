"""The file names of an upstream-layout CosyVoice model directory (DESIGN.md, "Model directories").

One place for the names the reader, the exporter and the inference front end share::

    llm.pt flow.pt hift.pt                 plain state dicts (PARTS)
    cosyvoice.yaml | cosyvoice2.yaml | cosyvoice3.yaml    the upstream config (CONFIG_NAMES)
    campplus.onnx speech_tokenizer_v*.onnx spk2info.pt      upstream's front-end files
    CosyVoice-BlankEN/                     the Qwen folder of CosyVoice 2/3 (QWEN_DIR)
    speech_tokenizer_builtin.npz campplus_builtin.npz     cosytrain's built-in stand-ins
    cosytrain.json                         what cosytrain recorded about the export (METADATA_FILE)
"""

from __future__ import annotations

__all__ = [
    "PARTS",
    "CONFIG_NAMES",
    "MODEL_CONFIG_NAMES",
    "CONFIG_GENERATION",
    "ONNX_SPEECH_TOKENIZERS",
    "ONNX_CAMPPLUS",
    "SPK2INFO_FILE",
    "FRONT_END_FILES",
    "BUILTIN_TOKENIZER_FILE",
    "BUILTIN_CAMPPLUS_FILE",
    "BUILTIN_FRONT_END_FILES",
    "QWEN_DIR",
    "METADATA_FILE",
]

PARTS = ("llm", "flow", "hift")
# generation -> the config file upstream's AutoModel loads as that generation
CONFIG_NAMES = {"v1": "cosyvoice.yaml", "v2": "cosyvoice2.yaml", "v3": "cosyvoice3.yaml"}
# Upstream's AutoModel picks the first of these that exists in a model directory.
MODEL_CONFIG_NAMES = tuple(CONFIG_NAMES.values())
# The config file name is what upstream AutoModel dispatches on.
CONFIG_GENERATION = {name: generation for generation, name in CONFIG_NAMES.items()}

ONNX_SPEECH_TOKENIZERS = {"v1": "speech_tokenizer_v1.onnx", "v2": "speech_tokenizer_v2.onnx",
                          "v3": "speech_tokenizer_v3.onnx"}
ONNX_CAMPPLUS = "campplus.onnx"
SPK2INFO_FILE = "spk2info.pt"
# Files the upstream front end reads beside the weights (copied by the exporter when present).
FRONT_END_FILES = (ONNX_CAMPPLUS, *ONNX_SPEECH_TOKENIZERS.values(), SPK2INFO_FILE)
# The stand-in front ends ``cosytrain prepare`` fits beside the shards' data.list (the names
# :mod:`cosytrain.data.prepare` gives them), copied into an export made from those shards.
BUILTIN_TOKENIZER_FILE = "speech_tokenizer_builtin.npz"
BUILTIN_CAMPPLUS_FILE = "campplus_builtin.npz"
BUILTIN_FRONT_END_FILES = (BUILTIN_TOKENIZER_FILE, BUILTIN_CAMPPLUS_FILE)

QWEN_DIR = "CosyVoice-BlankEN"
METADATA_FILE = "cosytrain.json"
