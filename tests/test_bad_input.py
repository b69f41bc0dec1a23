"""Bad input over the public APIs, property-based: every case raises an error naming the field.

Encoders, fusion blocks, the VQA model, pp ops, manifests and config loading get inputs of the
wrong rank, shape or dtype, NaN/Inf values, empty or whitespace text, out-of-range token ids,
zero-length or NaN audio, batch sizes that differ across modalities, unknown config keys and
fusion names. Each case must raise exactly the error its kind calls for (TypeError for a wrong
type or dtype, ValueError for a wrong shape or value, KeyError for an unknown name, the library's
BadExample / ManifestError where it has one) with the field as the subject of its message (no
hang, no XLA crash, no silent NaN); silent audio and over-long text must work and stay finite.
Modules are built once and called eagerly on tiny shapes. Each case records a hypothesis `event`
(API, kind, error): `pytest --hypothesis-show-statistics` counts the cases of each.
(Predictor inputs are swept in test_predict_load.py, which has a trained workdir.) Files that
are not what their field says (an image cut short, text named .wav) are named by the request
field and by the manifest line alike.
"""

import functools
import json
import os
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st

from mmjax.data import manifest, pp
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.encoders import ENCODERS
from mmjax.encoders import audio_frontend as af
from mmjax.fusion import FUSIONS, build_fusion
from mmjax.models.vqa import VQAModel
from mmjax.train.config import load_config, parse_arg, set_path

SWEEP = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                 suppress_health_check=list(HealthCheck))
CONFIG = os.path.join(os.path.dirname(__file__), "..", "mmjax/projects/sort_of_clevr/configs/vqa.py")


def expect(case: str, fn, error: type[Exception], subject: str):
  """fn() raises exactly `error`, and a line of its message starts with `subject` (the field it names)."""
  with pytest.raises(Exception) as e:  # any exception: a wrong kind fails the assert below, naming both
    fn()
  message = e.value.args[0] if e.type is KeyError else str(e.value)  # str(KeyError) adds quotes
  assert e.type is error, f"{case}: raised {e.type.__name__}, expected {error.__name__}: {message}"
  assert any(line.lstrip().startswith(subject) for line in message.splitlines()), \
      f"{case}: message {message!r} does not name {subject!r}"
  event(f"{case}: {error.__name__}")


def finite(case: str, fn):
  """fn() succeeds and every float array it returns is finite."""
  out = fn()
  leaves = out if isinstance(out, (tuple, list)) else [out]
  for x in leaves:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
      assert np.isfinite(x).all(), f"{case}: non-finite output"
  event(f"{case}: finite")


def poison(x: np.ndarray, data, value=None) -> np.ndarray:
  """x with one NaN/Inf at a drawn position."""
  x = np.array(x)
  i = data.draw(st.integers(0, x.size - 1))
  x.reshape(-1)[i] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf])) if value is None else value
  return x


shapes = lambda rank, lo=1, hi=4: st.lists(st.integers(lo, hi), min_size=rank, max_size=rank).map(tuple)


# ---------------------------------------------------------------------------------------------
# Encoders.
# ---------------------------------------------------------------------------------------------
@functools.cache
def encoder(name: str):
  rngs = nnx.Rngs(0)
  kw = {
      "vit": dict(variant=None, width=16, depth=1, heads=2, mlp_dim=32, patch=4, image_size=8),
      "small_cnn": dict(features=8, channels=(4, 4), norm="layer"),
      "bert": dict(variant="tiny", max_len=16),
      "rnn_text": dict(vocab_size=50, features=8, hidden=8),
      "ast": dict(width=16, depth=1, num_heads=2, n_mels=16, patch=4, max_frames=32),
      "audio_cnn": dict(features=8, channels=(4,), n_mels=16),
  }[name]
  return ENCODERS.build(name, rngs=rngs, **kw)


VOCAB = {"bert": 1000, "rnn_text": 50}


VISION_ERRORS = {"rank": ValueError, "channels": ValueError, "dtype": TypeError, "nan": ValueError,
                 "size": ValueError, "type": TypeError}


