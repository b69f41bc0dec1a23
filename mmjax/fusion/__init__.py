"""Fusion blocks: one family per file, all behind `FusionBlock`'s interface and the `FUSIONS` registry.

Build one by name with `build_fusion("film", modalities={"image": 64, "text": 32}, features=64,
rngs=nnx.Rngs(0), condition="text")` and call it as `block(inputs, presence)`; see `base.py`.
Families: `bottleneck`, `cross_attention`, `film`, `gated`, `late`, `lmf`, `relation`,
`single_stream`, `tfn` (each module registers its blocks; `FUSIONS` imports them on first lookup).
"""

from mmjax.fusion.base import (FUSIONS, FusionBlock, FusionInputs, FusionOutput, build_fusion,
                               full_presence, masked_mean, modality_dropout, prepare_inputs)

__all__ = [
    "FUSIONS", "FusionBlock", "FusionInputs", "FusionOutput", "build_fusion", "full_presence",
    "masked_mean", "modality_dropout", "prepare_inputs",
]
