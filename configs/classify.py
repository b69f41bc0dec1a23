"""Classification of your own images, audio, text or any combination (fused).

  # a folder of class subfolders (train/cat/1.jpg, train/dog/2.jpg, ...)
  python train.py --config configs/classify.py --config.input.train=data/train \
      --config.input.eval=data/val --workdir workdirs/my_classes
  # audio clips in class folders, or a manifest with image, text and label columns
  python train.py --config configs/classify.py:modality=audio --config.input.train=sounds/train ...
  python train.py --config configs/classify.py:modality=image+text --config.input.train=train.jsonl ...

Args (after the colon): size = tiny | small | default; modality = image | audio | text, or
several joined by "+" (a manifest with those columns and "label"); fusion = any name in
`mmjax.fusion.FUSIONS.names()`. Class names come from the folders or the label column (kept in
the workdir's classes.json); evaluation reports accuracy (eval/accuracy).
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train


def get_config(arg=None):
  arg = parse_arg(arg, size="default", modality="image", fusion="concat")
  modalities = arg.modality.split("+")
  unknown = sorted(set(modalities) - {"image", "audio", "text"})
  if unknown:
    raise ValueError(f"modality: {unknown} unknown; expected image, audio, text or several joined by '+'")
  c = ml_collections.ConfigDict()
  c.task = "classify"  # mmjax.tasks.user_data.UserClassification
  c.name = f"classify-{arg.modality}-{arg.size}"
  c.seed = 0
  steps, bs, image, patch, width, depth = {
      "tiny": (30, 16, 32, 8, 32, 1), "small": (2000, 64, 64, 8, 128, 2),
      "default": (10000, 128, 224, 16, 256, 6)}[arg.size]

  c.input = ml_collections.ConfigDict()
  c.input.train = ""  # a class folder, a JSONL/CSV manifest or tfds:NAME/SPLIT (required)
  c.input.eval = ""  # the same for evaluation; "" = none
  c.input.fields = {**{m: m for m in modalities}, "label": "label"}  # record field -> column

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data only
  c.data.batch_size = bs
  c.data.eval_batch_size = 16 if arg.size == "tiny" else 64
  c.data.image_size = image
  c.data.max_len = 32  # text tokens, [CLS]/[SEP] included
  c.data.audio_samples = 16000  # waveform length: clips are resampled to 16 kHz, cut or padded to 1 s
  c.data.tokenizer = ""  # "": trained on input.train's texts; or "minilm", a tokenizer folder
  c.data.vocab_size = 0  # a trained tokenizer's size at most; 0: 8192
  c.data.verify_files = True  # read every file's header before training
  c.data.worker_count = 0

  # Record -> batch, one chain per modality; `mmjax.predict` runs pp_eval on a request.
  ops, keep = [], []
  if "image" in modalities:
    ops.append("image.decode|image.resize(" + c.data.get_ref("image_size").to_str() +
               ")|image.value_range(0, 1)")
    keep.append("'image'")
  if "audio" in modalities:
    ops.append("audio.load|audio.resample(16000)|audio.pad_or_crop(samples=" +
               c.data.get_ref("audio_samples").to_str() + ")")
    keep += ["'audio'", "'audio_len'"]
  if "text" in modalities:
    ops.append("text.tokenize(" + c.data.get_ref("max_len").to_str() + ", key='text')")
    keep += ["'text_ids'", "'text_mask'"]
  pp = ops[0]
  for op in ops[1:]:
    pp = pp + "|" + op
  pp = pp + "|cast('int32', 'label')|keep(" + ", ".join(keep + ["'label'"]) + ")"
  c.input.pp_train = pp
  c.input.pp_eval = pp

  c.model = ml_collections.ConfigDict()
  c.model.name = "classifier"  # mmjax.models.classifier.MultimodalClassifier
  encoders = {
      "image": {"name": "vit", "variant": None, "width": width, "depth": depth, "heads": 4,
                "mlp_dim": 4 * width, "patch": patch, "image_size": 0},
      # Waveform in, 40-band log-mel inside the model (so serving takes raw audio).
      "audio": {"name": "audio_cnn", "features": width, "channels": (16, 32, 64), "n_mels": 40,
                "input_kind": "waveform"},
      # vocab_size 0 takes the tokenizer's.
      "text": {"name": "bert", "variant": "tiny", "vocab_size": 0, "hidden": width, "depth": depth,
               "heads": 4, "mlp_dim": 4 * width, "max_len": c.data.get_ref("max_len"),
               "dropout": 0.0, "attn_dropout": 0.0, "pooler": False},
  }
  c.model.encoders = {m: encoders[m] for m in modalities}
  c.model.fusion = arg.fusion
  c.model.fusion_kwargs = {}
  c.model.features = width
  c.model.head_hidden = None

  standard_optim_and_train(c, steps, tiny=arg.size == "tiny")
  return c