@settings(SWEEP, max_examples=150)
@given(name=st.sampled_from(["vit", "small_cnn"]), data=st.data())
def test_vision_encoders(name, data):
  enc = encoder(name)
  kind = data.draw(st.sampled_from([k for k in VISION_ERRORS if k != "size" or name == "vit"]))  # CNNs take any size
  b = data.draw(st.integers(1, 3))
  good = np.random.default_rng(0).uniform(size=(b, 8, 8, 3)).astype(np.float32)
  if kind == "rank":
    x = np.zeros(data.draw(shapes(data.draw(st.sampled_from([0, 1, 2, 3, 5])))), np.float32)
  elif kind == "channels":
    x = np.zeros((b, 8, 8, data.draw(st.sampled_from([1, 2, 4, 5]))), np.float32)
  elif kind == "dtype":
    x = good.astype(data.draw(st.sampled_from([np.int32, np.uint8, np.bool_])))
  elif kind == "nan":
    x = poison(good, data)
  elif kind == "size":
    x = np.zeros((b, *data.draw(shapes(2, 1, 12).filter(lambda s: s != (8, 8))), 3), np.float32)
  else:
    x = data.draw(st.sampled_from([None, "image.png", [[0.0]], 3.0]))
  expect(f"{name} {kind}", lambda: enc(jnp.asarray(x) if isinstance(x, np.ndarray) else x), VISION_ERRORS[kind],
         "images:")


TEXT_ERRORS = {"dtype": TypeError, "rank": ValueError, "range": ValueError, "long": ValueError, "mask": ValueError}


@settings(SWEEP, max_examples=150)
@given(name=st.sampled_from(["bert", "rnn_text"]), data=st.data())
def test_text_encoders(name, data):
  enc, vocab = encoder(name), VOCAB[name]
  kind = data.draw(st.sampled_from([k for k in TEXT_ERRORS if k != "long" or name == "bert"]))  # RNNs take any length
  b, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 8))
  ids = np.random.default_rng(1).integers(1, vocab, (b, length)).astype(np.int32)
  mask = None
  field = "ids"
  if kind == "dtype":
    ids = ids.astype(data.draw(st.sampled_from([np.float32, np.bool_])))
  elif kind == "rank":
    ids = np.ones(data.draw(shapes(data.draw(st.sampled_from([0, 1, 3])))), np.int32)
  elif kind == "range":
    ids = poison(ids, data, data.draw(st.one_of(st.integers(-10**6, -1), st.integers(vocab, 10**6))))
  elif kind == "long":
    ids = np.ones((b, data.draw(st.integers(17, 64))), np.int32)
  else:
    mask = np.ones(data.draw(shapes(2).filter(lambda s: s != ids.shape)), bool)
    field = "mask"
  expect(f"{name} {kind}", lambda: enc(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)),
         TEXT_ERRORS[kind], f"{field}:")


AUDIO_ERRORS = {"rank": ValueError, "mels": ValueError, "dtype": TypeError, "nan": ValueError, "empty": ValueError,
                "mask": ValueError, "lengths": ValueError}


@settings(SWEEP, max_examples=150)
@given(name=st.sampled_from(["ast", "audio_cnn"]), kind=st.sampled_from(list(AUDIO_ERRORS)), data=st.data())
def test_audio_encoders(name, kind, data):
  enc = encoder(name)
  b, frames = data.draw(st.integers(1, 3)), data.draw(st.integers(4, 32))
  x = np.random.default_rng(2).normal(size=(b, frames, 16)).astype(np.float32)
  kw, field = {}, "features"
  if kind == "rank":
    x = np.zeros(data.draw(shapes(data.draw(st.sampled_from([1, 2, 4])))), np.float32)
  elif kind == "mels":
    x = np.zeros((b, frames, data.draw(st.sampled_from([1, 8, 15, 17, 32]))), np.float32)
  elif kind == "dtype":
    x = x.astype(np.int32)
  elif kind == "nan":
    x = poison(x, data)
  elif kind == "empty":
    x = np.zeros((b, 0, 16), np.float32)
  elif kind == "mask":
    kw["mask"], field = np.ones(data.draw(shapes(2).filter(lambda s: s != (b, frames))), bool), "features mask"
  else:
    kw["lengths"] = np.full((b,), data.draw(st.one_of(st.integers(-5, 0), st.integers(frames + 1, 99))), np.int32)
    field = "features lengths"
  expect(f"{name} {kind}", lambda: enc(jnp.asarray(x), **{k: jnp.asarray(v) for k, v in kw.items()}),
         AUDIO_ERRORS[kind], f"{field}:")


LOG_MEL = af.LogMel(sample_rate=8000, n_fft=64, hop_length=32, n_mels=16)


