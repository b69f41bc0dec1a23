"""A config value reaches its module unchanged.

Every task config of the zoo (VQA, CLIP/SigLIP, both captioners, audio-visual digits) and of the
Sort-of-CLEVR project is built by its task as the trainer builds it, and every value of
`config.model` (each key of each encoder spec and of `fusion_kwargs` included) and the sizes the
data gives (question length, the tokenizer's vocabulary, the classes) are read back off the built
module tree: parameter shapes, layer counts, dropout rates, the attributes the forward pass reads.
A task, model or encoder that drops a key for a default of its own fails; so does a config key
this file has no reader for (add one below). Each key is also moved off its constructor's default
by some case, so that a dropped key shows.
"""

import dataclasses
import inspect
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from mmjax.encoders import ENCODERS
from mmjax.encoders.audio import AudioCNN
from mmjax.encoders.text import BERT_VARIANTS, BertEncoder, BertSpec, RnnTextEncoder
from mmjax.encoders.vision import SmallCNN
from mmjax.fusion import FUSIONS
from mmjax.fusion.cross_attention import CrossAttentionFusion
from mmjax.layers.transformer import EncoderBlock
from mmjax.models import MODELS
from mmjax.models.captioner import ShowAndTell, TransformerCaptioner
from mmjax.models.classifier import MultimodalClassifier
from mmjax.models.dual_encoder import DualEncoder
from mmjax.models.vqa import VQAModel
from mmjax.projects.sort_of_clevr.model import UniqueQuestionsVQA
from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = "configs/vqa.py"
PROJECT = "mmjax/projects/sort_of_clevr/configs/vqa.py"
CLIP = "configs/clip_shapes.py"
CAPTION = "configs/caption_shapes.py"
AV = "configs/av_digits.py"


def _one(values, what):
  """The value every layer agrees on."""
  values = [_plain(v) for v in values]
  assert values and all(v == values[0] for v in values), f"{what} differs between layers: {values}"
  return values[0]


def _plain(v):
  """Config and module values in one form: tuples for sequences, dicts for mappings, Python scalars."""
  if isinstance(v, (list, tuple)):
    return tuple(_plain(x) for x in v)
  if hasattr(v, "items"):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, np.generic) or (isinstance(v, (np.ndarray, jax.Array)) and v.shape == ()):
    return v.item()
  return v


def _norm_kind(norm) -> str:
  return {nnx.BatchNorm: "batch", nnx.GroupNorm: "group", nnx.LayerNorm: "layer",
          type(None): "none"}[type(norm)]


def _blocks(blocks) -> dict:
  """Hyperparameters every `EncoderBlock` of `blocks` shares."""
  assert all(isinstance(b, EncoderBlock) for b in blocks)
  return {"num_heads": _one([b.attn.num_heads for b in blocks], "heads"),
          "mlp_dim": _one([b.mlp.fc1.kernel.shape[1] for b in blocks], "mlp width"),
          "dropout": _one([b.dropout.rate for b in blocks] + [b.mlp.dropout.rate for b in blocks],
                          "dropout"),
          "attn_dropout": _one([b.attn.dropout.rate for b in blocks], "attention dropout"),
          "norm": _one([b.norm for b in blocks], "norm")}


