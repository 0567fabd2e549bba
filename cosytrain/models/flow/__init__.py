"""Flow stage (speech tokens -> mel) of CosyVoice, state-dict compatible with upstream ``cosyvoice.flow``."""

from cosytrain.models.flow.decoder import ConditionalDecoder
from cosytrain.models.flow.flow import MaskedDiffWithXvec
from cosytrain.models.flow.flow_matching import ConditionalCFM
from cosytrain.models.flow.length_regulator import InterpolateRegulator

__all__ = ["ConditionalCFM", "ConditionalDecoder", "InterpolateRegulator", "MaskedDiffWithXvec"]
