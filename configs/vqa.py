"""LXMERT-style two-stream VQA (Tan & Bansal 2019) on the embedded Sort-of-CLEVR.

  python train.py --config configs/vqa.py:size=tiny --workdir /tmp/vqa
  python train.py --config configs/vqa.py:size=small,fusion=film --workdir /tmp/vqa_film
  python train.py --config configs/vqa.py --config.optim.lr=3e-4 --workdir workdirs/vqa

Args (after the colon): size = tiny | small | default; fusion = any name in
`mmjax.fusion.FUSIONS.names()`, or "package.module:name" for a block of your own package (built
with its constructor's defaults).

The model is LXMERT's three encoders from the zoo's general parts: an object-relationship encoder
(a small CNN's grid cells with their coordinates, then self-attention over them), a BERT-style
language encoder whose every question token reaches the fusion, and the cross-modality encoder
(`fusion="cross_attention"`: both streams attend to each other through one shared cross-attention,
then self-attention and an MLP each, post-LN), read out by LXMERT's answer head. The
Sort-of-CLEVR project's task supplies the data, the loss and the per-kind accuracy.
"""

import ml_collections

from mmjax.projects.sort_of_clevr.configs import vqa as sort_of_clevr
from mmjax.train.config import parse_arg, standard_optim_and_train

FUSION_KWARGS = {
    # LXMERT's cross-modality layers; no dropout: the data set is large for a model this size.
    "cross_attention": {"depth": 2, "num_heads": 4, "mlp_dim": 128, "norm": "post",
                        "update": ("image", "text"), "pool": "mean", "dropout": 0.0,
                        "attn_dropout": 0.0},
}


def get_config(arg=None):
  arg = parse_arg(arg, size="default", fusion="cross_attention")
  c = ml_collections.ConfigDict()
  c.task = "mmjax.projects.sort_of_clevr.task:vqa_sort_of_clevr"
  c.name = f"vqa-lxmert-{arg.fusion}-{arg.size}"
  c.seed = 0
  steps, bs, width = {"tiny": (20, 8, 32), "small": (600, 32, 64), "default": (6000, 32, 64)}[arg.size]

  sort_of_clevr.add_data(c, arg.size, bs)  # the data set's data and input sections, as the project's

  c.model = ml_collections.ConfigDict()
  c.model.name = "vqa"  # mmjax.models.vqa.VQAModel
  c.model.encoders = {
      # Four stride-2 convs give a 5x5 grid (the image stream is updated per question, so its
      # length sets the cost); the cells' (x, y) make positions readable; self-attention relates
      # the cells.
      "image": {"name": "small_cnn", "features": width, "channels": (32, 32, 32, 32),
                "norm": "group", "norm_groups": 8, "coords": True, "depth": 2, "num_heads": 4,
                "mlp_ratio": 2},
      # BERT's layout at a small width; vocab_size 0 takes the task's tokenizer's, max_len
      # (positions) follows data.max_len; no pooler: the fusion reads every token.
      "text": {"name": "bert", "variant": "tiny", "vocab_size": 0, "hidden": width // 2, "depth": 2,
               "heads": 4, "mlp_dim": width, "max_len": c.data.get_ref("max_len"), "dropout": 0.0,
               "attn_dropout": 0.0, "pooler": False},
  }
  c.model.question_tokens = "all"  # as LXMERT: the fusion reads every question token
  c.model.fusion = arg.fusion
  c.model.fusion_kwargs = FUSION_KWARGS.get(arg.fusion, {})
  c.model.features = width
  c.model.head_hidden = 2 * width
  c.model.modality_dropout = 0.0
  c.model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 on f32 master weights

  standard_optim_and_train(c, steps, tiny=False)
  # The default size stops (evaluates, saves) at 30 minutes; --config.train.max_minutes=0 lifts it.
  c.train.max_minutes = 30.0 if arg.size == "default" else None
  return c
