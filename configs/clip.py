"""CLIP (softmax) or SigLIP (sigmoid) on your own image-caption pairs; recall@K both ways.

  python train.py --config configs/clip.py --config.input.train=data/train.jsonl \
      --config.input.eval=data/val.jsonl --workdir workdirs/my_clip
  # fine-tune a Hugging Face CLIP or SigLIP folder: its config.json gives the architecture
  python train.py --config configs/clip.py:loss=siglip --config.model_init=/ckpt/siglip-base-patch16-224 \
      --config.optim.lr=1e-5 --config.input.train=... --workdir ...

Args (after the colon): size = tiny | small | default; loss = clip | siglip. A manifest line is
{"image": "img/1.png", "text": "a caption"} ("text" may be a list of captions; other column
names: --config.input.fields.captions=caption). docs/your_data.md walks through it.
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train

# CLIP's (OpenAI's) image normalisation, after value_range(0, 1); SigLIP maps pixels to [-1, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(arg=None):
  arg = parse_arg(arg, size="default", loss="clip")
  c = ml_collections.ConfigDict()
  c.task = "clip"  # mmjax.tasks.user_data.UserCLIP
  c.name = f"clip-{arg.loss}-{arg.size}"
  c.seed = 0
  steps, bs, image, patch, width, depth, heads = {
      "tiny": (30, 16, 32, 8, 32, 1, 2), "small": (1000, 64, 64, 8, 128, 4, 4),
      "default": (10000, 256, 224, 16, 384, 12, 6)}[arg.size]

  c.input = ml_collections.ConfigDict()
  c.input.train = ""  # a JSONL/CSV manifest or tfds:NAME/SPLIT (required)
  c.input.eval = ""  # the same for evaluation; "" = none
  c.input.fields = {"image": "image", "captions": "text"}  # record field -> manifest column

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data only
  c.data.batch_size = bs  # image-caption pairs per step: the contrastive batch
  c.data.eval_batch_size = 16 if arg.size == "tiny" else 64
  c.data.image_size = image  # images are resized to image_size x image_size
  c.data.max_len = 16 if arg.size == "tiny" else 32  # caption tokens, [CLS]/[SEP] included
  c.data.tokenizer = ""  # "": the pretrained text tower's, else trained on input.train
  c.data.vocab_size = 0  # a trained tokenizer's size at most; 0: the text tower's
  c.data.verify_files = True  # read every file's header before training
  c.data.worker_count = 0

  # Record -> batch; `mmjax.predict` runs pp_eval on a request. Training reads one caption at
  # random, evaluation all of them.
  size = c.data.get_ref("image_size").to_str()
  norm = (f"image.value_range(0, 1)|image.normalize({CLIP_MEAN}, {CLIP_STD})" if arg.loss == "clip"
          else "image.value_range(-1, 1)")
  image_ops = "image.decode|image.resize(" + size + ")|" + norm
  tokenize = ("text.tokenize(" + c.data.get_ref("max_len").to_str() +
              ", key='captions', outkey='caption_ids', mask_key='caption_mask')")
  keep = "|keep('image', 'caption_ids', 'caption_mask')"
  c.input.pp_train = image_ops + "|choice('captions')|" + tokenize + keep
  c.input.pp_eval = image_ops + "|" + tokenize + keep

  # Towers in the Hugging Face CLIP (or SigLIP) layout, so `mmjax.export` writes a CLIPModel
  # (SiglipModel); 0 values come from the data (image_size, the tokenizer's vocab_size and end
  # token). A whole-model CLIP/SigLIP checkpoint in model_init replaces them by its own.
  c.model = ml_collections.ConfigDict()
  c.model.name = "dual_encoder"  # mmjax.models.dual_encoder.DualEncoder
  vit = {"name": "vit", "variant": None, "width": width, "depth": depth, "heads": heads,
         "mlp_dim": 4 * width, "patch": patch, "image_size": 0}
  text = {"name": "clip_text", "vocab_size": 0, "hidden": width, "depth": depth, "heads": heads,
          "mlp_dim": 4 * width, "max_len": c.data.get_ref("max_len")}
  if arg.loss == "clip":
    vit.update(pre_norm=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5)
    text.update(eos_id=0)
    c.model.projection = True
  else:  # SigLIP: attention-pooled image tower, text pooled at the last position with a head
    vit.update(pool="map", act="gelu_tanh")
    text.update(causal=False, pool="last", out_dim=width, act="gelu_tanh", ln_eps=1e-6)
    c.model.projection = False
  c.model.encoders = {"image": vit, "text": text}
  c.model.embed_dim = width
  c.model.loss_type = arg.loss

  standard_optim_and_train(c, steps, tiny=arg.size == "tiny")
  return c
