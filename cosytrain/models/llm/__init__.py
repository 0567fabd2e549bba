"""CosyVoice text-to-speech-token language models, state-dict compatible with upstream ``cosyvoice.llm.llm``.

``TransformerLM`` (CosyVoice 1) is in :mod:`~cosytrain.models.llm.transformer_lm`; ``Qwen2Encoder``,
``Qwen2LM`` (CosyVoice 2) and ``CosyVoice3LM`` (CosyVoice 3) are in :mod:`~cosytrain.models.llm.qwen_lm`
(which imports ``transformers`` only when a Qwen2 backbone is built).
"""

from cosytrain.models.llm.qwen_lm import CosyVoice3LM, Qwen2Encoder, Qwen2LM
from cosytrain.models.llm.transformer_lm import TransformerLM

__all__ = ["TransformerLM", "Qwen2Encoder", "Qwen2LM", "CosyVoice3LM"]