# -- readers: a built module -> {constructor argument: the value it was built with} --------------
def read_small_cnn(m: SmallCNN) -> dict:
  convs = [layer.conv for layer in m.layers]
  channels = tuple(c.kernel.shape[-1] for c in convs)
  out = {"features": m.proj.kernel.shape[1], "channels": channels,
         "kernel_size": _one([c.kernel.shape[0] for c in convs], "kernel size"),
         "norm": _one([_norm_kind(layer.norm) for layer in m.layers], "norm"),
         "coords": m.coords, "coord_freqs": m.coord_freqs, "in_channels": m.in_channels,
         "depth": 0 if m.encoder is None else len(m.encoder.layers)}
  # The projection reads the last conv's channels and the coordinates the forward pass appends.
  assert m.proj.kernel.shape[0] == channels[-1] + 2 * m.coords + 4 * m.coord_freqs
  if out["norm"] == "group":
    out["norm_groups"] = _one([layer.norm.num_groups for layer in m.layers], "groups")
  if m.encoder is not None:
    blocks = _blocks(m.encoder.layers)
    out["num_heads"] = blocks["num_heads"]
    out["mlp_ratio"] = blocks["mlp_dim"] // out["features"]
    assert blocks["mlp_dim"] == out["mlp_ratio"] * out["features"]
  first_in = convs[0].kernel.shape[2]
  if hasattr(m, "pixel_freqs"):  # the project's encoder: C (1 + 2K) channels into the first conv
    out["pixel_freqs"] = (first_in // m.in_channels - 1) // 2
    assert first_in == m.in_channels * (1 + 2 * m.pixel_freqs) == m.in_channels * (1 + 2 * out["pixel_freqs"])
  else:
    assert first_in == m.in_channels
  return out


def read_bert(m: BertEncoder) -> dict:
  vocab, hidden = m.word_embed.embedding.shape
  blocks = _blocks(m.encoder.layers)
  assert _one([m.embed_dropout.rate, blocks["dropout"]], "dropout") == blocks["dropout"]
  return {"vocab_size": vocab, "hidden": hidden, "depth": len(m.encoder.layers),
          "heads": blocks["num_heads"], "mlp_dim": blocks["mlp_dim"],
          "max_len": m.position_embed.embedding.shape[0],
          "type_vocab": m.type_embed.embedding.shape[0], "dropout": blocks["dropout"],
          "attn_dropout": blocks["attn_dropout"], "pooler": m.pooler is not None, "pool": m.pool,
          "ln_eps": m.embed_norm.epsilon}


def read_rnn_text(m: RnnTextEncoder) -> dict:
  vocab, features = m.embed.embedding.shape
  return {"vocab_size": vocab, "features": features, "hidden": m.hidden, "cell": m.cell,
          "bidirectional": m.bidirectional, "num_layers": len(m.layers), "pool": m.pool,
          "pool_heads": None if m.attend is None else m.attend.num_heads,
          "embed_skip": m.skip is not None, "dropout": m.dropout.rate}


def read_audio_cnn(m: AudioCNN) -> dict:
  convs = [stage.conv for stage in m.stages]
  assert convs[0].kernel.shape[2] == 1 and all(
      a.kernel.shape[-1] == b.kernel.shape[2] for a, b in zip(convs, convs[1:]))
  return {"features": m.proj.kernel.shape[1], "channels": tuple(c.kernel.shape[-1] for c in convs),
          "n_mels": m.n_mels, "input_kind": m.input_kind, "feature_mean": m.feature_mean,
          "feature_std": m.feature_std}


def read_cross_attention(m: CrossAttentionFusion) -> dict:
  streams = [s for layer in m.layers for s in layer.streams.values()]
  crosses = [layer.cross for layer in m.layers]
  blocks = _blocks(streams)
  out = {"features": m.features, "depth": len(m.layers),
         "num_heads": _one([blocks["num_heads"]] + [c.num_heads for c in crosses], "heads"),
         "mlp_dim": blocks["mlp_dim"],
         "norm": _one([blocks["norm"]] + [layer.norm for layer in m.layers], "norm"),
         "update": _one([m.update] + [layer.update for layer in m.layers], "update"),
         "pool": m.pool,
         "dropout": _one([blocks["dropout"]] + [layer.dropout.rate for layer in m.layers], "dropout"),
         "attn_dropout": _one([blocks["attn_dropout"]] + [c.dropout.rate for c in crosses],
                              "attention dropout"),
         "qk_scale": _one([round(c.scale * math.sqrt(c.head_dim), 6) for c in crosses], "qk_scale"),
         "attention_maps": m.attention_maps}
  if hasattr(m, "spatial"):  # the project's distance-biased block: its scales live from layer 1 on
    out["spatial"] = m.spatial
    hop = m.layers[1]
    out["revisit"] = hop.revisit_scale is not None
    signs = np.where(np.arange(out["num_heads"]) % 2 == 0, -1.0, 1.0)
    (dist,) = hop.distance_scale.values()  # one per stream attending over the grid
    out["distance_init"] = float(np.round(np.asarray(dist.bias[...]) * signs, 6)[0])
    assert np.allclose(np.asarray(dist.bias[...]) * signs, out["distance_init"])
    if out["revisit"]:
      (rev,) = hop.revisit_scale.values()
      out["revisit_init"] = _one(np.round(np.asarray(rev.bias[...]), 6).tolist(), "revisit_init")
  return out


def read_film(m) -> dict:
  return {"condition": m.condition}


def read_relation(m) -> dict:
  return {"query": m.query}


def read_flat_concat(m) -> dict:
  return {"flatten": dict(m.flatten)}


ENCODER_READERS = {"small_cnn": read_small_cnn, "bert": read_bert, "rnn_text": read_rnn_text,
                   "audio_cnn": read_audio_cnn,
                   "mmjax.projects.sort_of_clevr.model:pixel_freq_cnn": read_small_cnn}
FUSION_READERS = {"cross_attention": read_cross_attention, "film": read_film,
                  "relation": read_relation,
                  "mmjax.projects.sort_of_clevr.fusion:distance_cross_attention": read_cross_attention,
                  "mmjax.projects.sort_of_clevr.model:flat_concat": read_flat_concat}


def _check(where: str, read: dict, wanted: dict) -> None:
  """Every key of `wanted` (config values) equals what was read off the module."""
  missing = sorted(set(wanted) - set(read))
  assert not missing, f"{where}: no reader for config key(s) {missing}; add them to this test"
  for key, value in wanted.items():
    got = read[key]
    if isinstance(value, float):
      assert got == pytest.approx(value, rel=1e-6), f"{where}.{key}: built {got!r}, config {value!r}"
    else:
      assert _plain(got) == _plain(value), f"{where}.{key}: built {got!r}, config {value!r}"


def _defaults(cls) -> dict:
  """The constructor defaults of `cls`, a subclass's over its parents'."""
  out = {}
  for klass in reversed(cls.__mro__):
    if "__init__" in vars(klass):
      params = inspect.signature(vars(klass)["__init__"]).parameters.values()
      out.update({p.name: p.default for p in params if p.default is not p.empty})
  return out


def check_encoder(where: str, module, spec: dict, task) -> list:
  """Checks an encoder spec against the built encoder; returns its (key, value, default)s."""
  spec = dict(spec)
  name = spec.pop("name")
  cls = ENCODERS.get(name)
  assert type(module) is cls, f"{where}: built {type(module).__name__}, config {name!r}"
  defaults = _defaults(cls)
  if spec.get("vocab_size") == 0:  # 0: the task's tokenizer's vocabulary
    spec["vocab_size"] = task.tokenizer.vocab_size
  if not spec:
    return []
  read = ENCODER_READERS[name](module)
  variant = spec.pop("variant", None)
  if cls is BertEncoder:  # a field the config leaves out comes from the named variant
    base = {f.name: f.default for f in dataclasses.fields(BertSpec)}
    defaults.update({**base, **BERT_VARIANTS[variant or defaults["variant"]]})
    _check(where, read, {**{k: v for k, v in defaults.items() if k in base and k in read}, **spec})
    spec["variant"] = variant
  else:
    _check(where, read, spec)
  return [(f"{where}.{k}", v, defaults.get(k)) for k, v in spec.items()]


def _dtype(model) -> str:
  """The compute dtype every Dense layer of `model` shares."""
  linears = [x for _, x in nnx.iter_graph(model) if isinstance(x, nnx.Linear)]
  return np.dtype(_one([x.dtype for x in linears], "dtype")).name


# Model class -> {config.model key: the value the built model holds}; a subclass reads its
# parents' keys too. "name", "encoders", "fusion" and "fusion_kwargs" are read for every model.
MODEL_READERS = {
    VQAModel: {"features": lambda m: m.fusion.features,
               "head_hidden": lambda m: m.head.fc1.kernel.shape[1],
               "modality_dropout": lambda m: m.modality_dropout,
               "question_tokens": lambda m: m.question_tokens, "dtype": _dtype},
    UniqueQuestionsVQA: {"unique_questions": lambda m: m.unique_questions},
    DualEncoder: {"embed_dim": lambda m: _one([m.proj[t].kernel.shape[1] for t in m.names], "embed_dim"),
                  "loss_type": lambda m: m.loss_type},
    MultimodalClassifier: {
        "features": lambda m: m.fusion.features,
        "head_hidden": lambda m: None if isinstance(m.head, nnx.Linear) else m.head.fc1.kernel.shape[1],
        "modality_dropout": lambda m: m.modality_dropout, "loss_weights": lambda m: m.loss_weights},
    TransformerCaptioner: {
        "features": lambda m: m.embed.embedding.shape[1], "depth": lambda m: len(m.layers),
        "num_heads": lambda m: _one([b.self_attn.num_heads for b in m.layers] +
                                    [b.cross_attn.num_heads for b in m.layers], "heads"),
        "max_len": lambda m: m.positions.embedding.shape[0],
        "dropout": lambda m: _one([m.dropout.rate] + [b.dropout.rate for b in m.layers], "dropout")},
    ShowAndTell: {"features": lambda m: m.embed.embedding.shape[1],
                  "hidden": lambda m: _one([m.hidden, m.head.kernel.shape[0]], "hidden"),
                  "dropout": lambda m: m.dropout.rate},
}


def data_sizes(model, task, config) -> None:
  """The constructor arguments the task takes from its data equal the data's."""
  if isinstance(model, VQAModel):
    assert model.head.fc2.kernel.shape[1] == len(task.answers)
    assert model.question_len == config.data.max_len
  elif isinstance(model, MultimodalClassifier):
    head = model.head if isinstance(model.head, nnx.Linear) else model.head.fc2
    assert head.kernel.shape[1] == model.num_classes == len(task.classes)
  elif isinstance(model, (ShowAndTell, TransformerCaptioner)):
    assert model.embed.embedding.shape[0] == model.vocab_size == task.tokenizer.vocab_size


def check_model(config) -> list:
  """Builds `config`'s model as the trainer does and compares it with every model value; returns
  (key, value, constructor default) of each value checked."""
  task = TASKS.get(config.task)(config)
  seed = int(config.seed)
  model = task.build_model(nnx.Rngs(params=seed, dropout=seed + 1))
  m = config.model
  assert type(model) is MODELS.get(m.name), f"model.name: built {type(model).__name__}, config {m.name!r}"
  defaults = _defaults(type(model))
  readers = {}
  for klass in reversed(type(model).__mro__):
    readers.update(MODEL_READERS.get(klass, {}))
  shown = []

  def encoders(v):
    assert set(model.encoders) == set(v), f"model.encoders: built {list(model.encoders)}, config {list(v)}"
    for modality, spec in v.items():
      shown.extend(check_encoder(f"model.encoders.{modality}", model.encoders[modality], spec, task))

  def fusion_kwargs(v):
    _check(f"model.fusion_kwargs ({m.fusion})", FUSION_READERS[m.fusion](model.fusion) if v else {}, dict(v))
    fusion_defaults = _defaults(FUSIONS.get(m.fusion))
    shown.extend((f"model.fusion_kwargs({m.fusion}).{k}", x, fusion_defaults.get(k))
                 for k, x in dict(v).items())

  checks = {
      "name": lambda v: None,  # the class, above
      "encoders": encoders,
      "fusion": lambda v: _check("model", {"fusion": type(model.fusion)}, {"fusion": FUSIONS.get(v)}),
      "fusion_kwargs": fusion_kwargs,
  }
  unread = sorted(set(m) - set(checks) - set(readers))
  assert not unread, f"no check for config.model key(s) {unread} of {type(model).__name__}; add them here"
  for key in m:
    if key in checks:
      checks[key](m[key])
    else:
      _check("model", {key: readers[key](model)}, {key: m[key]})
      shown.append((f"model.{key}", m[key], defaults.get(key)))
  data_sizes(model, task, config)
  return shown


def _config(path: str, arg: str, overrides: tuple, data_dir: str):
  """PATH:ARG with `overrides`, on the data of PATH:size=tiny (the tiny data sets' tokenizers have
  the full ones' vocabulary, as docs/model_zoo.py relies on)."""
  config = load_config(f"{ROOT / path}:{arg}", overrides)
  config.data.data_dir = data_dir
  if "num_images" in config.data:
    config.data.num_images = load_config(f"{ROOT / path}:size=tiny").data.num_images
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / "task_data")  # the folder tests/test_tasks.py fills


