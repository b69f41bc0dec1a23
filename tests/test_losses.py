"""Losses against naive numpy references; contrastive losses sharded over 8 devices; joint loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import losses
from mmjax.sharding import make_mesh


def _log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _run(fn, *args, **kwargs):
  """`fn(*args, **kwargs)` under one jit (eager op-by-op dispatch compiles every primitive)."""
  return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def _pairs(b=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d))
  y = x + 0.8 * rng.normal(size=(b, d))  # matched pairs are more similar than random ones
  return x.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------- numpy references


def _ref_info_nce(q, k, scale):
  """Loop over queries: -log(exp(s q_i.k_i) / sum_j exp(s q_i.k_j))."""
  q, k = _unit(q.astype(np.float64)), _unit(k.astype(np.float64))
  out = []
  for i in range(len(q)):
    logits = scale * np.array([q[i] @ k[j] for j in range(len(k))])
    out.append(-(logits[i] - np.log(np.sum(np.exp(logits)))))
  return np.mean(out)


def _ref_siglip(x, y, scale, bias):
  x, y = _unit(x.astype(np.float64)), _unit(y.astype(np.float64))
  total = 0.0
  for i in range(len(x)):
    for j in range(len(y)):
      z = 1.0 if i == j else -1.0
      total -= _log_sigmoid(z * (scale * x[i] @ y[j] + bias))
  return total / len(x)


# ------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_matches_numpy_with_smoothing_and_weights(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, size=(3, 5))
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32) * rng.uniform(0.5, 2.0, size=(3, 5))
  q = (1 - smoothing) * np.eye(7)[labels] + smoothing / 7
  per = -(q * _log_softmax(logits.astype(np.float64))).sum(-1)
  ref = (per * weights).sum() / weights.sum()
  loss, m = _run(losses.softmax_cross_entropy, logits, labels, weights=weights, label_smoothing=smoothing)
  assert float(loss) == pytest.approx(ref, rel=1e-6)
  assert float(m["weight"]) == pytest.approx(weights.sum(), rel=1e-6)
  acc = ((logits.argmax(-1) == labels) * weights).sum() / weights.sum()
  assert float(m["accuracy"]) == pytest.approx(acc, rel=1e-6)
  # optax agrees without weights (its own smoothing + CE, averaged).
  opt = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 7), smoothing)).mean()
  unweighted = _run(losses.softmax_cross_entropy, logits, labels, label_smoothing=smoothing)[0]
  assert float(unweighted) == pytest.approx(float(opt), rel=1e-6)


def test_losses_of_an_all_padding_batch_are_zero_not_nan():
  logits = jnp.ones((4, 3))
  zero = jnp.zeros((4,), bool)
  assert float(_run(losses.softmax_cross_entropy, logits, jnp.zeros((4,), jnp.int32), weights=zero)[0]) == 0.0
  assert float(_run(losses.soft_score_bce, logits, jnp.zeros((4, 3)), weights=zero)[0]) == 0.0
  x, y = _pairs(4)
  assert float(_run(losses.clip_loss, x, y, 1.0, mask=zero)[0]) == 0.0
  assert float(_run(losses.siglip_loss, x, y, 1.0, -1.0, mask=zero)[0]) == 0.0


def test_bad_inputs_name_the_field():
  with pytest.raises(ValueError, match="labels"):
    _run(losses.softmax_cross_entropy, jnp.ones((4, 3)), jnp.zeros((5,), jnp.int32))
  with pytest.raises(TypeError, match="labels"):
    _run(losses.softmax_cross_entropy, jnp.ones((4, 3)), jnp.zeros((4,)))
  with pytest.raises(ValueError, match="weights"):
    _run(losses.softmax_cross_entropy, jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32), weights=jnp.ones((3,)))
  with pytest.raises(ValueError, match="label_smoothing"):
    _run(losses.softmax_cross_entropy, jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32), label_smoothing=1.0)
  with pytest.raises(ValueError, match="text_emb"):
    _run(losses.clip_loss, jnp.ones((4, 3)), jnp.ones((5, 3)), 1.0)
  with pytest.raises(ValueError, match="log_scale"):
    _run(losses.clip_loss, jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((2,)))
  with pytest.raises(ValueError, match="scores"):
    _run(losses.soft_score_bce, jnp.ones((4, 3)), jnp.ones((4, 2)))


def test_soft_score_bce_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 10)).astype(np.float32) * 2
  scores = np.minimum(rng.integers(0, 5, size=(6, 10)) / 3.0, 1.0).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 1, 0], bool)
  x = logits.astype(np.float64)
  bce = -(scores * _log_sigmoid(x) + (1 - scores) * _log_sigmoid(-x))
  ref = bce.sum(-1)[mask].mean()
  loss, m = _run(losses.soft_score_bce, logits, scores, weights=mask)
  assert float(loss) == pytest.approx(ref, rel=1e-6)
  assert float(m["score"]) == pytest.approx(scores[np.arange(6), logits.argmax(-1)][mask].mean(), rel=1e-6)


def test_mse_with_sequence_weights():
  rng = np.random.default_rng(2)
  pred, target = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
  w = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  ref = (((pred - target) ** 2).mean(-1) * w).sum() / w.sum()
  loss, _ = _run(losses.mse, jnp.asarray(pred), jnp.asarray(target), weights=jnp.asarray(w))
  assert float(loss) == pytest.approx(ref, rel=1e-6)
  unweighted = _run(losses.mse, jnp.asarray(pred), jnp.asarray(target))[0]
  assert float(unweighted) == pytest.approx(((pred - target) ** 2).mean(), rel=1e-6)
  with pytest.raises(ValueError, match="weights"):
    _run(losses.mse, jnp.asarray(pred), jnp.asarray(target), weights=jnp.ones((3,)))


# ---------------------------------------------------------------------------------- contrastive


def test_info_nce_and_clip_match_naive_numpy():
  x, y = _pairs()
  log_scale = np.log(1 / 0.07)
  scale = np.exp(log_scale)
  loss, m = _run(losses.info_nce, x, y, log_scale)
  assert float(loss) == pytest.approx(_ref_info_nce(x, y, scale), rel=1e-5)
  clip, cm = _run(losses.clip_loss, x, y, log_scale)
  ref = 0.5 * (_ref_info_nce(x, y, scale) + _ref_info_nce(y, x, scale))
  assert float(clip) == pytest.approx(ref, rel=1e-5)
  assert 0.5 < float(cm["i2t_accuracy"]) <= 1.0 and float(cm["scale"]) == pytest.approx(scale, rel=1e-6)


def test_siglip_matches_naive_numpy():
  x, y = _pairs()
  loss, m = _run(losses.siglip_loss, x, y, np.log(10.0), -10.0)
  assert float(loss) == pytest.approx(_ref_siglip(x, y, 10.0, -10.0), rel=1e-5)
  loss2, _ = _run(losses.siglip_loss, x, y, 1.3, 0.7)
  assert float(loss2) == pytest.approx(_ref_siglip(x, y, np.exp(1.3), 0.7), rel=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_masked_contrastive_equals_the_loss_on_the_real_examples(kind):
  """Padding rows are neither positives nor negatives: the masked loss equals the loss of the subset."""
  x, y = _pairs(12)
  keep = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
  fn = (lambda a, b, **kw: _run(losses.clip_loss, a, b, 2.0, **kw)) if kind == "clip" else \
       (lambda a, b, **kw: _run(losses.siglip_loss, a, b, 2.0, -3.0, **kw))
  masked = fn(x, 1e3 * np.ones_like(y) * ~keep[:, None] + y, mask=keep)[0]  # junk in padded rows
  assert float(masked) == pytest.approx(float(fn(x[keep], y[keep])[0]), rel=1e-6)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest provides 8 CPU devices"
  return make_mesh({"data": 8})


def test_contrastive_losses_and_grads_sharded_over_8_devices_equal_single_device(mesh):
  x, y = _pairs(32, 16, seed=3)
  mask = np.ones(32, bool)
  mask[[5, 17, 30]] = False
  params = (jnp.float32(2.5), jnp.float32(-4.0))

  def all_losses(x, y, mask, log_scale, bias):
    values = (losses.clip_loss(x, y, log_scale, mask=mask)[0],
              losses.siglip_loss(x, y, log_scale, bias, mask=mask)[0],
              losses.info_nce(x, y, log_scale, mask=mask)[0])
    return sum(values), values

  # One program gives the three losses and the gradients of their sum.
  fn = jax.jit(jax.value_and_grad(all_losses, argnums=(0, 1, 3, 4), has_aux=True))
  one = jax.devices()[0]
  (_, single), g1 = fn(*(jax.device_put(a, one) for a in (x, y, mask)), *params)
  rows = NamedSharding(mesh, P("data"))
  xs, ys, ms = (jax.device_put(a, rows) for a in (x, y, mask))
  assert len(xs.sharding.device_set) == 8 and xs.addressable_shards[0].data.shape == (4, 16)
  (_, sharded), g8 = fn(xs, ys, ms, *params)
  for a, b in zip(single, sharded):
    assert float(a) == pytest.approx(float(b), rel=1e-6)  # ~2 float32 ulps: reduction order differs
  for a, b in zip(g1, g8):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert len(g8[0].sharding.device_set) == 8  # the embedding gradients stay sharded
  for g in g1:  # finite, and they reach the embeddings, the temperature and the bias
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


# ---------------------------------------------------------------------------------- joint loss


def test_joint_loss_weighted_sum_and_metrics():
  terms = {"vqa": (jnp.float32(2.0), {"score": jnp.float32(0.5)}), "caption": jnp.float32(3.0),
           "aux_audio": jnp.float32(1.0)}
  weights = ml_collections.ConfigDict({"vqa": 1.0, "caption": 0.5, "aux_audio": 0.0})
  total, m = losses.joint_loss(terms, weights)
  assert float(total) == pytest.approx(2.0 + 1.5)
  assert float(m["loss"]) == float(total) and float(m["vqa/score"]) == 0.5 and float(m["caption/loss"]) == 3.0
  jitted = jax.jit(lambda a, b: losses.joint_loss({"vqa": a, "caption": b}, {"vqa": 2.0, "caption": 1.0})[0])
  assert float(jitted(1.0, 1.0)) == pytest.approx(3.0)


def test_joint_loss_rejects_missing_unknown_and_bad_weights():
  terms = {"vqa": jnp.float32(1.0), "caption": jnp.float32(1.0)}
  with pytest.raises(ValueError, match=r"no weight for terms \['caption'\]"):
    losses.joint_loss(terms, {"vqa": 1.0})
  with pytest.raises(ValueError, match=r"unknown terms \['audio'\]"):
    losses.joint_loss(terms, {"vqa": 1.0, "caption": 1.0, "audio": 1.0})
  with pytest.raises(ValueError, match="weights\\['vqa'\\]"):
    losses.joint_loss(terms, {"vqa": -1.0, "caption": 1.0})
  with pytest.raises(ValueError, match="scalar"):
    losses.joint_loss({"vqa": jnp.ones(3)}, {"vqa": 1.0})
  with pytest.raises(TypeError, match="weights"):
    losses.joint_loss(terms, [1.0, 1.0])


@pytest.mark.parametrize("kind", ["softmax_ce", "soft_score_bce", "mse", "info_nce", "clip", "siglip"])
def test_nan_at_a_masked_row_reaches_neither_the_loss_nor_the_gradients(kind):
  """A padded example may carry garbage (NaN, Inf): its rows count for nothing in the value, and the
  backward pass must not turn them into NaN gradients either (0 * NaN is NaN)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  mask = jnp.array([True, True, True, False])
  labels, scores = jnp.array([0, 3, 5, 1]), jnp.asarray(rng.uniform(size=(4, 6)), jnp.float32)
  fns = {
      "softmax_ce": lambda a, b: losses.softmax_cross_entropy(a, labels, weights=mask)[0],
      "soft_score_bce": lambda a, b: losses.soft_score_bce(a, scores, weights=mask)[0],
      "mse": lambda a, b: losses.mse(a, b, weights=mask)[0],
      "info_nce": lambda a, b: losses.info_nce(a, b, 2.0, mask=mask)[0],
      "clip": lambda a, b: losses.clip_loss(a, b, 2.0, mask=mask)[0],
      "siglip": lambda a, b: losses.siglip_loss(a, b, 2.0, -1.0, mask=mask)[0],
  }
  fn = fns[kind]
  want = fn(x, y)
  poisoned = x.at[3].set(jnp.nan), y.at[3].set(jnp.inf)
  got, grads = jax.value_and_grad(fn, argnums=(0, 1))(*poisoned)
  assert got == want
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(g[3] == 0))
