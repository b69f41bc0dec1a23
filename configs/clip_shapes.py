"""CLIP (or SigLIP) on the embedded shapes_captions: image and caption towers, recall@K both ways.

  python train.py --config configs/clip_shapes.py --workdir workdirs/clip
  python train.py --config configs/clip_shapes.py:size=small,loss=siglip --workdir /tmp/clip
  python train.py --config configs/clip_shapes.py --config.optim.lr=3e-4 ...

Args (after the colon): size = tiny | small | default; loss = clip | siglip.
Evaluation embeds the test images and all five captions of each, and reports image->text and
text->image recall@1/5 and their sum (rsum, which keeps the best checkpoint).
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train


def get_config(arg=None):
  arg = parse_arg(arg, size="default", loss="clip")
  c = ml_collections.ConfigDict()
  c.task = "clip_shapes"
  c.name = f"clip-{arg.loss}-{arg.size}"
  c.seed = 0
  steps, bs, width = {"tiny": (30, 16, 32), "small": (600, 64, 64), "default": (4000, 128, 128)}[arg.size]

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.batch_size = bs  # image-caption pairs per step: the contrastive batch
  c.data.eval_batch_size = 8 if arg.size == "tiny" else 50
  c.data.max_len = 16
  c.data.worker_count = 0
  c.data.eval_splits = ("test",)
  # Images per split (train, test); None = the full 9,800 / 200.
  c.data.num_images = (64, 16) if arg.size == "tiny" else None

  # Record -> model inputs and targets (training: one of the five captions at random; evaluation:
  # all five); `mmjax.predict` runs pp_eval on a request. Captions are cut to data.max_len tokens.
  tokenize = ("text.tokenize(" + c.data.get_ref("max_len").to_str() +
              ", key='captions', outkey='caption_ids', mask_key='caption_mask')")
  c.input = ml_collections.ConfigDict()
  c.input.pp_train = ("image.decode|image.value_range(0, 1)|choice('captions')|" + tokenize +
                      "|keep('image', 'caption_ids', 'caption_mask')")
  c.input.pp_eval = ("image.decode|image.value_range(0, 1)|" + tokenize +
                     "|keep('image', 'caption_ids', 'caption_mask')")

  c.model = ml_collections.ConfigDict()
  c.model.name = "dual_encoder"  # mmjax.models.dual_encoder.DualEncoder
  c.model.encoders = {  # the towers; vocab_size 0 takes the task's tokenizer's
      "image": {"name": "small_cnn", "features": width, "channels": (32, 64, 64, 64),
                "norm": "layer", "coords": True},
      "text": {"name": "rnn_text", "vocab_size": 0, "features": width, "hidden": width},
  }
  c.model.embed_dim = width
  c.model.loss_type = arg.loss

  standard_optim_and_train(c, steps, tiny=arg.size == "tiny")
  return c
