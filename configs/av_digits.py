"""Audio-visual digit classification on the embedded AV digits (8x8 handwritten digit + spoken name).

  python train.py --config configs/av_digits.py --workdir workdirs/av
  python train.py --config configs/av_digits.py:size=small,fusion=gated --workdir /tmp/av
  python -m mmjax.predict --workdir workdirs/av --image digit.png --wav seven.wav

Args (after the colon): size = tiny | small | default; fusion = any name in
`mmjax.fusion.FUSIONS.names()`. The tiny size builds its own small data set (a few voices, 96
records) in a separate folder; the others use the full 3,000 / 600 records (test voices unseen
in training; the first build takes a few minutes).
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train

# A small subset of `AvDigitsConfig` for tests and smoke runs (every digit, few voices).
TINY_SUBSET = {"num_examples": (("train", 64), ("test", 32)), "train_voices": ("en-us", "en-gb"),
               "test_voices": ("en-029",), "speeds": (160,), "pitches": (50,),
               "noise_levels": (0.0, 0.1)}


def get_config(arg=None):
  arg = parse_arg(arg, size="default", fusion="concat")
  c = ml_collections.ConfigDict()
  c.task = "av_digits"
  c.name = f"av-{arg.fusion}-{arg.size}"
  c.seed = 0
  steps, bs, width = {"tiny": (30, 16, 32), "small": (400, 32, 64), "default": (2000, 64, 128)}[arg.size]

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.batch_size = bs
  c.data.eval_batch_size = 16 if arg.size == "tiny" else 100
  c.data.worker_count = 0
  c.data.eval_splits = ("test",)
  # `AvDigitsConfig` fields of a subset to build, or None for the full data set.
  c.data.subset = TINY_SUBSET if arg.size == "tiny" else None

  # Record -> model inputs and label; `mmjax.predict` runs pp_eval on a request, so a wav is
  # prepared as the data set prepared its records (16 kHz, silence 40 dB below the loudest frame
  # trimmed, 1 s), which leaves the records' own samples unchanged.
  c.input = ml_collections.ConfigDict()
  c.input.pp_eval = ("image.decode(1)|image.value_range(0, 1)|audio.load(sr=16000)|audio.resample(16000)|"
                     "audio.trim(top_db=40)|audio.pad_or_crop(samples=16000)|cast('int32', 'label')|"
                     "keep('image', 'audio', 'audio_len', 'label')")
  c.input.pp_train = c.input.pp_eval

  c.model = ml_collections.ConfigDict()
  c.model.name = "classifier"  # mmjax.models.classifier.MultimodalClassifier
  c.model.encoders = {
      "image": {"name": "small_cnn", "features": width, "channels": (32, 64), "norm": "layer",
                "in_channels": 1},
      # Waveform in, log-mel (40 bands, 25 ms / 10 ms) inside the model; the fixed normalisation
      # is the log-mel mean and standard deviation measured on the training set (-31 dB, 16 dB).
      "audio": {"name": "audio_cnn", "features": width, "channels": (16, 32, 64), "n_mels": 40,
                "input_kind": "waveform", "feature_mean": -31.0, "feature_std": 16.0},
  }
  c.model.fusion = arg.fusion
  c.model.fusion_kwargs = {}
  c.model.features = width
  c.model.head_hidden = None
  c.model.modality_dropout = 0.0 if arg.size == "tiny" else 0.2
  # The seed article's joint loss: fused head plus auxiliary unimodal heads.
  c.model.loss_weights = {"fused": 1.0, "image": 0.3, "audio": 0.3}

  standard_optim_and_train(c, steps, tiny=arg.size == "tiny")
  return c