FRONT_END_ERRORS = {"empty": ValueError, "nan": ValueError, "dtype": TypeError, "rank": ValueError,
                    "lengths": ValueError}


@settings(SWEEP, max_examples=80)
@given(kind=st.sampled_from(["silent", *FRONT_END_ERRORS]), data=st.data())
def test_audio_front_end(kind, data):
  b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(64, 400))
  x = np.random.default_rng(3).normal(size=(b, t)).astype(np.float32)
  if kind == "silent":  # all zeros: finite features, no error
    finite("log_mel silent", lambda: LOG_MEL(jnp.zeros((b, t), jnp.float32)).values)
    return
  lengths, field = None, "audio"
  if kind == "empty":
    x = np.zeros((b, 0), np.float32)
  elif kind == "nan":
    x = poison(x, data)
  elif kind == "dtype":
    x = (x * 1000).astype(np.int16)
  elif kind == "rank":
    x = np.zeros(data.draw(shapes(3)), np.float32)
  else:
    lengths = np.full((b,), data.draw(st.one_of(st.integers(-5, 0), st.integers(t + 1, 999))), np.int32)
    field = "audio lengths"
  expect(f"log_mel {kind}", lambda: LOG_MEL(jnp.asarray(x), None if lengths is None else jnp.asarray(lengths)),
         FRONT_END_ERRORS[kind], f"{field}:")


# ---------------------------------------------------------------------------------------------
# Fusion blocks and the VQA model.
# ---------------------------------------------------------------------------------------------
DIMS = {"image": 6, "text": 4}
FUSION_KWARGS = {"relation": {"query": "text"}, "film": {"condition": "text"}}


@functools.cache
def fusion(name: str):
  kw = dict(FUSION_KWARGS.get(name, {}))
  for extra in ({"depth": 1, "num_heads": 2}, {"num_heads": 2}, {}):
    try:
      return build_fusion(name, modalities=DIMS, features=8, rngs=nnx.Rngs(0), **kw, **extra)
    except TypeError:
      continue
  raise AssertionError(f"cannot build fusion {name!r}")


FUSION_ERRORS = {"unknown": ValueError, "width": ValueError, "rank": ValueError, "mask": ValueError,
                 "batch": ValueError, "presence": ValueError, "nan": ValueError, "dtype": TypeError}


@settings(SWEEP, max_examples=250)
@given(name=st.sampled_from(FUSIONS.names()), kind=st.sampled_from(list(FUSION_ERRORS)), data=st.data())
def test_fusion_blocks(name, kind, data):
  block = fusion(name)
  b = data.draw(st.integers(2 if kind == "batch" else 1, 3))
  rng = np.random.default_rng(4)
  inputs = {m: [rng.normal(size=(b, 3, d)).astype(np.float32), np.ones((b, 3), bool)] for m, d in DIMS.items()}
  presence = None
  m = data.draw(st.sampled_from(sorted(DIMS)))
  subject = f"fusion input {m!r}: tokens"
  if kind == "unknown":
    bad = data.draw(st.sampled_from(["audio", "video", "", "Image"]))
    inputs[bad] = inputs.pop(m)
    subject = f"fusion inputs: unknown modality {bad!r}"
  elif kind == "width":
    inputs[m][0] = np.zeros((b, 3, data.draw(st.integers(1, 9).filter(lambda d: d != DIMS[m]))), np.float32)
  elif kind == "rank":  # leading size b: the batch check compares leading sizes before it checks ranks
    inputs[m][0] = np.zeros((b, *data.draw(shapes(data.draw(st.sampled_from([0, 1, 3]))))), np.float32)
  elif kind == "mask":
    inputs[m][1] = np.ones(data.draw(shapes(2).filter(lambda s: s != (b, 3))), bool)
    subject = f"fusion input {m!r}: mask"
  elif kind == "batch":
    # Batch sizes where one divides the other are shared inputs (one row per r examples).
    other = data.draw(st.integers(1, 5).filter(lambda n: max(n, b) % min(n, b)))
    inputs[m] = [rng.normal(size=(other, 3, DIMS[m])).astype(np.float32), np.ones((other, 3), bool)]
    smaller = m if other < b else next(k for k in DIMS if k != m)  # the largest batch is the reference
    subject = f"fusion input {smaller!r}: batch size"
  elif kind == "presence":
    presence = {m: np.ones(data.draw(st.one_of(shapes(1, 0, 5), shapes(2)).filter(lambda s: s != (b,))), bool)}
    subject = f"presence[{m!r}]:"
  elif kind == "nan":
    inputs[m][0] = poison(inputs[m][0], data)
  else:
    inputs[m][0] = inputs[m][0].astype(np.int32)
  event(f"fusion/{name}")
  expect(f"fusion {kind}", lambda: block({k: tuple(map(jnp.asarray, v)) for k, v in inputs.items()}, presence),
         FUSION_ERRORS[kind], subject)