# Per config file: (argument, overrides) built and checked. The overriding cases move every value
# that equals its constructor's default elsewhere, so that a dropped key shows.
CASES = {
    ZOO: [
        ("size=default", ()), ("size=tiny", ()), ("size=default,fusion=film", ()),
        ("size=tiny", ("model.encoders.image.norm_groups=4", "model.encoders.image.num_heads=2",
                       "model.encoders.image.mlp_ratio=3", "model.encoders.text.depth=1",
                       "model.encoders.text.heads=2", "model.question_tokens=pooled",
                       "model.fusion_kwargs.depth=3", "model.fusion_kwargs.num_heads=2",
                       "model.fusion_kwargs.norm=pre", "model.fusion_kwargs.update=('text',)",
                       "model.fusion_kwargs.pool=concat", "model.fusion_kwargs.dropout=0.1",
                       "model.fusion_kwargs.attn_dropout=0.1", "model.modality_dropout=0.1",
                       "model.dtype=bfloat16")),
    ],
    PROJECT: [
        ("size=default", ()), ("size=tiny", ()), ("size=default,text=bert", ()),
        ("size=default,fusion=flat_concat", ()), ("size=default,fusion=relation", ()),
        ("size=tiny", ("model.encoders.image.norm_groups=4", "model.encoders.image.pixel_freqs=1",
                       "model.encoders.text.pool_heads=2", "model.fusion_kwargs.depth=3",
                       "model.modality_dropout=0.1", "model.dtype=bfloat16")),
        ("size=tiny,fusion=relation", ("model.fusion_kwargs.query=image",)),
        ("size=tiny,fusion=film", ("model.fusion_kwargs.condition=image",)),
    ],
    CLIP: [("size=tiny", ()), ("size=default,loss=siglip", ())],
    CAPTION: [
        ("size=default,model=transformer", ()),
        ("size=tiny,model=transformer", ("model.num_heads=2", "model.dropout=0.1")),
        ("size=tiny,model=show_and_tell", ("model.dropout=0.1",)),
    ],
    AV: [
        ("size=default", ()),
        ("size=tiny", ("model.head_hidden=16", "model.modality_dropout=0.2")),
    ],
}


