"""Encoders: one modality in, `EncoderOutput(tokens (B, N, D), mask (B, N), pooled (B, D))` out.

Configs name them by string in `ENCODERS`: vision "vit", "resnet", "small_cnn" (`vision`); text
"bert", "clip_text", "rnn_text" (`text`) and the pretrained "minilm" (`mmjax.transfer.minilm`);
audio "ast", "audio_cnn" (`audio`).
"""

from mmjax.encoders.base import ENCODERS, EncoderOutput

__all__ = ["ENCODERS", "EncoderOutput"]