@functools.cache
def vqa_model():
  config = load_config(CONFIG + ":size=tiny")
  m = config.model
  return VQAModel(encoders={"image": dict(m.encoders.image, channels=(8, 8)),
                            "text": dict(m.encoders.text, vocab_size=40, features=8, hidden=8)},
                  fusion="film", fusion_kwargs={"condition": "text"}, features=8, num_answers=10,
                  image_shape=(75, 75, 3), question_len=16, head_hidden=8, rngs=nnx.Rngs(0))


# A float question_ids array is a ValueError (one check for its dtype and rank); an out-of-range
# id is caught by the text encoder, which names its own argument `ids`.
VQA_ERRORS = {"image_shape": (ValueError, "images:"), "image_dtype": (TypeError, "images:"),
              "image_nan": (ValueError, "images:"), "ids_dtype": (ValueError, "question_ids:"),
              "ids_rank": (ValueError, "question_ids:"), "ids_range": (ValueError, "ids:"),
              "batch": (ValueError, "question_ids: batch size"), "mask": (ValueError, "question_mask:")}


@settings(SWEEP, max_examples=100)
@given(kind=st.sampled_from(list(VQA_ERRORS)), data=st.data())
def test_vqa_model(kind, data):
  model = vqa_model()
  b, q = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
  images = np.zeros((b, 75, 75, 3), np.float32)
  ids = np.ones((b, q, 16), np.int32)
  mask = np.ones((b, q, 16), bool)
  if kind == "image_shape":
    images = np.zeros(data.draw(st.one_of(shapes(3, 1, 80), shapes(4, 1, 80)).filter(
        lambda s: len(s) != 4 or s[1:] != (75, 75, 3))), np.float32)
  elif kind == "image_dtype":
    images = images.astype(np.uint8)
  elif kind == "image_nan":
    images = poison(images, data)
  elif kind == "ids_dtype":
    ids = ids.astype(np.float32)
  elif kind == "ids_rank":
    ids = np.ones(data.draw(shapes(data.draw(st.sampled_from([1, 4])))), np.int32)
  elif kind == "ids_range":
    ids = poison(ids, data, data.draw(st.one_of(st.integers(-99, -1), st.integers(40, 10**5))))
  elif kind == "batch":
    ids, mask = np.ones((data.draw(st.integers(1, 4).filter(lambda n: n != b)), q, 16), np.int32), None
  else:
    mask = np.ones(data.draw(shapes(3).filter(lambda s: s != (b, q, 16))), bool)
  expect(f"vqa {kind}",
         lambda: model(jnp.asarray(images), jnp.asarray(ids), None if mask is None else jnp.asarray(mask)),
         *VQA_ERRORS[kind])


# ---------------------------------------------------------------------------------------------
# pp ops, manifests, config loading.
# ---------------------------------------------------------------------------------------------
@functools.cache
def tokenize_op(max_len: int = 8):
  folder = tempfile.mkdtemp()
  tok = tokenizer_lib.train_wordpiece(["what shape is the red object", "is it a circle"] * 5)
  path = os.path.join(folder, "tokenizer.json")
  tokenizer_lib.save_tokenizer(tok, path)
  return pp.parse(f"text.tokenize({max_len}, {path!r}, key='question')")


WHITESPACE = st.text(alphabet=" \t\n\r\u00a0\u2003", max_size=6)


@settings(SWEEP, max_examples=100)
@given(kind=st.sampled_from(["blank", "type", "missing", "long", "blank_in_list", "image_rank", "image_bytes",
                             "image_undecoded", "wave_empty", "wave_nan"]), data=st.data())
