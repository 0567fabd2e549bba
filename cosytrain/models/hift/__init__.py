"""HiFT vocoder (CosyVoice 1/2/3): generator, F0 predictors, NSF source and building blocks.

Discriminators and GAN losses for vocoder training are added beside these modules.
"""

from cosytrain.models.hift.f0_predictor import CausalConvRNNF0Predictor, ConvRNNF0Predictor
from cosytrain.models.hift.generator import CausalHiFTGenerator, HiFTGenerator
from cosytrain.models.hift.weight_norm import strip_generator_prefix

__all__ = [
    "HiFTGenerator",
    "CausalHiFTGenerator",
    "ConvRNNF0Predictor",
    "CausalConvRNNF0Predictor",
    "strip_generator_prefix",
]
