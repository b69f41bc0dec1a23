"""Multimodal classifier (image + audio, as AV digits): shapes, an absent modality leaves the logits
unchanged whatever its inputs hold (NaN included), the joint loss is the configured weighted sum of
the heads' cross-entropies (checked against numpy), gradients reach each present encoder and none
reaches an absent one, and a few Adam steps with modality dropout reduce the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmjax.models import MODELS
from mmjax.models.classifier import MultimodalClassifier

C, B, F, M = 4, 8, 16, 8  # classes, batch, audio frames, mel bands
WEIGHTS = {"fused": 1.0, "image": 0.3, "audio": 0.5}
ENCODERS = {
    "image": {"name": "small_cnn", "features": 16, "channels": (8, 8), "norm": "none", "in_channels": 1},
    "audio": {"name": "audio_cnn", "features": 16, "channels": (4,), "n_mels": M},
}
EXAMPLES = {"image": jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32),
            "audio": {"x": jax.ShapeDtypeStruct((1, F, M), jnp.float32),
                      "lengths": jax.ShapeDtypeStruct((1,), jnp.int32)}}
TX = optax.adam(1e-2)  # one instance: the optimizer is part of the compiled step's structure
_rng = np.random.default_rng(0)
IMAGES, SOUNDS = _rng.normal(size=(C, 8, 8, 1)), _rng.normal(size=(C, F, M))


def build(fusion="concat", **kw):
  # "rbg" keys: the same model, with initialisers several times cheaper to compile on CPU.
  return MODELS.build("classifier", encoders=ENCODERS, input_examples=EXAMPLES, fusion=fusion,
                      features=16, num_classes=C, loss_weights=WEIGHTS, modality_dropout=0.25,
                      rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **kw)


def batch(seed, audio_nan=None):
  """Class-k image and log-mel patterns plus noise; audio rows where `audio_nan` is True are NaN."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, B)
  images = IMAGES[labels] + 0.5 * rng.normal(size=(B, 8, 8, 1))
  audio = SOUNDS[labels] + 0.5 * rng.normal(size=(B, F, M))
  if audio_nan is not None:
    audio[np.asarray(audio_nan)] = np.nan
  inputs = {"image": jnp.asarray(images, jnp.float32),
            "audio": {"x": jnp.asarray(audio, jnp.float32), "lengths": jnp.asarray(rng.integers(8, F + 1, B))}}
  return inputs, jnp.asarray(labels, jnp.int32)


@nnx.jit
def forward(model, inputs, presence, labels):
  logits, aux = model(inputs, presence)
  return logits, aux, model.loss(logits, aux, labels)


@nnx.jit
def train_step(model, optimizer, inputs, presence, labels):
  def loss_fn(m):
    logits, aux = m(inputs, presence, deterministic=False)
    return m.loss(logits, aux, labels)[0]

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss, grads


@pytest.fixture(scope="module")
def model():
  return build()


def half_absent():
  return np.arange(B) % 2 == 1  # audio missing on odd examples


def test_shapes_and_aux(model):
  assert isinstance(model, MultimodalClassifier) and set(model.aux_heads) == {"image", "audio"}
  inputs, labels = batch(0)
  present = {"audio": jnp.asarray(~half_absent())}
  logits, aux, (loss, metrics) = forward(model, inputs, present, labels)
  assert logits.shape == (B, C) and logits.dtype == jnp.float32
  assert {k: v.shape for k, v in aux["unimodal_logits"].items()} == {"image": (B, C), "audio": (B, C)}
  assert {k: v.shape for k, v in aux["pooled"].items()} == {"image": (B, 16), "audio": (B, 16)}
  np.testing.assert_array_equal(np.asarray(aux["presence"]["audio"]), ~half_absent())
  np.testing.assert_array_equal(np.asarray(aux["fusion"]["present"]["audio"]), ~half_absent())
  assert loss.shape == () and np.isfinite(float(loss))
  assert float(metrics["accuracy"]) == float(metrics["fused/accuracy"])


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_absent_modality_leaves_the_logits_unchanged(fusion, model):
  m = model if fusion == "concat" else build(fusion)
  absent = half_absent()
  present = {"audio": jnp.asarray(~absent)}
  inputs, labels = batch(1)
  nan_inputs, _ = batch(1, audio_nan=absent)
  other, _ = batch(2)  # different audio everywhere (and different images, restored below)
  other["image"] = inputs["image"]
  base = forward(m, inputs, present, labels)[0]
  with_nan = forward(m, nan_inputs, present, labels)[0]
  changed = forward(m, other, present, labels)[0]
  np.testing.assert_array_equal(np.asarray(with_nan), np.asarray(base))
  np.testing.assert_allclose(np.asarray(changed)[absent], np.asarray(base)[absent], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(changed)[~absent] - np.asarray(base)[~absent]).max() > 1e-4  # audio is used
  # Leaving the modality out of the inputs is the same as marking it absent.
  image_only = nnx.jit(lambda m, x: m({"image": x})[0])(m, inputs["image"])
  np.testing.assert_allclose(np.asarray(image_only)[absent], np.asarray(base)[absent], rtol=1e-5, atol=1e-6)