def test_pp_ops(kind, data):
  rng = np.random.default_rng(0)
  case = f"pp {kind}"
  if kind == "blank":
    expect(case, lambda: tokenize_op()({"id": 1, "question": data.draw(WHITESPACE)}, rng), pp.BadExample,
           "record id=1: field 'question':")
  elif kind == "blank_in_list":
    texts = ["is it red"] * data.draw(st.integers(0, 3)) + [data.draw(WHITESPACE)]
    expect(case, lambda: tokenize_op()({"id": 1, "question": texts}, rng), pp.BadExample,
           f"record id=1: field 'question[{len(texts) - 1}]':")
  elif kind == "type":
    value = data.draw(st.sampled_from([3, 2.5, None, {"a": 1}]))
    expect(case, lambda: tokenize_op()({"id": 1, "question": value}, rng), TypeError, "record id=1: field 'question':")
  elif kind == "missing":
    expect(case, lambda: tokenize_op()({"id": 1, "text": "is it red"}, rng), KeyError,
           "record id=1: no field 'question'")
  elif kind == "long":  # over-long text is truncated to max_len, not an error
    words = " ".join(data.draw(st.lists(st.sampled_from(["red", "circle", "what", "zzz"]), min_size=9, max_size=200)))
    out = tokenize_op()({"id": 1, "question": words}, rng)
    assert out["question_ids"].shape == (8,) and out["question_mask"].all()
    event(f"{case}: truncated")
  elif kind == "image_rank":
    x = np.zeros(data.draw(shapes(data.draw(st.sampled_from([0, 1, 4])))), np.uint8)
    expect(case, lambda: pp.parse("image.resize(4)")({"id": 1, "image": x}, rng), TypeError,
           "record id=1: field 'image':")
  elif kind == "image_bytes":
    junk = data.draw(st.binary(min_size=0, max_size=64))
    expect(case, lambda: pp.parse("image.decode")({"id": 1, "image": junk}, rng), pp.BadExample,
           "record id=1: field 'image':")
  elif kind == "image_undecoded":
    op = data.draw(st.sampled_from(["image.value_range(0, 1)", "image.resize(4)", "image.flip_lr(p=1.0)"]))
    expect(case, lambda: pp.parse(op)({"id": 1, "image": b"\x89PNG..."}, rng), TypeError, "record id=1: field 'image':")
  else:
    log_mel = pp.parse("audio.log_mel(sample_rate=8000, n_fft=64, hop_length=32, n_mels=8)")
    if kind == "wave_empty":
      expect(case, lambda: log_mel({"id": 1, "audio": np.zeros((0,), np.float32), "audio_rate": 8000}, rng),
             pp.BadExample, "record id=1: field 'audio':")
    else:  # the front end's own check: a plain ValueError without the record id
      wave = poison(np.ones(256, np.float32), data)
      expect(case, lambda: log_mel({"id": 1, "audio": wave, "audio_rate": 8000}, rng), ValueError, "audio:")


@settings(SWEEP, max_examples=60)
@given(kind=st.sampled_from(["absolute", "dotdot", "missing", "label", "columns", "json", "empty_path"]),
       data=st.data())
def test_manifests(kind, data):
  with tempfile.TemporaryDirectory() as d:
    root = pathlib.Path(d)
    (root / "a.png").write_bytes(b"png")
    rows = [{"image": "a.png", "label": 0}] * data.draw(st.integers(int(kind == "columns"), 3))
    line = len(rows) + 1
    name = data.draw(st.text(alphabet="bcxyz", min_size=1, max_size=5))
    field = {"label": "label:", "columns": "fields", "json": "invalid JSON"}.get(kind, "image:")
    bad = {"absolute": {"image": f"/{name}.png", "label": 0},
           "dotdot": {"image": f"../{name}.png", "label": 0},
           "missing": {"image": f"{name}.png", "label": 0},
           "label": {"image": "a.png", "label": data.draw(st.sampled_from([-1, 1.5, [1], None]))},
           "columns": {"image": "a.png", "text": "extra", "label": 0},
           "empty_path": {"image": data.draw(WHITESPACE), "label": 0},
           "json": None}[kind]
    text = "".join(json.dumps(r) + "\n" for r in rows) + ("{not json\n" if bad is None else json.dumps(bad) + "\n")
    (root / "m.jsonl").write_text(text)
    expect(f"manifest {kind}", lambda: manifest.load_manifest(root / "m.jsonl"), manifest.ManifestError,
           f"line {line}: {field}")


@settings(SWEEP, max_examples=120)
@given(kind=st.sampled_from(["arg", "arg_syntax", "override", "nested", "fusion", "task"]),
       name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))
