"""Tasks over your own data, chosen and fed by the config alone: image-text contrastive learning
("clip"), captioning ("caption"), open-ended VQA ("vqa_open") and classification of images,
audio, text or any combination of them ("classify").

Sources, `config.input.train` and `config.input.eval` (eval "" = no evaluation):
  - a JSONL or CSV manifest (`mmjax.data.manifest`; paths relative to the manifest's folder);
  - a folder of class subfolders (classification; the files are the one modality's);
  - `tfds:NAME/SPLIT`, a TFDS data set already prepared in `data.data_dir` in the array_record
    format (`NAME` may carry a config and version, `tfds:name/config:1.0.0/train[:90%]`).
`config.input.fields` maps each record field the task reads to its manifest column (JSONL key,
CSV header) or TFDS feature; every record must have them all. Every problem a manifest has is
reported at once with its line (a missing column, a missing file, with `data.verify_files` a
file that is not an image or not audio) when the data is first read, before anything compiles;
nothing is skipped.

What the data decides is written into the workdir on the first start and read back from there
on resume and by `mmjax.predict` / `mmjax.export` (the data need not be reachable then):
`tokenizer/` (text tasks), `answers.json` (VQA), `classes.json` (classification). The trainer
hands the task its workdir; a task built without one (`Setup(config)` alone) derives them from
the training split each time. The tokenizer is `data.tokenizer` when set ("minilm" or a
tokenizer file or folder), else the pretrained text encoder's (the tokenizer files of the
folder `config.model_init` loads into the text tower, or MiniLM's), else a WordPiece tokenizer
trained on the training split's texts with at most `data.vocab_size` tokens (0: the text
encoder's vocabulary, a pretrained one's or its spec's, else `DEFAULT_VOCAB`); a tokenizer larger
than the text encoder's vocabulary is an error.

Architecture from a checkpoint: when `config.model_init` is a whole-model Hugging Face CLIP or
SigLIP folder, the "clip" task builds the model its config.json describes. It sets
`model.encoders` (keeping only the runtime options `ENCODER_OPTIONS` of the config's specs),
`model.embed_dim`, `model.projection`, `model.loss_type` and `data.image_size`, logging each value
it changes; the workdir's config.json then holds them. A CLIP-style text tower pools at the end
token of the task's tokenizer: with a tokenizer trained here, the checkpoint's `eos_token_id` is
replaced by the tokenizer's (logged).

Encoder spec values taken from the data (`mmjax.models.build_model`'s `fill`: a spec key whose
value is 0): `vocab_size` (the tokenizer's), `eos_id` (its end token), `image_size`
(`data.image_size`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mmjax import io_paths, losses, predict
from mmjax.data import manifest, pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.pp.registry import Example, bad
from mmjax.data.pp.text import get_texts
from mmjax.metrics.vqa import exact_match, normalize_answer, vqa_accuracy
from mmjax.models import build_model
from mmjax.models.classifier import MultimodalClassifier
from mmjax.models.vqa import VQAModel
from mmjax.tasks.caption import ShapesCaptioning
from mmjax.tasks.clip import ContrastiveTask
from mmjax.train.tasks import TASKS

log = logging.getLogger("mmjax.tasks")

TFDS_PREFIX = "tfds:"
EVAL = "eval"
TOKENIZER_DIR = "tokenizer"
ANSWERS_FILE = "answers.json"
CLASSES_FILE = "classes.json"
DEFAULT_VOCAB = 8192
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
# Encoder spec keys that are training or run-time options, not architecture: the config's values
# stay when a checkpoint's config.json replaces the encoder specs.
ENCODER_OPTIONS = ("remat", "attention", "param_dtype", "dropout", "attn_dropout")


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Records:
  """A random-access source whose list fields always hold lists (one caption -> [caption]),
  each record then passed through `transform` (a task's targets from its data's vocabulary)."""

  source: Any
  lists: tuple[str, ...] = ()
  transform: Callable[[dict], dict] | None = None

  @property
  def classes(self) -> list[str] | None:
    return getattr(self.source, "classes", None)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.source[index])
    for name in self.lists:
      value = record[name]
      if isinstance(value, (str, bytes)) or (isinstance(value, np.ndarray) and value.ndim == 0):
        record[name] = [value]
      elif isinstance(value, np.ndarray):
        record[name] = list(value)
    return record if self.transform is None else self.transform(record)


class TfdsSource:
  """`tfds:NAME/SPLIT`: a prepared TFDS data set's split, its features renamed by `columns`.

  Attributes:
    classes: the label feature's class names, when it is a `ClassLabel`; else None. Given
      `classes` (the training split's), they must be the same, in the same order.
  """

  def __init__(self, spec: str, columns: Mapping[str, str], data_dir: str | None = None,
               classes: Sequence[str] | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    name, _, split = spec[len(TFDS_PREFIX):].rpartition("/")
    if not name or not split:
      raise ValueError(f"{spec!r}: expected tfds:NAME/SPLIT, e.g. tfds:mnist/train")
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      features = builder.info.features
    except Exception as e:  # TFDS raises many kinds (not found, not prepared, wrong format)
      raise ValueError(f"{spec!r}: cannot read it as a prepared array_record TFDS data set in "
                       f"data.data_dir={data_dir!r}: {type(e).__name__}: {e}") from e
    missing = {f: c for f, c in columns.items() if c not in features}
    if missing:
      raise ValueError(f"{spec!r}: no feature(s) {missing} (record field: feature); its features "
                       f"are {sorted(features)}")
    label = features[columns["label"]] if "label" in columns else None
    self.classes = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
    if classes is not None and self.classes is not None and self.classes != list(classes):
      raise ValueError(f"{spec!r}: the label feature's classes {self.classes} are not the training "
                       f"split's {list(classes)} (same names, same order)")
    self.spec, self.columns, self._builder, self._split = spec, dict(columns), builder, split
    try:
      self.source = self._open(self.columns.values())
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{spec!r}: cannot read split {split!r} as array_record in "
                       f"data.data_dir={data_dir!r}: {type(e).__name__}: {e}") from e

  def _open(self, features: Iterable[str]):
    """The split as a TFDS data source decoding only `features` (the others stay bytes)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    keep = set(features)
    skip = {k: tfds.decode.SkipDecoding() for k in self._builder.info.features if k not in keep}
    return self._builder.as_data_source(self._split, decoders=skip)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    return {"id": f"{self.spec}[{index}]", **{f: record[c] for f, c in self.columns.items()}}

  def read(self, *fields: str, chunk: int = 1024) -> Iterator[dict[str, Any]]:
    """Every record, in order, with only `fields` (and "id"): a pass over the texts or labels
    that does not decode the split's images or audio."""
    source = self._open(self.columns[f] for f in fields)
    for start in range(0, len(source), chunk):
      keys = list(range(start, min(start + chunk, len(source))))
      for i, record in zip(keys, source.__getitems__(keys)):
        yield {"id": f"{self.spec}[{i}]", **{f: record[self.columns[f]] for f in fields}}


def open_source(spec: str, columns: Mapping[str, str], *, classes: Sequence[str] | None = None,
                folder_field: str = "image", data_dir: str | None = None,
                verify: bool = True) -> Any:
  """The records of one split: a manifest, a class folder or `tfds:NAME/SPLIT` (module docstring)."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"expected a manifest, a class folder or tfds:NAME/SPLIT, got {spec!r}")
  if spec.startswith(TFDS_PREFIX):
    return TfdsSource(spec, columns, data_dir, classes)
  source = manifest.load_manifest(spec, classes=classes, columns=dict(columns),
                                  folder_field=folder_field)
  if verify:
    manifest.verify_files(source)
  return source


# ---------------------------------------------------------------------------------------------
# The shared base.
# ---------------------------------------------------------------------------------------------
def _plain(x: Any) -> Any:
  """A ConfigDict (or nested one) as plain dicts."""
  return x.to_dict() if hasattr(x, "to_dict") else x


def model_init_source(config: ml_collections.ConfigDict, *keys: str) -> str | None:
  """The first `config.model_init` source among module paths `keys` ("" = the whole model)."""
  mi = _plain(config.get("model_init") or None)
  if not mi:
    return None
  if isinstance(mi, (str, os.PathLike)):
    mi = {"": os.fspath(mi)}
  for key in keys:
    if mi.get(key):
      return os.fspath(mi[key])
  return None


def _hf_folder(source: str | None) -> str | None:
  """The Hugging Face folder of a `model_init` source: itself, or the folder of a .safetensors
  file in one (MiniLM's for "minilm"); None for a .npz or no source."""
  if not source or source.endswith(".npz"):
    return None
  if source == "minilm":
    from mmjax.transfer import minilm  # noqa: PLC0415 (optional dependency)
    source = minilm.minilm_path()
  source = os.path.expanduser(source)
  return source if os.path.isdir(source) else os.path.dirname(source)


def _hf_config(source: str | None) -> dict | None:
  """config.json of a `model_init` source's HF folder (`_hf_folder`); None otherwise."""
  folder = _hf_folder(source)
  if folder is None:
    return None
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def pretrained_text_vocab(cfg: dict | None) -> int | None:
  """The text vocabulary size an HF config.json describes (a BERT, CLIP, SigLIP or text tower)."""
  from mmjax.transfer import clip, siglip  # pylint: disable=g-import-not-at-top

  if cfg is None:
    return None
  kind = cfg.get("model_type", "")
  if kind == "bert":
    return int(cfg.get("vocab_size", 30522))
  lib = {"clip": clip, "siglip": siglip}.get(kind.split("_")[0])
  if lib is None or kind.endswith("_vision_model"):
    return None
  text = lib.spec_from_hf_config(cfg if kind in ("clip", "siglip") else {"text_config": cfg})[1]
  return int(text["vocab_size"])


def save_tokenizer_folder(tokenizer, folder: epath.Path) -> None:
  """`tokenizer.save_pretrained(folder)` for a local or bucket `folder` (transformers writes only
  local files), each file written atomically and tokenizer.json last."""
  with tempfile.TemporaryDirectory() as local:
    tokenizer.save_pretrained(local)
    names = sorted(os.listdir(local), key=lambda n: n == tokenizer_lib.TOKENIZER_FILE)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
      io_paths.write_atomic(folder / name, pathlib.Path(local, name).read_bytes())


class UserDataTask(pipeline.ConfigInput):
  """What the four tasks share: the config's sources, the workdir's assets, the tokenizer.

  Subclasses set `fields` (the record fields they read, in `config.input.fields`), `lists` (those
  holding several texts), `eval_stacked` (lists that evaluation stacks, so every evaluation
  record needs the same number), `text_fields` (whose texts train a tokenizer; none: no
  tokenizer) and `metric` (the eval metric keeping the best checkpoint).
  """

  fields: tuple[str, ...] = ()
  lists: tuple[str, ...] = ()
  eval_stacked: tuple[str, ...] = ()
  text_fields: tuple[str, ...] = ()
  metric = "accuracy"
  folder_field = "image"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None):
    self.config = config
    self.workdir = io_paths.as_path(workdir) if workdir is not None else None
    i = config.input
    if not i.get("train"):
      raise ValueError("input.train: expected the training data: a JSONL/CSV manifest, a class "
                       "folder or tfds:NAME/SPLIT (e.g. --config.input.train=data/train.jsonl)")
    self.specs = {"train": i.train, **({EVAL: i.eval} if i.get("eval") else {})}
    self.eval_splits = (EVAL,) if EVAL in self.specs else ()
    self.best_metric = f"{EVAL}/{self.metric}"
    self.columns = self._columns()
    self._sources: dict[str, Any] = {}
    self.image_shape = None
    if "image" in self.columns:
      size = config.data.get("image_size", 0)
      if not isinstance(size, int) or size < 1:
        raise ValueError(f"data.image_size: expected the side (pixels) images are resized to, got {size!r}")
      self.image_shape = (size, size, 3)  # RGB: image.decode converts grey and RGBA
    self.tokenizer = self._tokenizer() if self.text_fields else None
    if self.tokenizer is not None:
      self._keep_pretrained_vocab()

  # -- sources ---------------------------------------------------------------------------------
  def _columns(self) -> dict[str, str]:
    """record field -> column, from `config.input.fields`; each field the task reads is needed."""
    given = _plain(self.config.input.get("fields")) or {}
    missing = [f for f in self.fields if not given.get(f)]
    if missing:
      raise ValueError(f"input.fields: expected a column name for each of {list(self.fields)}; "
                       f"missing {missing} (got {given})")
    return {f: given[f] for f in self.fields}

  def source(self, split: str) -> Records:
    """The records of `split` ("train" or "eval"), read and checked once. The training split is
    read first and the evaluation split with it, so that both report their problems before
    training, and the evaluation split's labels follow the training split's classes."""
    if split not in self.specs:
      raise ValueError(f"split {split!r}: this config has {sorted(self.specs)} (input.train, input.eval)")
    d = self.config.data
    # Reading the evaluation split may ask for the training split's classes: that nested call
    # finds "train" read and returns it.
    for name in ("train", *self.eval_splits) if split not in self._sources else ():
      if name in self._sources:
        continue
      raw = open_source(self.specs[name], self.columns, classes=self.split_classes(name),
                        folder_field=self.folder_field, data_dir=d.get("data_dir"),
                        verify=bool(d.get("verify_files", True)))
      self.check_split(name, raw)
      self._sources[name] = Records(raw, self.lists)
      log.info("%s: %d records from %s", name, len(raw), self.specs[name])
    return dataclasses.replace(self._sources[split], transform=self.record_transform())

  def record_transform(self) -> Callable[[dict], dict] | None:
    """What the task adds to each record before the pp string (None: nothing)."""
    return None

  def split_classes(self, split: str) -> list[str] | None:
    """Class names the labels of `split` must use (classification); None: any."""
    return None

  def check_split(self, split: str, source: Any) -> None:
    """Raises on what a task cannot use in a freshly read split: here, evaluation records with
    different numbers of an `eval_stacked` field's texts."""
    if split == EVAL:
      for name in self.eval_stacked:
        same_count(source, name)

  def field_texts(self, name: str, split: str = "train") -> list[list[str]]:
    """The texts of field `name` in each record of `split` (a manifest's without reading its
    files; a TFDS split's without decoding its other features)."""
    source = self.source(split).source
    if isinstance(source, manifest.ManifestSource):
      values = [e.text if name == "text" else e.values[name] for e in source.entries]
      return [[v] if isinstance(v, str) else list(v) for v in values]
    return [get_texts(record, name)[0] for record in source.read(name)]

  def texts(self, split: str = "train") -> list[str]:
    """Every text of `split`'s `text_fields`, flattened."""
    return [t for f in self.text_fields for texts in self.field_texts(f, split) for t in texts]

  # -- workdir assets --------------------------------------------------------------------------
  def _saved(self, name: str):
    """workdir/name when the task has a workdir and that exists; else None."""
    if self.workdir is None:
      return None
    path = self.workdir / name
    return path if path.exists() else None

  def _writes(self) -> bool:
    return self.workdir is not None and jax.process_index() == 0

  def json_asset(self, name: str, build: Callable[[], Any]) -> Any:
    """workdir/name's JSON when saved by an earlier start; else `build()`, saved there."""
    saved = self._saved(name)
    if saved is not None:
      log.info("%s: read from %s", name, saved)
      return json.loads(saved.read_text())
    value = build()
    if self._writes():
      self.workdir.mkdir(parents=True, exist_ok=True)
      io_paths.write_atomic(self.workdir / name, json.dumps(value, indent=1, ensure_ascii=False))
      log.info("%s: written to %s", name, self.workdir / name)
    return value

  # -- tokenizer -------------------------------------------------------------------------------
  def text_spec(self) -> dict | None:
    """The text encoder's spec in `config.model.encoders`, if there is one."""
    encoders = _plain(self.config.model.get("encoders")) or {}
    spec = encoders.get("text")
    return dict(spec) if isinstance(spec, Mapping) else None

  def _pretrained_text_rows(self) -> tuple[int | None, str | None]:
    """(the embedding rows of the pretrained text tower model_init loads, or None; its source)."""
    source = model_init_source(self.config, "encoders/text", "")
    return pretrained_text_vocab(_hf_config(source)), source

  def text_vocab_limit(self) -> tuple[int | None, str]:
    """(most tokens the text encoder takes, where that comes from), or (None, "")."""
    vocab, source = self._pretrained_text_rows()
    if vocab is not None:
      return vocab, f"the pretrained text encoder {source!r}"
    spec = self.text_spec() or {}
    if spec.get("name") == "minilm":
      return 30522, "the minilm text encoder"
    if int(spec.get("vocab_size", 0) or 0):
      return int(spec["vocab_size"]), "model.encoders.text.vocab_size"
    return None, ""

  def _keep_pretrained_vocab(self) -> None:
    """A pretrained text tower keeps its embedding table, which may be padded past its tokenizer
    (whose ids were checked to fit): a text spec asking for the data's size (vocab_size 0) gets
    the checkpoint's, which the workdir's config.json keeps for serving without the checkpoint."""
    spec = self.text_spec() or {}
    if spec.get("vocab_size", None) != 0:
      return
    vocab, _ = self._pretrained_text_rows()
    if vocab is not None and vocab != len(self.tokenizer):
      log.info("model.encoders.text.vocab_size: %d, the pretrained embedding table's (the "
               "tokenizer has %d tokens)", vocab, len(self.tokenizer))
      self.config.model.encoders.text.vocab_size = vocab

  def _pretrained_tokenizer(self):
    """(tokenizer, where from) given by the config or the pretrained text encoder, or (None, "")."""
    name = self.config.data.get("tokenizer", "") or ""
    spec = self.text_spec() or {}
    if not name:
      source = model_init_source(self.config, "encoders/text", "")
      folder = _hf_folder(source)
      if source == "minilm" or (not source and spec.get("name") == "minilm"):
        name = "minilm"
      elif folder and any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        name = folder  # the checkpoint's own tokenizer (beside a .safetensors file too)
    if not name:
      return None, ""
    if name == "minilm":
      from mmjax.transfer import minilm  # noqa: PLC0415 (optional dependency)
      return minilm.load_tokenizer(), "minilm"
    return tokenizer_lib.load_tokenizer(name), name

  def _tokenizer(self):
    """The task's tokenizer (see the module docstring), saved in workdir/tokenizer/."""
    # tokenizer.json is written last (`save_tokenizer_folder`): once there, the folder is whole.
    saved = self._saved(f"{TOKENIZER_DIR}/{tokenizer_lib.TOKENIZER_FILE}")
    if saved is not None:
      tok = tokenizer_lib.load_tokenizer(saved.parent)
      log.info("tokenizer: read from %s (%d tokens)", saved.parent, len(tok))
      return tok
    limit, where = self.text_vocab_limit()
    tok, origin = self._pretrained_tokenizer()
    trained = tok is None
    if trained:
      asked = int(self.config.data.get("vocab_size", 0) or 0)
      if limit is not None and asked > limit:
        raise ValueError(f"data.vocab_size={asked}: the text encoder ({where}) has {limit} tokens; "
                         f"set data.vocab_size <= {limit} (0 takes {limit})")
      size = asked or limit or DEFAULT_VOCAB
      texts = self.texts("train")
      try:
        tok = tokenizer_lib.train_wordpiece(texts, vocab_size=size)
      except ValueError as e:
        raise ValueError(f"tokenizer trained on input.train with at most {size} tokens "
                         f"({where or 'data.vocab_size'}): {e}") from e
      origin = f"trained on {self.specs['train']} (at most {size} tokens)"
    if limit is not None and len(tok) > limit:
      raise ValueError(f"tokenizer ({origin}): {len(tok)} tokens do not fit the text encoder "
                       f"({where}), which has {limit}; use its own tokenizer (data.tokenizer) or a "
                       f"smaller one")
    log.info("tokenizer: %s, %d tokens", origin, len(tok))
    if self._writes():
      folder = self.workdir / TOKENIZER_DIR
      if trained:  # one tokenizer.json, read back as `train_wordpiece` made it
        tokenizer_lib.save_tokenizer(tok, folder / tokenizer_lib.TOKENIZER_FILE)
      else:  # its own files (special tokens, class), read back by AutoTokenizer
        save_tokenizer_folder(tok, folder)
    return tok

  def fill(self) -> dict[str, Any]:
    """Encoder spec values taken from the data (`build_model`'s `fill`)."""
    out = {}
    if self.image_shape is not None:
      out["image_size"] = self.image_shape[0]
    if self.tokenizer is not None:
      out["vocab_size"] = len(self.tokenizer)
      out["eos_id"] = tokenizer_lib.boundary_ids(self.tokenizer)[1]
    return out


# ---------------------------------------------------------------------------------------------
# Image-text contrastive.
# ---------------------------------------------------------------------------------------------
def architecture_from_checkpoint(source: str) -> dict[str, Any] | None:
  """`config.model` values of the dual encoder a whole-model HF CLIP / SigLIP folder describes,
  and its image size; None for another source."""
  from mmjax.transfer import clip, siglip  # pylint: disable=g-import-not-at-top

  cfg = _hf_config(source)
  kind = (cfg or {}).get("model_type")
  if kind not in ("clip", "siglip"):
    return None
  if kind == "clip":
    vision, text, embed_dim = clip.spec_from_hf_config(cfg)
    model = {"embed_dim": embed_dim, "projection": True, "loss_type": "clip"}
  else:
    vision, text = siglip.spec_from_hf_config(cfg)
    model = {"embed_dim": int(text["out_dim"]), "projection": False, "loss_type": "siglip"}
  model["encoders"] = {"image": {"name": "vit", "variant": None, **vision},
                       "text": {"name": "clip_text", **text}}
  return {"model": model, "image_size": int(vision["image_size"]), "kind": kind}


@TASKS.register("clip")
class UserCLIP(UserDataTask, ContrastiveTask):
  """CLIP (softmax) or SigLIP (sigmoid, `model.loss_type`) on the user's image-caption pairs.

  Records: image, captions (one text or a list; evaluation needs the same number per record).
  Evaluation: image->text and text->image recall@1/5 and their sum ("eval/rsum") over input.eval.
  """

  fields = ("image", "captions")
  lists = ("captions",)
  eval_stacked = ("captions",)
  text_fields = ("captions",)
  metric = "rsum"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None):
    source = model_init_source(config, "")
    arch = architecture_from_checkpoint(source) if source else None
    if arch is not None:
      self._adopt(config, arch, source)
    super().__init__(config, workdir)
    self._match_end_token(from_checkpoint=arch is not None)

  @staticmethod
  def _adopt(config: ml_collections.ConfigDict, arch: dict[str, Any], source: str) -> None:
    """Sets config.model, data.image_size (and a SigLIP's data.max_len) to the checkpoint's
    architecture, logging changes."""
    old = _plain(config.model.get("encoders")) or {}
    for m, spec in arch["model"]["encoders"].items():
      spec.update({k: v for k, v in (old.get(m) or {}).items() if k in ENCODER_OPTIONS})
    if config.model.get("loss_type") != arch["kind"]:
      log.warning("model.loss_type := %r (the checkpoint %s); the config's image normalisation "
                  "(input.pp_train/pp_eval) may be %r's: use configs/clip.py:loss=%s",
                  arch["kind"], source, config.model.get("loss_type"), arch["kind"])
    for key, value in arch["model"].items():
      if _plain(config.model.get(key)) != value:
        log.info("model.%s := %s (the %s checkpoint %s)", key, value, arch["kind"], source)
      config.model[key] = value
    if config.data.get("image_size") != arch["image_size"]:
      log.info("data.image_size := %d (the %s checkpoint %s)", arch["image_size"], arch["kind"], source)
    config.data.image_size = arch["image_size"]
    if arch["kind"] == "siglip":  # it pools the last position: texts padded as in its training
      positions = int(arch["model"]["encoders"]["text"]["max_len"])
      if config.data.get("max_len") != positions:
        log.info("data.max_len := %d (the SigLIP checkpoint %s pools the last of its %d text "
                 "positions)", positions, source, positions)
      config.data.max_len = positions

  def _match_end_token(self, from_checkpoint: bool) -> None:
    """Makes a CLIP text tower pool at the tokenizer's end token (`eos_id`)."""
    from mmjax.encoders.text import ClipTextSpec  # pylint: disable=g-import-not-at-top

    spec = self.text_spec() or {}
    eos = spec.get("eos_id", ClipTextSpec.eos_id)
    if spec.get("name") != "clip_text" or spec.get("pool", "eos") != "eos" or eos == 0:
      return
    end = tokenizer_lib.boundary_ids(self.tokenizer)[1]
    if eos == end or (eos is None and end == len(self.tokenizer) - 1):  # None pools at the largest id
      return
    if not from_checkpoint:
      raise ValueError(f"model.encoders.text.eos_id={eos}: the tokenizer ends every text with id "
                       f"{end}, where the text tower pools; set eos_id to 0 (the tokenizer's)")
    log.warning("model.encoders.text.eos_id := %d (the end token of the tokenizer, which is not "
                "the checkpoint's: it pooled at %s)", end, eos)
    self.config.model.encoders.text.eos_id = end


