"""Dual encoders (CLIP, SigLIP): unit-norm embeddings, the loss is `mmjax.losses` on them, gradients
reach both towers and the temperature/bias, a few Adam steps learn a synthetic image<->token matching
(recall@1 far above chance), and the loss with the batch sharded over 8 devices equals one device's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import losses, sharding
from mmjax.metrics.retrieval import recall_at_k
from mmjax.models import MODELS
from mmjax.models.dual_encoder import DualEncoder, l2_normalize

K, E, HW, L = 8, 8, 16, 4  # classes, embedding width, image side, text length
TOWERS = {
    "image": {"name": "small_cnn", "features": 16, "channels": (8, 8), "norm": "none", "in_channels": 1},
    "text": {"name": "rnn_text", "vocab_size": 16, "features": 16, "hidden": 16, "bidirectional": False,
             "pool": "mean"},
}
EXAMPLES = {"image": jax.ShapeDtypeStruct((1, HW, HW, 1), jnp.float32),
            "text": jax.ShapeDtypeStruct((1, L), jnp.int32)}
PATTERNS = np.random.default_rng(0).normal(size=(K, HW, HW, 1)).astype(np.float32)


def batch(labels, seed):
  """Image of class k (a fixed pattern plus noise) paired with the text [k + 1, 9 + k % 2, pad, pad]."""
  labels = np.asarray(labels)
  noise = np.random.default_rng(seed).normal(size=(len(labels), HW, HW, 1)).astype(np.float32)
  ids = np.zeros((len(labels), L), np.int32)
  ids[:, 0], ids[:, 1] = labels + 1, 9 + labels % 2
  return {"image": jnp.asarray(PATTERNS[labels] + 0.5 * noise), "text": jnp.asarray(ids)}


def build(loss_type, seed=0):
  # "rbg" keys: the same model, with initialisers several times cheaper to compile on CPU.
  return MODELS.build("dual_encoder", encoders=TOWERS, input_examples=EXAMPLES, embed_dim=E,
                      loss_type=loss_type, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))


@nnx.jit
def forward(model, inputs):
  emb, aux = model(inputs)
  return emb, aux, model.loss(emb)


@nnx.jit
def train_step(model, optimizer, inputs):
  def loss_fn(m):
    return m.loss(m(inputs, deterministic=False)[0])[0]

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss, grads


def recall_at_1(model, seed):
  emb, _, _ = forward(model, batch(np.arange(K), seed))
  r = recall_at_k(model.similarity(emb["image"], emb["text"]), np.arange(K), ks=(1,))
  return r["i2t_r@1"], r["t2i_r@1"]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def loss_type(request):
  return request.param


@pytest.fixture(scope="module")
def trained(loss_type):
  """Trains a fresh model 60 Adam steps on random permutations of the K classes."""
  model = build(loss_type)
  assert isinstance(model, DualEncoder)
  before = recall_at_1(model, seed=999)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  rng = np.random.default_rng(1)
  losses_, first_grads = [], None
  for step in range(60):
    loss, grads = train_step(model, optimizer, batch(rng.permutation(K), seed=step + 10))
    first_grads = grads if first_grads is None else first_grads
    losses_.append(float(loss))
  return {"model": model, "losses": losses_, "grads": first_grads, "before": before,
          "after": recall_at_1(model, seed=999)}


def test_published_init_constants():
  clip, real = build("clip"), build("siglip")
  assert clip.bias is None
  assert float(clip.log_scale[...]) == pytest.approx(np.log(1 / 0.07))
  assert float(real.log_scale[...]) == pytest.approx(np.log(10.0))
  assert float(real.bias[...]) == -10.0
  assert "kernel" in nnx.to_pure_dict(nnx.state(real.proj["image"]))
  assert "bias" not in nnx.to_pure_dict(nnx.state(real.proj["image"]))  # CLIP's projections have no bias


def test_embeddings_are_unit_norm_and_the_loss_is_mmjax_losses(loss_type):
  model = build(loss_type, seed=3)
  emb, aux, (loss, metrics) = forward(model, batch(np.arange(K), seed=0))
  assert set(emb) == {"image", "text"}
  for z in emb.values():
    assert z.shape == (K, E) and z.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, atol=1e-5)
  assert aux["pooled"]["image"].shape == (K, 16) and aux["pooled"]["text"].shape == (K, 16)
  if loss_type == "clip":
    ref, _ = jax.jit(losses.clip_loss)(emb["image"], emb["text"], np.log(1 / 0.07))
    assert float(aux["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(aux["logit_bias"]) == 0.0
  else:
    ref, _ = jax.jit(losses.siglip_loss)(emb["image"], emb["text"], np.log(10.0), -10.0)
    assert float(aux["logit_scale"]) == pytest.approx(10.0, rel=1e-5)
    assert float(aux["logit_bias"]) == -10.0
  assert float(loss) == pytest.approx(float(ref), rel=1e-5)
  assert float(metrics["loss"]) == float(loss)
  sim = model.similarity(emb["image"], emb["text"])
  np.testing.assert_allclose(np.asarray(sim), np.asarray(emb["image"]) @ np.asarray(emb["text"]).T, atol=1e-5)


def test_gradients_reach_both_towers_and_the_temperature(trained, loss_type):
  g = trained["grads"]
  for tower in ("image", "text"):
    leaves = jax.tree.leaves(g["encoders"][tower]) + jax.tree.leaves(g["proj"][tower])
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert max(float(jnp.abs(x).max()) for x in leaves) > 0, tower
  assert float(jnp.abs(g["log_scale"][...])) > 0
  if loss_type == "siglip":
    assert float(jnp.abs(g["bias"][...])) > 0


def test_a_few_steps_learn_the_matching(trained):
  losses_ = trained["losses"]
  assert np.mean(losses_[-5:]) < 0.5 * np.mean(losses_[:5]), losses_
  i2t, t2i = trained["after"]
  assert i2t >= 0.5 and t2i >= 0.5, (trained["before"], trained["after"])  # chance is 1 / 8


def test_sharded_loss_equals_one_device():
  """SigLIP (scale and bias) with the batch split over 8 devices ('data') gives one device's loss."""
  model = build("siglip", seed=5)
  inputs = batch(np.arange(16) % K, seed=3)
  fn = nnx.jit(lambda m, x: m.loss(m(x)[0])[0])
  one = jax.devices()[0]
  loss1 = fn(model, jax.device_put(inputs, one))
  mesh = sharding.make_mesh({"data": 8})
  sharded = jax.device_put(inputs, NamedSharding(mesh, P("data")))
  assert sharded["image"].addressable_shards[0].data.shape == (2, HW, HW, 1)
  nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))  # replicated
  with sharding.axis_rules(sharding.DEFAULT_RULES, mesh):
    loss8 = fn(model, sharded)
  assert float(loss8) == pytest.approx(float(loss1), rel=1e-5)