def test_config_loading(kind, name):
  case = f"config {kind}"
  if kind == "arg":
    assume(name not in ("size", "fusion"))
    expect(case, lambda: parse_arg(f"{name}=1", size="tiny", fusion="film"), ValueError, f"config arg {name!r} ")
  elif kind == "arg_syntax":
    expect(case, lambda: parse_arg(f"size=tiny,{name}", size="tiny"), ValueError, f"config arg {name!r}:")
  elif kind == "override":
    config = _base_config()
    assume(name not in config.train)
    expect(case, lambda: set_path(config, f"train.{name}", "3"), KeyError, f"config key 'train.{name}' ")
  elif kind == "nested":
    config = _base_config()
    assume(name not in config)
    expect(case, lambda: set_path(config, f"{name}.lr", "3"), KeyError, f"config key {name!r} ")
  elif kind == "fusion":
    assume(name not in FUSIONS)
    expect(case, lambda: build_fusion(name, modalities=DIMS, features=8, rngs=nnx.Rngs(0)), KeyError,
           f"unknown fusion {name!r}")
  else:
    from mmjax.train.trainer import Setup  # pylint: disable=g-import-not-at-top
    config = _base_config().copy_and_resolve_references()
    config.task = name
    expect(case, lambda: Setup(config), KeyError, f"unknown task {name!r}")


@functools.cache
def _base_config():
  return load_config(CONFIG + ":size=tiny")



# ---------------------------------------------------------------------------------------------
# Files that are not what their field says: a predictor request and a manifest line alike.
# ---------------------------------------------------------------------------------------------
def _media_files(root: pathlib.Path) -> dict[str, tuple[str, str]]:
  """Broken files under root: case -> (file name, field)."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import soundfile  # pylint: disable=g-import-not-at-top

  noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  for ext in ("png", "jpg"):
    PIL.Image.fromarray(noise).save(root / f"whole.{ext}")
    whole = (root / f"whole.{ext}").read_bytes()
    (root / f"cut.{ext}").write_bytes(whole[:len(whole) // 2])  # a valid header, the body cut off
  (root / "notes.wav").write_text("not audio, a text file named .wav\n")
  soundfile.write(root / "whole.wav", np.zeros(800, np.float32), 8000)
  (root / "header.wav").write_bytes((root / "whole.wav").read_bytes()[:44])  # the header, no samples
  return {"cut_png": ("cut.png", "image"), "cut_jpg": ("cut.jpg", "image"),
          "text_image": ("notes.wav", "image"), "text_wav": ("notes.wav", "audio"),
          "empty_wav": ("header.wav", "audio")}


MEDIA_ERRORS = {"cut_png": "is not an image file (PNG, JPEG, ...): OSError: image file is truncated",
                "cut_jpg": "is not an image file (PNG, JPEG, ...): OSError: image file is truncated",
                "text_image": "is not an image file (PNG, JPEG, ...): UnidentifiedImageError",
                "text_wav": "is not an audio file (WAV, FLAC, OGG): LibsndfileError",
                "empty_wav": "holds no audio samples"}


def test_files_that_are_not_media_name_the_request_field_and_the_manifest_line(tmp_path):
  from mmjax import predict  # pylint: disable=g-import-not-at-top

  files = _media_files(tmp_path)
  for case, (name, field) in files.items():
    path = str(tmp_path / name)
    read = {"image": predict.read_image, "audio": predict.read_wav}[field]
    with pytest.raises(ValueError) as e:
      read(path, field="items[2]")
    assert str(e.value).startswith(f"items[2]: {path!r} {MEDIA_ERRORS[case]}"), (case, str(e.value))
  rows = [{"image": "whole.png", "audio": "whole.wav"}]
  rows += [{"image": n if f == "image" else "whole.jpg", "audio": n if f == "audio" else "whole.wav"}
           for n, f in files.values()]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = manifest.load_manifest(tmp_path / "m.jsonl")
  # Headers only: an image cut short passes here and is named by the pipeline's image.decode.
  header_level = [c for c in files if not c.startswith("cut_")]
  with pytest.raises(manifest.ManifestError, match=f"{len(header_level)} problem") as e:
    manifest.verify_files(source)
  for line, (case, (name, field)) in enumerate(files.items(), start=2):
    reported = f"m.jsonl:{line}: {field}: {str(tmp_path / name)!r}" in str(e.value)
    assert reported == (case in header_level), (case, str(e.value))
    if reported:
      assert f"m.jsonl:{line}: {field}: {str(tmp_path / name)!r} {MEDIA_ERRORS[case]}" in str(e.value), case
