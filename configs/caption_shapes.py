"""Image captioning on the embedded shapes_captions (Show and Tell or a Transformer decoder).

  python train.py --config configs/caption_shapes.py --workdir workdirs/caption
  python train.py --config configs/caption_shapes.py:size=small,model=show_and_tell --workdir /tmp/c
  python train.py --config configs/caption_shapes.py --config.eval.decode=beam --config.eval.beam_size=4 ...
  python -m mmjax.predict --workdir workdirs/caption --image scene.png

Args (after the colon): size = tiny | small | default; model = transformer | show_and_tell.
Evaluation decodes the test split (greedy by default) and reports BLEU-1/4, ROUGE-L and CIDEr-D;
the best checkpoint is kept by test/cider.
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train


def get_config(arg=None):
  arg = parse_arg(arg, size="default", model="transformer")
  c = ml_collections.ConfigDict()
  c.task = "caption_shapes"
  c.name = f"caption-{arg.model}-{arg.size}"
  c.seed = 0
  steps, bs, width = {"tiny": (30, 8, 32), "small": (600, 32, 64), "default": (4000, 64, 128)}[arg.size]

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.batch_size = bs  # images per step, one random reference caption each
  c.data.eval_batch_size = 8 if arg.size == "tiny" else 50
  c.data.max_len = 16  # [CLS] + words + [SEP]; the longest caption needs 14
  c.data.worker_count = 0
  c.data.eval_splits = ("test",)
  # Images per split (train, test); None = the full 9,800 / 200. Smaller counts build a
  # separate, smaller copy whose records equal the first ones of the full set.
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
  # The decoder is the model: mmjax.models.captioner.TransformerCaptioner or ShowAndTell.
  c.model.name = {"transformer": "transformer_captioner", "show_and_tell": "show_and_tell"}[arg.model]
  c.model.encoders = {"image": {"name": "small_cnn", "features": width, "channels": (32, 64, 64, 64),
                                "norm": "layer", "coords": True}}
  c.model.features = width
  c.model.dropout = 0.0
  if arg.model == "transformer":
    c.model.depth = 1 if arg.size == "tiny" else 2
    c.model.num_heads = 4
    c.model.max_len = 16  # positions: at least data.max_len
  else:
    c.model.hidden = width

  c.eval = ml_collections.ConfigDict()
  c.eval.decode = "greedy"  # or "beam"
  c.eval.beam_size = 4
  c.eval.length_penalty = 0.0

  standard_optim_and_train(c, steps, tiny=arg.size == "tiny")
  return c