def _ce(logits, labels):
  """Per-example softmax cross-entropy in numpy."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), np.asarray(labels)]


def test_joint_loss_is_the_configured_weighted_sum(model):
  absent = half_absent()
  inputs, labels = batch(3, audio_nan=absent)
  logits, aux, (loss, metrics) = forward(model, inputs, {"audio": jnp.asarray(~absent)}, labels)
  fused = _ce(logits, labels).mean()
  image = _ce(aux["unimodal_logits"]["image"], labels).mean()
  audio = _ce(aux["unimodal_logits"]["audio"], labels)[~absent].mean()  # present examples only
  assert float(metrics["fused/loss"]) == pytest.approx(fused, rel=1e-5)
  assert float(metrics["image/loss"]) == pytest.approx(image, rel=1e-5)
  assert float(metrics["audio/loss"]) == pytest.approx(audio, rel=1e-5)
  assert float(metrics["audio/weight"]) == (~absent).sum()
  assert float(loss) == pytest.approx(1.0 * fused + 0.3 * image + 0.5 * audio, rel=1e-5)
  # Per-example weights (padding) multiply in; a modality left out contributes 0.
  w = np.arange(B) < 6
  total, _ = model.loss(logits, aux, labels, jnp.asarray(w))
  audio_w = _ce(aux["unimodal_logits"]["audio"], labels)[~absent & w].mean()
  ref = _ce(logits, labels)[w].mean() + 0.3 * _ce(aux["unimodal_logits"]["image"], labels)[w].mean() + 0.5 * audio_w
  assert float(total) == pytest.approx(ref, rel=1e-5)
  no_audio = {**aux, "unimodal_logits": {"image": aux["unimodal_logits"]["image"]}}
  total, parts = model.loss(logits, aux=no_audio, labels=labels)
  assert float(parts["audio/loss"]) == 0.0 and float(total) == pytest.approx(fused + 0.3 * image, rel=1e-5)


def _norm(tree):
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
  return max(float(np.abs(x).max()) for x in leaves)


def test_gradients_reach_each_present_encoder(model):
  inputs, labels = batch(4)
  m = nnx.clone(model)
  opt = nnx.Optimizer(m, TX, wrt=nnx.Param)
  _, g = train_step(m, opt, inputs, {"audio": jnp.ones(B, bool)}, labels)
  for part in (g["encoders"]["image"], g["encoders"]["audio"], g["fusion"], g["head"],
               g["aux_heads"]["image"], g["aux_heads"]["audio"]):
    assert _norm(part) > 0
  # Audio absent everywhere, with NaN placeholders: no gradient reaches its encoder or head, and
  # every gradient stays finite.
  nan_inputs, _ = batch(4, audio_nan=np.ones(B, bool))
  _, g = train_step(m, opt, nan_inputs, {"audio": jnp.zeros(B, bool)}, labels)
  assert _norm(g["encoders"]["image"]) > 0 and _norm(g["aux_heads"]["image"]) > 0
  assert _norm(g["encoders"]["audio"]) == 0 and _norm(g["aux_heads"]["audio"]) == 0
  _norm(g)


def test_a_few_steps_reduce_the_loss(model):
  m = nnx.clone(model)
  opt = nnx.Optimizer(m, TX, wrt=nnx.Param)
  present = {"audio": jnp.asarray(~half_absent())}
  eval_inputs, eval_labels = batch(100)
  before = float(forward(m, eval_inputs, present, eval_labels)[2][0])
  for step in range(40):
    inputs, labels = batch(200 + step)
    train_step(m, opt, inputs, {"audio": jnp.asarray(np.random.default_rng(step).random(B) < 0.8)}, labels)
  after = float(forward(m, eval_inputs, present, eval_labels)[2][0])
  assert after < 0.5 * before, (before, after)


def test_bad_construction_and_inputs_are_rejected():
  kw = dict(encoders=ENCODERS, input_examples=EXAMPLES, fusion="concat", features=16, num_classes=C)
  with pytest.raises(ValueError, match=r"loss_weights: unknown term\(s\) \['text'\]"):
    nnx.eval_shape(lambda: MultimodalClassifier(**kw, loss_weights={"fused": 1.0, "text": 1.0}, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"loss_weights\['image'\]: expected a finite number >= 0"):
    nnx.eval_shape(lambda: MultimodalClassifier(**kw, loss_weights={"fused": 1.0, "image": -1}, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="loss_weights: expected a dict with 'fused'"):
    nnx.eval_shape(lambda: MultimodalClassifier(**kw, loss_weights={"image": 1.0}, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="input_examples"):
    nnx.eval_shape(lambda: MultimodalClassifier(**{**kw, "input_examples": {"image": EXAMPLES["image"]}},
                                                rngs=nnx.Rngs(0)))
  plain = nnx.eval_shape(lambda: MultimodalClassifier(**kw, rngs=nnx.Rngs(0)))
  assert len(plain.aux_heads) == 0 and plain.loss_weights == {"fused": 1.0}
  # Built and fused image first whatever the dict's order (a ConfigDict sorts "audio" first).
  assert plain.names == ("image", "audio") and list(ENCODERS) == ["image", "audio"]
  backwards = {"audio": ENCODERS["audio"], "image": ENCODERS["image"]}
  assert nnx.eval_shape(lambda: MultimodalClassifier(**{**kw, "encoders": backwards},
                                                     rngs=nnx.Rngs(0))).names == ("image", "audio")
  inputs, _ = batch(0)
  with pytest.raises(ValueError, match=r"presence\['audio'\]: expected shape \(B,\) = \(8,\)"):
    plain(inputs, {"audio": jnp.ones(3, bool)})
  with pytest.raises(ValueError, match="unknown modality 'text'"):
    plain({**inputs, "text": jnp.zeros((B, 4), jnp.int32)})
  with pytest.raises(ValueError, match="same batch size"):
    plain({**inputs, "image": inputs["image"][:3]})


def test_param_dtype_reaches_every_parameter():
  """param_dtype is the encoders', the fusion's and the head's (an MLP head included)."""
  model = nnx.eval_shape(lambda: build(head_hidden=8, param_dtype=jnp.bfloat16))
  dtypes = {str(p[:2]): str(v.get_value().dtype) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  assert set(dtypes.values()) == {"bfloat16"}, {k: v for k, v in dtypes.items() if v != "bfloat16"}