def test_bad_construction_and_inputs_are_rejected():
  with pytest.raises(ValueError, match="exactly two"):
    DualEncoder(encoders={"image": TOWERS["image"]}, input_examples=EXAMPLES, embed_dim=E, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="loss_type"):
    DualEncoder(encoders=TOWERS, input_examples=EXAMPLES, embed_dim=E, loss_type="nce", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="input_examples"):
    DualEncoder(encoders=TOWERS, input_examples={"image": EXAMPLES["image"]}, embed_dim=E, rngs=nnx.Rngs(0))
  model = nnx.eval_shape(lambda: build("clip"))
  with pytest.raises(ValueError, match="missing embeddings of tower"):
    model.loss({"image": jnp.zeros((2, E))})
  with pytest.raises(ValueError, match="tower 'audio'"):
    model({"audio": jnp.zeros((2, 3))})
  with pytest.raises(ValueError, match=r"a: expected embeddings of shape \(N, 8\)"):
    model.similarity(jnp.zeros((2, 3)), jnp.zeros((2, E)))


def test_without_projection_the_towers_output_the_shared_space():
  """projection=False: no projection parameters, and the embeddings are the towers' own pooled
  vectors normalised (as SigLIP's towers with their heads); a tower of another width is refused."""
  towers = {"image": dict(TOWERS["image"], features=E), "text": dict(TOWERS["text"], hidden=E)}  # pooled: E
  model = DualEncoder(encoders=towers, input_examples=EXAMPLES, embed_dim=E, projection=False,
                      loss_type="siglip", rngs=nnx.Rngs(0))
  assert model.proj is None
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert not any(p.startswith("proj") for p in paths) and "encoders/image/proj/kernel" in paths
  inputs = batch(np.arange(4), seed=1)
  emb, aux = forward(model, inputs)[:2]
  for m in ("image", "text"):
    np.testing.assert_allclose(np.asarray(emb[m]), np.asarray(l2_normalize(aux["pooled"][m])), atol=1e-6)
  with pytest.raises(ValueError, match=r"projection=False: each tower's pooled width must equal embed_dim=8"):
    DualEncoder(encoders=TOWERS, input_examples=EXAMPLES, embed_dim=E, projection=False, rngs=nnx.Rngs(0))


def test_tower_order_does_not_follow_the_dict_order():
  """ConfigDict sorts keys, so the towers are built and ordered image before text whatever order
  the dict lists them in: the same parameters, the images as the rows."""
  make = lambda towers: nnx.state(DualEncoder(encoders=towers, input_examples=EXAMPLES, embed_dim=E,
                                              rngs=nnx.Rngs(0)), nnx.Param)
  reverse = {"text": TOWERS["text"], "image": TOWERS["image"]}
  a, b = make(TOWERS), make(reverse)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  built = DualEncoder(encoders=reverse, input_examples=EXAMPLES, embed_dim=E, rngs=nnx.Rngs(0))
  assert built.names == ("image", "text")


def test_param_dtype_reaches_the_towers():
  """The model's param_dtype is every tower's too (a spec's own param_dtype wins); only the logit
  scale and bias stay float32."""
  def dtypes(model):
    out = {}
    for path, v in nnx.iter_graph(model):
      if isinstance(v, nnx.Param):
        out.setdefault(str(v[...].dtype), set()).add(path[0])
    return out

  model = MODELS.build("dual_encoder", encoders=TOWERS, input_examples=EXAMPLES, embed_dim=E,
                       loss_type="siglip", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert dtypes(model) == {"bfloat16": {"encoders", "proj"}, "float32": {"log_scale", "bias"}}
  towers = {**TOWERS, "text": {**TOWERS["text"], "param_dtype": jnp.float32}}
  model = MODELS.build("dual_encoder", encoders=towers, input_examples=EXAMPLES, embed_dim=E,
                       loss_type="clip", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert {str(v[...].dtype) for _, v in nnx.iter_graph(model.encoders["text"]) if isinstance(v, nnx.Param)} == {"float32"}
  assert {str(v[...].dtype) for _, v in nnx.iter_graph(model.encoders["image"]) if isinstance(v, nnx.Param)} == {"bfloat16"}
