"""Flax NNX layers with logical axis names: attention, transformer blocks, embeddings, MLP."""

from mmjax.layers.attention import (ATTENTION_KERNELS, MultiHeadAttention, make_attention_mask,
                                    record_attention)
from mmjax.layers.common import activation, dense, layer_norm, part
from mmjax.layers.embeddings import (Embed, LearnedPositions, ModalityEmbed, PatchEmbed,
                                     sincos_2d_positions, sinusoidal_positions)
from mmjax.layers.transformer import REMAT_POLICIES, DecoderBlock, Encoder, EncoderBlock, Mlp

__all__ = [
    "ATTENTION_KERNELS", "REMAT_POLICIES", "DecoderBlock", "Embed", "Encoder", "EncoderBlock",
    "LearnedPositions", "Mlp", "ModalityEmbed", "MultiHeadAttention", "PatchEmbed", "activation",
    "dense", "layer_norm", "make_attention_mask", "part", "record_attention", "sincos_2d_positions",
    "sinusoidal_positions",
]
