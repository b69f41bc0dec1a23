"""Image captioning on your own image-caption pairs (a Transformer decoder or Show and Tell).

  python train.py --config configs/caption.py --config.input.train=data/train.jsonl \
      --config.input.eval=data/val.jsonl --workdir workdirs/my_captions
  python -m mmjax.predict --workdir workdirs/my_captions --image photo.jpg

Args (after the colon): size = tiny | small | default; model = transformer | show_and_tell. A
manifest line is {"image": "img/1.png", "text": "a caption"} ("text" may be a list of
references; evaluation needs the same number on every line). Evaluation decodes input.eval and
reports BLEU-1/4, ROUGE-L and CIDEr-D (eval/cider keeps the best checkpoint).
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train


def get_config(arg=None):
  arg = parse_arg(arg, size="default", model="transformer")
  c = ml_collections.ConfigDict()
  c.task = "caption"  # mmjax.tasks.user_data.UserCaptioning
  c.name = f"caption-{arg.model}-{arg.size}"
  c.seed = 0
  steps, bs, image, patch, width, depth = {
      "tiny": (30, 16, 32, 8, 32, 1), "small": (2000, 64, 64, 8, 128, 2),
      "default": (10000, 128, 224, 16, 384, 6)}[arg.size]

  c.input = ml_collections.ConfigDict()
  c.input.train = ""  # a JSONL/CSV manifest or tfds:NAME/SPLIT (required)
  c.input.eval = ""  # the same for evaluation; "" = none
  c.input.fields = {"image": "image", "captions": "text"}  # record field -> manifest column

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data only
  c.data.batch_size = bs  # images per step, one random reference caption each
  c.data.eval_batch_size = 16 if arg.size == "tiny" else 64
  c.data.image_size = image
  c.data.max_len = 16 if arg.size == "tiny" else 32  # [CLS] + words + [SEP]
  c.data.tokenizer = ""  # "": trained on input.train's captions; or "minilm", a tokenizer folder
  c.data.vocab_size = 0  # a trained tokenizer's size at most; 0: 8192
  c.data.verify_files = True  # read every file's header before training
  c.data.worker_count = 0

  # Record -> batch (training: one reference at random; evaluation: all); `mmjax.predict` runs
  # pp_eval on a request.
  image_ops = ("image.decode|image.resize(" + c.data.get_ref("image_size").to_str() +
               ")|image.value_range(0, 1)")
  tokenize = ("text.tokenize(" + c.data.get_ref("max_len").to_str() +
              ", key='captions', outkey='caption_ids', mask_key='caption_mask')")
  keep = "|keep('image', 'caption_ids', 'caption_mask')"
  c.input.pp_train = image_ops + "|choice('captions')|" + tokenize + keep
  c.input.pp_eval = image_ops + "|" + tokenize + keep

  c.model = ml_collections.ConfigDict()
  # The decoder is the model: mmjax.models.captioner.TransformerCaptioner or ShowAndTell.
  c.model.name = {"transformer": "transformer_captioner", "show_and_tell": "show_and_tell"}[arg.model]
  # A ViT's patch tokens are the decoder's memory; image_size 0 takes data.image_size.
  c.model.encoders = {"image": {"name": "vit", "variant": None, "width": width, "depth": depth,
                                "heads": 4, "mlp_dim": 4 * width, "patch": patch, "image_size": 0}}
  c.model.features = width
  c.model.dropout = 0.0
  if arg.model == "transformer":
    c.model.depth = depth
    c.model.num_heads = 4
    c.model.max_len = c.data.get_ref("max_len")  # positions: at least data.max_len
  else:
    c.model.hidden = width

  c.eval = ml_collections.ConfigDict()
  c.eval.decode = "greedy"  # or "beam"
  c.eval.beam_size = 4
  c.eval.length_penalty = 0.0

  standard_optim_and_train(c, steps, tiny=arg.size == "tiny")
  return c