@pytest.mark.parametrize("path", list(CASES), ids=["zoo_vqa", "project_vqa", "clip", "caption", "av"])
def test_config_values_reach_the_built_model(path, data_dir):
  shown = {}  # key -> whether some case's value differs from the constructor default
  for arg, overrides in CASES[path]:
    for key, value, default in check_model(_config(path, arg, overrides, data_dir)):
      shown[key] = shown.get(key, False) or _plain(value) != _plain(default)
  stuck = [k for k, ok in shown.items() if not ok]
  assert not stuck, f"no case moves these keys off their constructor's default: {stuck}"


def test_a_value_the_model_ignores_fails(data_dir):
  """The comparison fails when a built value differs from the config's (here: the config says
  one cross-modality layer more than was built), and on a key it cannot read."""
  config = _config(ZOO, "size=tiny", (), data_dir)
  model = TASKS.get(config.task)(config).build_model(nnx.Rngs(0))
  wanted = dict(config.model.fusion_kwargs, depth=config.model.fusion_kwargs.depth + 1)
  with pytest.raises(AssertionError, match=r"fusion_kwargs \(cross_attention\)\.depth: built"):
    _check("model.fusion_kwargs (cross_attention)", read_cross_attention(model.fusion), wanted)
  with pytest.raises(AssertionError, match="no reader for config key"):
    _check("model.encoders.image", read_small_cnn(model.encoders["image"]), {"brightness": 1.0})


