"""Task models composed of encoders + fusion + heads; importing registers them in `MODELS`.

"vqa" (VQAModel), "dual_encoder" (CLIP/SigLIP), "classifier" (MultimodalClassifier); the
captioners `ShowAndTell` and `TransformerCaptioner` with `decoding.generate`.
"""

from mmjax.models import captioner, classifier, decoding, dual_encoder, vqa
from mmjax.models.vqa import MODELS

__all__ = ["MODELS", "captioner", "classifier", "decoding", "dual_encoder", "vqa"]
