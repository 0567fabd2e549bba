"""Flow stage (speech tokens -> mel) of CosyVoice, state-dict compatible with upstream ``cosyvoice.flow``.

v1: ``MaskedDiffWithXvec`` (Conformer encoder, interpolating length regulator, ``ConditionalCFM`` with
the U-Net ``ConditionalDecoder``). v2: ``CausalMaskedDiffWithXvec`` (upsampling Conformer encoder,
``CausalConditionalCFM``, ``CausalConditionalDecoder``). v3: ``CausalMaskedDiffWithDiT`` (``DiT``).
"""

from cosytrain.models.flow.decoder import CausalConditionalDecoder, ConditionalDecoder
from cosytrain.models.flow.dit import DiT
from cosytrain.models.flow.flow import CausalMaskedDiffWithDiT, CausalMaskedDiffWithXvec, MaskedDiffWithXvec
from cosytrain.models.flow.flow_matching import CausalConditionalCFM, ConditionalCFM
from cosytrain.models.flow.length_regulator import InterpolateRegulator

__all__ = ["CausalConditionalCFM", "CausalConditionalDecoder", "CausalMaskedDiffWithDiT", "CausalMaskedDiffWithXvec",
           "ConditionalCFM", "ConditionalDecoder", "DiT", "InterpolateRegulator", "MaskedDiffWithXvec"]
