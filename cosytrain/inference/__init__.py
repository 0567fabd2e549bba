"""Inference over exported (upstream-layout) model directories.

``AutoModel(model_dir)`` picks ``CosyVoice``/``CosyVoice2``/``CosyVoice3`` from the directory's yaml, as
upstream does; ``CosyVoiceModel`` is the token-level engine (LLM job, streaming token2wav).
"""

from cosytrain.inference.auto import AutoModel, CosyVoice, CosyVoice2, CosyVoice3
from cosytrain.inference.model import CosyVoiceModel

__all__ = ["AutoModel", "CosyVoice", "CosyVoice2", "CosyVoice3", "CosyVoiceModel"]