def same_count(source: Any, name: str) -> None:
  """Raises unless every record of a manifest split has the same number of `name` texts
  (evaluation stacks them into (B, K, L)); a TFDS split's feature fixes it already."""
  if not isinstance(source, manifest.ManifestSource):
    return
  counts = collections.defaultdict(list)
  for e in source.entries:
    value = e.values[name]
    counts[1 if isinstance(value, str) else len(value)].append(e.id)
  if len(counts) > 1:
    seen = ", ".join(f"{n} ({ids[0]}{' ...' if len(ids) > 1 else ''})" for n, ids in sorted(counts.items()))
    raise ValueError(f"input.eval: every record needs the same number of {name} for evaluation; "
                     f"found {seen}")


# ---------------------------------------------------------------------------------------------
# Captioning.
# ---------------------------------------------------------------------------------------------
@TASKS.register("caption")
class UserCaptioning(UserDataTask, ShapesCaptioning):
  """Captioning of the user's images (`model.name` "transformer_captioner" or "show_and_tell").

  Records: image, captions (one text or a list; training reads one at random, evaluation all of
  them, the same number per record). Evaluation: greedy (or `eval.decode`) captions scored by
  BLEU-1/4, ROUGE-L and CIDEr-D ("eval/cider") against every reference.
  """

  fields = ("image", "captions")
  lists = ("captions",)
  eval_stacked = ("captions",)
  text_fields = ("captions",)
  metric = "cider"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None):
    super().__init__(config, workdir)
    start, self.eos_id = tokenizer_lib.boundary_ids(self.tokenizer)
    if start is None or self.tokenizer.pad_token_id is None:
      raise ValueError(f"tokenizer: captioning needs start, end and padding tokens; "
                       f"{type(self.tokenizer).__name__} has start {start}, padding "
                       f"{self.tokenizer.pad_token_id}")
    self.bos_id, self.pad_id = start, int(self.tokenizer.pad_token_id)

  def build_model(self, rngs: nnx.Rngs):
    """`config.model` as is; vocabulary and image shape from the data."""
    from mmjax.models.captioner import ShowAndTell, TransformerCaptioner  # pylint: disable=g-import-not-at-top

    return build_model(self.config.model, rngs=rngs, base=(ShowAndTell, TransformerCaptioner),
                       fill=self.fill(), vocab_size=len(self.tokenizer), image_shape=self.image_shape)


