"""Task models composed of encoders + fusion + heads, registered in `MODELS` by the modules below.

"vqa" (`vqa.VQAModel`), "dual_encoder" (`dual_encoder.DualEncoder`, CLIP/SigLIP), "classifier"
(`classifier.MultimodalClassifier`), the captioners "show_and_tell" (`captioner.ShowAndTell`) and
"transformer_captioner" (`captioner.TransformerCaptioner`) with `decoding.generate`. Tasks build
them from `config.model` with `base.build_model` (the schema is in `base`'s docstring).
"""

from mmjax.models.base import MODELS, build_model

__all__ = ["MODELS", "build_model"]
