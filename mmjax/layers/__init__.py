"""Flax NNX layers with logical axis names: attention, transformer blocks, embeddings, MLP."""

from mmjax.layers.attention import MultiHeadAttention, make_attention_mask
from mmjax.layers.common import activation, dense, layer_norm, part
from mmjax.layers.embeddings import (Embed, LearnedPositions, ModalityEmbed, PatchEmbed,
                                     sincos_2d_positions, sinusoidal_positions)
from mmjax.layers.transformer import REMAT_POLICIES, DecoderBlock, Encoder, EncoderBlock, Mlp

__all__ = [
    "REMAT_POLICIES", "DecoderBlock", "Embed", "Encoder", "EncoderBlock", "LearnedPositions", "Mlp",
    "ModalityEmbed", "MultiHeadAttention", "PatchEmbed", "activation", "dense", "layer_norm",
    "make_attention_mask", "part", "sincos_2d_positions", "sinusoidal_positions",
]