@pytest.mark.parametrize("path", list(CASES), ids=["zoo_vqa", "project_vqa", "clip", "caption", "av"])
def test_a_model_key_is_a_constructor_argument(path, data_dir):
  """`config.model` goes to the constructor as is: a key it lacks is a TypeError naming the config
  path, and a size the data gives cannot be set in the config."""
  arg = "size=tiny,model=show_and_tell" if path == CAPTION else "size=tiny"
  config = _config(path, arg, (), data_dir)
  config.model.heads_hidden = 8  # a typo of a real argument
  task = TASKS.get(config.task)(config)
  with pytest.raises(TypeError, match=r"model\.heads_hidden: \w+ has no argument 'heads_hidden'"):
    task.build_model(nnx.Rngs(0))
  del config.model.heads_hidden
  data_key = {ZOO: "num_answers", PROJECT: "question_len", CLIP: "input_examples", CAPTION: "vocab_size",
              AV: "num_classes"}[path]
  config.model[data_key] = 3
  with pytest.raises(ValueError, match=f"model.{data_key}: set by the task from its data"):
    task.build_model(nnx.Rngs(0))


def test_command_line_config_arguments_load_through_load_config():
  """train.py and the planner take --config and --config.KEY overrides (both `=` and space forms)
  out of the command line and load them with load_config, as notebooks and tests do."""
  from mmjax.train.config import load_config, split_config_args
  argv = ["train.py", "--config", "configs/vqa.py:size=tiny", "--workdir=/tmp/w", "--config.optim.lr=3e-4",
          "--config.train.steps", "7", "--config.data.eval_splits=('test',)", "--distributed", "false"]
  spec, overrides, rest = split_config_args(argv)
  assert spec == "configs/vqa.py:size=tiny"
  assert overrides == ["optim.lr=3e-4", "train.steps=7", "data.eval_splits=('test',)"]
  assert rest == ["train.py", "--workdir=/tmp/w", "--distributed", "false"]
  c = load_config(spec, overrides + ["train.max_minutes=0", "model.fusion_kwargs.dropout=0"])
  assert (c.optim.lr, c.train.steps, tuple(c.data.eval_splits)) == (3e-4, 7, ("test",))
  assert isinstance(c.model.fusion_kwargs.dropout, float)
  with pytest.raises(KeyError, match="train.stepz"):
    load_config(spec, ["train.stepz=3"])


def test_command_line_config_errors_name_the_script():
  """A missing --config, a --config without a value and an unknown key end the script with one line
  naming it (not a traceback); a good command line loads."""
  from mmjax.train.config import CommandLineConfig
  cli = CommandLineConfig("train.py")
  for argv, message in [(["train.py"], "train.py: --config is required"),
                        (["train.py", "--config"], "train.py: --config: expected a value")]:
    with pytest.raises(SystemExit, match=message):
      cli.parse(argv)
  assert cli.parse(["train.py", "--config=configs/vqa.py:size=tiny", "--config.train.steps", "7"]) == ["train.py"]
  assert cli.load().train.steps == 7
  cli.parse(["train.py", "--config=configs/vqa.py:size=tiny", "--config.train.stepz=7"])
  with pytest.raises(SystemExit, match="train.py: config: .*train.stepz"):
    cli.load()
