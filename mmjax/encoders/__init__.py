"""Encoders: one modality in, `EncoderOutput(tokens (B, N, D), mask (B, N), pooled (B, D))` out.

Importing this package registers every encoder in `ENCODERS`, so configs name them by string:
vision "vit", "resnet", "small_cnn"; text "bert", "clip_text", "rnn_text", "minilm"; audio "ast",
"audio_cnn".
"""

from mmjax.encoders import audio, text, vision  # noqa: F401  (registration)
from mmjax.encoders.base import ENCODERS, EncoderOutput

__all__ = ["ENCODERS", "EncoderOutput", "audio", "text", "vision"]
