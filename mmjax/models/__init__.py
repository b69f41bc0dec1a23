"""Task models composed of encoders + fusion + heads, registered in `MODELS` by the modules below.

"vqa" (`vqa.VQAModel`), "dual_encoder" (`dual_encoder.DualEncoder`, CLIP/SigLIP), "classifier"
(`classifier.MultimodalClassifier`); the captioners `captioner.ShowAndTell` and
`captioner.TransformerCaptioner` with `decoding.generate`.
"""

from mmjax.models.vqa import MODELS

__all__ = ["MODELS"]