# ---------------------------------------------------------------------------------------------
# Open-ended VQA.
# ---------------------------------------------------------------------------------------------
def answer_score(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy of `prediction` against reference `answers`, both given the official
  normalisation (`vqa_accuracy(normalize_answers=True)`; on annotations already normalised, as
  VQA v2's, that is the official score); against one answer, exact match (the leave-one-out
  formula needs two or more)."""
  if len(answers) == 1:
    return float(exact_match([prediction], answers)[0])
  return vqa_accuracy(prediction, answers, normalize_answers=True)


class AnswerTargets:
  """A record's reference answers -> the answer-vocabulary entries that score on them.

  Adds `answer_ids` (K,) int32, vocabulary ids padded with -1, and `answer_scores` (K,) float32:
  the entries whose normalised form is among the normalised references (the same rule as the
  vocabulary's: "Red" and "red." count for "red"), each with its `answer_score`. Predicting any
  other entry scores 0, so the accuracy of a prediction is its id's score here
  (`answer_accuracy`), and the training targets are these soft scores. A record with more than K
  reference answers is a `BadExample`.

  Args:
    answer_vocab: the answer strings by id.
    max_answers: K.
    key: the reference answers field (a list of texts).
  """

  def __init__(self, answer_vocab: Sequence[str], max_answers: int, key: str = "answers"):
    self.vocab, self.max_answers, self.key = tuple(answer_vocab), int(max_answers), key
    self.ids: dict[str, int] = {}  # an entry's normalised form -> its id (the first, if repeated)
    for i, a in enumerate(self.vocab):
      self.ids.setdefault(normalize_answer(a), i)

  def __call__(self, record: Example) -> Example:
    answers, _ = get_texts(record, self.key)
    if not answers or len(answers) > self.max_answers:
      raise bad(record, self.key, f"expected 1 to {self.max_answers} reference answers "
                f"(data.max_answers), got {len(answers)}")
    forms = dict.fromkeys(map(normalize_answer, answers))  # distinct, so at most K
    ids = [self.ids[f] for f in forms if f in self.ids]
    out_ids = np.full((self.max_answers,), -1, np.int32)
    out_scores = np.zeros((self.max_answers,), np.float32)
    out_ids[:len(ids)] = ids
    out_scores[:len(ids)] = [answer_score(self.vocab[i], answers) for i in ids]
    return {**record, "answer_ids": out_ids, "answer_scores": out_scores}


def answer_accuracy(predictions: jax.Array, ids: jax.Array, scores: jax.Array) -> jax.Array:
  """Per-example VQA accuracy (B,) of predicted ids (B,) from `AnswerTargets`' ids and
  scores (B, K)."""
  return jnp.sum(jnp.where(ids == predictions[:, None], scores, 0.0), axis=-1)


def dense_scores(ids: jax.Array, scores: jax.Array, num_answers: int) -> jax.Array:
  """(B, K) ids (-1: none) and scores -> (B, A) soft-score targets."""
  return jnp.sum(jax.nn.one_hot(ids, num_answers) * scores[..., None], axis=1)


@TASKS.register("vqa_open")
class UserVQA(UserDataTask):
  """Open-ended VQA on the user's images and questions: a `VQAModel` classifying over the
  `data.num_answers` most frequent (normalised) answers of the training split.

  Records: image, question, answers (one text or a list of up to `data.max_answers`, usually
  ten). Training: sigmoid cross-entropy against the soft scores (LXMERT's loss). Evaluation:
  "eval/vqa_accuracy" (official formula, references normalised as the vocabulary is; exact
  match for a single answer) and "eval/best_possible", the accuracy of always picking the best
  vocabulary entry. Served by `AnswerPredictor` with each answer's sigmoid
  (`answer_probabilities`), as trained.
  """

  predictor = predict.AnswerPredictor

  fields = ("image", "question", "answers")
  lists = ("answers",)
  text_fields = ("question",)
  metric = "vqa_accuracy"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None):
    super().__init__(config, workdir)
    self.answers = tuple(self.json_asset(ANSWERS_FILE, self.answer_vocabulary))

  def answer_vocabulary(self) -> list[str]:
    """The `data.num_answers` most frequent normalised answers of the training split (every
    reference answer counts; ties alphabetical)."""
    n = int(self.config.data.num_answers)
    counts = collections.Counter(f for answers in self.field_texts("answers")
                                 for f in map(normalize_answer, answers) if f)
    if not counts:
      raise ValueError("input.train: no answers to build the answer vocabulary from")
    vocab = sorted(counts, key=lambda a: (-counts[a], a))[:n]
    covered = sum(counts[a] for a in vocab) / sum(counts.values())
    log.info("answers: %d of %d distinct (data.num_answers=%d) cover %.1f%% of the training "
             "answers", len(vocab), len(counts), n, 100 * covered)
    return vocab

  def answer_probabilities(self, logits: jax.Array) -> jax.Array:
    """Answer logits (B, A) -> the probability (B, A) of each answer being right: the sigmoid
    that the per-answer binary loss trains (they need not sum to 1)."""
    return jax.nn.sigmoid(logits.astype(jnp.float32))

  def record_transform(self) -> AnswerTargets | None:
    """Each record's answer targets (`AnswerTargets`), once the vocabulary is known."""
    answers = getattr(self, "answers", None)
    return None if answers is None else AnswerTargets(answers, int(self.config.data.max_answers))

  def check_split(self, split: str, source: Any) -> None:
    if isinstance(source, manifest.ManifestSource):
      k = int(self.config.data.max_answers)
      over = [e.id for e in source.entries
              if not isinstance(e.values["answers"], str) and len(e.values["answers"]) > k]
      if over:
        raise ValueError(f"input.{split}: {len(over)} record(s) have more than data.max_answers={k} "
                         f"answers, e.g. {over[:5]}; raise data.max_answers")

  def build_model(self, rngs: nnx.Rngs) -> VQAModel:
    """`config.model` as is; answers, image shape and question length from the data."""
    return build_model(self.config.model, rngs=rngs, base=VQAModel, fill=self.fill(),
                       num_answers=len(self.answers), image_shape=self.image_shape,
                       question_len=int(self.config.data.max_len))

  def loss_fn(self, model, batch, train):
    logits, _ = model(batch["image"], batch["question_ids"], batch["question_mask"],
                      deterministic=not train)  # (B, A)
    targets = dense_scores(batch["answer_ids"], batch["answer_scores"], len(self.answers))
    loss, metrics = losses.soft_score_bce(logits, targets)
    return loss, {"score": metrics["score"]}

  def eval_fn(self, model, batch):
    logits, _ = model(batch["image"], batch["question_ids"], batch["question_mask"])
    valid = batch["valid"]
    ids, scores = batch["answer_ids"], batch["answer_scores"]
    targets = dense_scores(ids, scores, len(self.answers))
    loss, _ = losses.soft_score_bce(logits, targets, weights=valid)
    count = valid.sum()
    accuracy = answer_accuracy(jnp.argmax(logits, axis=-1), ids, scores)
    return {"vqa_accuracy": jnp.sum(jnp.where(valid, accuracy, 0.0)),
            "best_possible": jnp.sum(jnp.where(valid, scores.max(axis=-1), 0.0)),
            "loss": loss * count, "count": count}

  def summarize(self, sums):
    n = max(sums["count"], 1.0)
    return {"vqa_accuracy": sums["vqa_accuracy"] / n, "best_possible": sums["best_possible"] / n,
            "loss": sums["loss"] / n}


# ---------------------------------------------------------------------------------------------
# Classification.
# ---------------------------------------------------------------------------------------------
MODALITIES = ("image", "audio", "text")


@TASKS.register("classify")
class UserClassification(UserDataTask):
  """Classification of images, audio, text or any combination (the keys of `model.encoders`)
  with a `MultimodalClassifier`; labels from the manifest's label column or the class folders.

  Batches: image (B, S, S, 3) float32; text_ids / text_mask (B, L); audio (B, T) float32 and
  audio_len (B,) (the waveform, `data.audio_samples` long); label (B,) int32. Evaluation:
  "eval/accuracy" of the fused head and "eval/accuracy_<modality>" of each auxiliary head.
  """

  predictor = predict.ClassifyPredictor

  metric = "accuracy"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None):
    from mmjax.models.base import modality_order  # pylint: disable=g-import-not-at-top

    encoders = _plain(config.model.get("encoders")) or {}
    unknown = sorted(set(encoders) - set(MODALITIES))
    if not encoders or unknown:
      raise ValueError(f"model.encoders: expected encoders for some of {list(MODALITIES)}, got "
                       f"{sorted(encoders)}")
    self.modalities = modality_order(encoders)
    self.fields = (*self.modalities, "label")
    self.text_fields = ("text",) if "text" in self.modalities else ()
    self.folder_field = self.modalities[0]
    self._classes: tuple[str, ...] | None = None
    super().__init__(config, workdir)
    self._classes = tuple(self.json_asset(CLASSES_FILE, self.class_names))
    if len(self._classes) < 2:
      raise ValueError(f"input.train: {len(self._classes)} class(es) {list(self._classes)}; "
                       "classification needs at least 2")

  @property
  def classes(self) -> tuple[str, ...]:
    """The class names by id."""
    return self._classes

  def split_classes(self, split: str) -> list[str] | None:
    if self._classes is not None:
      return list(self._classes)
    return None if split == "train" else self.class_names()

  def class_names(self) -> list[str]:
    """The training split's class names (folder or label names), or "0".."C-1" for id labels."""
    source = self.source("train")
    if source.classes is not None:
      return list(source.classes)
    raw = source.source
    if isinstance(raw, manifest.ManifestSource):
      labels = [e.label for e in raw.entries]
    else:
      labels = [int(record["label"]) for record in raw.read("label")]
    return [str(i) for i in range(max(labels) + 1)]

  def model_inputs(self, batch: dict) -> dict:
    """The classifier's inputs from a batch, per modality (see the class docstring)."""
    out = {}
    for m in self.modalities:
      if m == "image":
        out[m] = batch["image"]
      elif m == "text":
        out[m] = (batch["text_ids"], batch["text_mask"])
      else:
        out[m] = {"x": batch["audio"], "lengths": batch["audio_len"]}
    return out

  def build_model(self, rngs: nnx.Rngs) -> MultimodalClassifier:
    """`config.model` as is; example inputs and classes from the data."""
    d = self.config.data
    examples = {}
    for m in self.modalities:
      if m == "image":
        examples[m] = jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32)
      elif m == "text":
        length = int(d.max_len)
        examples[m] = (jax.ShapeDtypeStruct((1, length), jnp.int32),
                       jax.ShapeDtypeStruct((1, length), jnp.bool_))
      else:
        examples[m] = {"x": jax.ShapeDtypeStruct((1, int(d.audio_samples)), jnp.float32),
                       "lengths": jax.ShapeDtypeStruct((1,), jnp.int32)}
    return build_model(self.config.model, rngs=rngs, base=MultimodalClassifier, fill=self.fill(),
                       input_examples=examples, num_classes=len(self.classes))

  def loss_fn(self, model, batch, train):
    logits, aux = model(self.model_inputs(batch), deterministic=not train)
    loss, metrics = model.loss(logits, aux, batch["label"])
    return loss, {k: v for k, v in metrics.items() if k == "accuracy" or k.endswith("/loss")}

  def eval_fn(self, model, batch):
    logits, aux = model(self.model_inputs(batch))
    valid = batch["valid"]
    right = lambda lg: jnp.sum(jnp.where(valid, jnp.argmax(lg, -1) == batch["label"], False))
    out = {"correct": right(logits), "count": valid.sum()}
    for name, unimodal in aux["unimodal_logits"].items():
      out[f"correct_{name}"] = right(unimodal)
    return out

  def summarize(self, sums):
    n = max(sums["count"], 1.0)
    out = {"accuracy": sums["correct"] / n}
    out.update({f"accuracy_{k[len('correct_'):]}": v / n for k, v in sums.items()
                if k.startswith("correct_")})
    return out
