"""Vision encoders: published parameter counts, shapes, gradients, dtypes, BatchNorm, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.encoders.base import ENCODERS, EncoderOutput
from mmjax.encoders.vision import ResNet, SmallCNN, ViT, decode_variant, grid_coords

TINY_VIT = dict(width=32, depth=1, heads=4, mlp_dim=64, patch=8, image_size=32)


@pytest.fixture(autouse=True)
def _fast_random_init():
  """Partitionable threefry takes seconds to compile per initialiser shape on XLA:CPU."""
  with jax.threefry_partitionable(False):
    yield


def n_params(model) -> int:
  """Parameter count of a (possibly abstract, from `nnx.eval_shape`) model."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def images(b=2, hw=32, c=3, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (b, hw, hw, c), dtype)


def test_decode_variant():
  assert decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, heads=12, patch=16)
  assert decode_variant("Ti/16") == dict(width=192, depth=12, mlp_dim=768, heads=3, patch=16)
  assert decode_variant("S/16")["width"] == 384 and decode_variant("B/32")["patch"] == 32
  assert decode_variant("L/16") == dict(width=1024, depth=24, mlp_dim=4096, heads=16, patch=16)
  for bad in ("B", "X/16", "B/x", None):
    with pytest.raises(ValueError, match="variant"):
      decode_variant(bad)


def test_published_parameter_counts_and_full_size_shapes():
  """Counts of timm vit_base_patch16_224 and torchvision resnet50/resnet18 with 1000 classes."""
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  vit = nnx.eval_shape(lambda: ViT("B/16", num_classes=1000, rngs=nnx.Rngs(0)))
  assert n_params(vit) == 86_567_656
  graphdef, state = nnx.split(vit)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  assert (out.tokens.shape, out.mask.shape, out.pooled.shape) == ((2, 196, 768), (2, 196), (2, 768))
  assert out.mask.dtype == jnp.bool_
  r50 = nnx.eval_shape(lambda: ResNet(50, num_classes=1000, rngs=nnx.Rngs(0)))
  assert n_params(r50) == 25_557_032
  out = nnx.eval_shape(lambda m, x: m(x), r50, x)
  assert (out.tokens.shape, out.pooled.shape) == ((2, 49, 2048), (2, 2048))
  r18 = nnx.eval_shape(lambda: ResNet(18, num_classes=1000, rngs=nnx.Rngs(0)))
  assert n_params(r18) == 11_689_512
  assert nnx.eval_shape(lambda m, x: m(x), r18, x).tokens.shape == (2, 49, 512)
  # Sort-of-CLEVR size: four stride-2 convs take 75 -> 38 -> 19 -> 10 -> 5.
  for norm in ("group", "none"):
    cnn = nnx.eval_shape(lambda: SmallCNN(48, norm=norm, coords=True, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m, x: m(x), cnn, jax.ShapeDtypeStruct((3, 75, 75, 3), jnp.float32))
    assert (out.tokens.shape, out.mask.shape, out.pooled.shape) == ((3, 25, 48), (3, 25), (3, 48))


# Tiny encoders; tests reuse these exact sizes so eagerly compiled initialisers are shared.
GRAD_CASES = {
    "vit": ("vit", dict(variant=None, num_classes=5, dropout=0.1, **TINY_VIT), 16),
    "resnet_basic_batch": ("resnet", dict(depth=18, width=8, stage_sizes=(1, 1), num_classes=3),
                           16),
    "small_cnn_batch_coords": ("small_cnn", dict(features=16, channels=(8, 8, 8), coords=True), 16),
    "small_cnn_attention": ("small_cnn", dict(features=16, channels=(8, 8, 8), norm="layer", coords=True,
                                              depth=1, num_heads=2), 16),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_encoder_shapes_mask_and_finite_gradients(case):
  name, kw, n_tokens = GRAD_CASES[case]
  model = ENCODERS.build(name, rngs=nnx.Rngs(0), **kw)
  x = images()

  def loss(m, x):
    out = m(x, deterministic=False)  # train mode: dropout on, BatchNorm on batch statistics
    extra = jnp.sum(m.head(out.pooled) ** 2) if getattr(m, "head", None) is not None else 0.0
    return jnp.mean(out.tokens ** 2) + jnp.mean(out.pooled ** 2) + extra, out

  grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Param), has_aux=True))
  (value, out), grads = grad_fn(model, x)
  assert isinstance(out, EncoderOutput)
  d = out.tokens.shape[-1]
  assert out.tokens.shape == (2, n_tokens, d) and out.pooled.shape == (2, d)
  assert out.mask.shape == (2, n_tokens) and out.mask.dtype == jnp.bool_ and bool(out.mask.all())
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  # Every parameter receives some gradient (nothing is disconnected).
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


@pytest.mark.parametrize("name, kw, n_tokens", [
    ("vit", dict(variant=None, pool="gap", posemb="sincos2d", **TINY_VIT), 16),
    ("resnet", dict(depth=18, width=8, stage_sizes=(1, 1), norm="group", norm_groups=4), 16),
    ("small_cnn", dict(features=16, channels=(8, 8, 8), norm="layer"), 16),
])
def test_bfloat16_compute_under_jax_jit(name, kw, n_tokens):
  model = ENCODERS.build(name, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **kw)
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images())
  assert out.tokens.shape[:2] == (2, n_tokens) and bool(out.mask.all())
  for a in (out.tokens, out.pooled):
    assert a.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(a.astype(jnp.float32))))
  assert float(jnp.std(out.pooled.astype(jnp.float32))) > 0
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_batchnorm_train_and_eval_modes():
  model = SmallCNN(16, channels=(8, 8, 8), norm="batch", rngs=nnx.Rngs(0))
  fwd = nnx.jit(lambda m, x, det: m(x, deterministic=det).tokens, static_argnums=2)
  stats = lambda: np.concatenate([np.asarray(v[...]).ravel()
                                  for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))])
  x = images(b=4) * 3.0 + 1.0
  x2 = jnp.concatenate([x[:2], images(b=2, seed=1)])  # same first two examples, other batch-mates
  before = stats()
  ev = fwd(model, x, True)
  np.testing.assert_array_equal(stats(), before)  # eval leaves running statistics alone
  # Eval normalises each example with running statistics: independent of the rest of the batch.
  np.testing.assert_allclose(fwd(model, x2, True)[:2], ev[:2], rtol=1e-5, atol=1e-5)
  tr = fwd(model, x, False)
  assert not np.allclose(stats(), before)  # train updates running statistics
  # The first BatchNorm saw x's channel means: running mean moved 10% of the way (momentum 0.9).
  conv_out = np.asarray(model.layers[0].conv(x))
  np.testing.assert_allclose(model.layers[0].norm.mean[...], 0.1 * conv_out.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.asarray(tr), np.asarray(ev), atol=1e-3)
  # Train normalises with batch statistics: an example's output depends on its batch.
  assert not np.allclose(np.asarray(fwd(model, x2, False)[:2]), np.asarray(tr[:2]), atol=1e-3)


def test_coordinates_appended_to_grid_cells():
  c = grid_coords(3, 5)
  assert c.shape == (3, 5, 2)
  np.testing.assert_allclose(c[0, 0], [-1, -1])
  np.testing.assert_allclose(c[2, 4], [1, 1])
  np.testing.assert_allclose(c[1, :, 0], np.linspace(-1, 1, 5))  # x runs along columns
  np.testing.assert_allclose(c[:, 3, 1], [-1, 0, 1])  # y runs along rows
  np.testing.assert_array_equal(grid_coords(1, 1), [[[0, 0]]])
  # With coordinates, identical cells still give different tokens (position is visible).
  model = SmallCNN(16, channels=(8, 8, 8), norm="none", coords=True, rngs=nnx.Rngs(0))
  assert model.proj.kernel.shape == (8 + 2, 16)
  out = model(jnp.ones((1, 64, 64, 3)))  # an 8x8 grid; interior cells see identical inputs
  interior = np.asarray(out.tokens[0]).reshape(8, 8, 16)[2:6, 2:6].reshape(16, 16)
  assert np.min(np.abs(interior[:, None] - interior[None]).sum(-1) + np.eye(16)) > 1e-6


def test_fourier_coordinates_make_offsets_visible_to_dot_products():
  h, w, n = 6, 10, 4
  c = grid_coords(h, w, n)
  assert c.shape == (h, w, 2 + 4 * n)
  np.testing.assert_array_equal(c[..., :2], grid_coords(h, w))  # the linear (x, y) come first
  f = c[..., 2:].reshape(h * w, -1)
  gram = f @ f.T  # sum over k, axis of cos((pi / 2) k (a - b)): a function of the offset only
  ys, xs = np.divmod(np.arange(h * w), w)
  dy, dx = ys[:, None] - ys[None], xs[:, None] - xs[None]
  for oy, ox in [(0, 0), (1, 2), (-3, 5), (5, -9)]:
    vals = gram[(dy == oy) & (dx == ox)]
    assert vals.size and np.ptp(vals) < 1e-5, (oy, ox)
  # Largest at offset zero only: no two cells of the grid alias (lowest period = 2 spans).
  off_diag = gram + np.diag(np.full(h * w, -np.inf))
  assert np.all(np.diag(gram) - off_diag.max(1) > 0.05)
  model = SmallCNN(16, channels=(8, 8, 8), norm="none", coords=True, coord_freqs=n,
                   rngs=nnx.Rngs(0))
  assert model.proj.kernel.shape == (8 + 2 + 4 * n, 16)
  assert model(jnp.ones((2, 48, 80, 3))).tokens.shape == (2, h * w, 16)
  with pytest.raises(ValueError, match="coord_freqs"):
    SmallCNN(16, coord_freqs=2, rngs=nnx.Rngs(0))  # needs coords=True
  with pytest.raises(ValueError, match="coord_freqs"):
    SmallCNN(16, coords=True, coord_freqs=-1, rngs=nnx.Rngs(0))


def test_bad_inputs_name_the_field():
  vit = ViT(None, rngs=nnx.Rngs(0), **TINY_VIT)  # no head
  with pytest.raises(ValueError, match="images"):
    vit(jnp.ones((32, 32, 3)))
  with pytest.raises(ValueError, match="images"):
    vit(jnp.ones((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="images.*image_size"):
    vit(jnp.ones((1, 48, 48, 3)))
  with pytest.raises(TypeError, match="images"):
    vit(jnp.ones((1, 32, 32, 3), jnp.uint8))
  cnn = SmallCNN(16, channels=(8, 8, 8), in_channels=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"images.*\(B, H, W, 1\)"):
    cnn(jnp.ones((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="norm"):
    SmallCNN(8, norm="instance", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pool"):
    ViT("mu/16", pool="max", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="depth"):
    ResNet(20, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="unknown ViT field"):
    ViT("mu/16", hidden=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="has no classification head"):
    vit.classify(jnp.ones((1, 32, 32, 3)))


def test_golden_sharding_of_vit_on_8_devices():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ctor = lambda: ViT(None, num_classes=5, rngs=nnx.Rngs(0), **TINY_VIT)
  vit = sharding.init_sharded(ctor, mesh)
  expected = {
      "patch_embed.conv.kernel": P(None, None, None, "fsdp"),
      "patch_embed.conv.bias": P("fsdp"),
      "cls_token": P(None, None, "fsdp"),
      "pos_embed.embedding": P(None, "fsdp"),
      "encoder.layers.0.attn.query.kernel": P("fsdp", "tensor"),
      "encoder.layers.0.attn.query.bias": P("tensor"),
      "encoder.layers.0.attn.out.kernel": P("tensor", "fsdp"),
      "encoder.layers.0.attn.out.bias": P("fsdp"),
      "encoder.layers.0.mlp.fc1.kernel": P("fsdp", "tensor"),
      "encoder.layers.0.mlp.fc2.kernel": P("tensor", "fsdp"),
      "encoder.layers.0.attn_norm.scale": P(None),
      "encoder.final_norm.bias": P(None),
      "head.kernel": P("fsdp", None),
      "head.bias": P(None),
  }
  got = {".".join(map(str, p)): v[...].sharding.spec for p, v in nnx.iter_graph(vit)
         if isinstance(v, nnx.Param)}
  for name, spec in expected.items():
    assert got[name] == spec, name
  assert len(got) == 4 + 16 + 2 + 2
  x = images(b=8)
  xs = jax.device_put(x, jax.NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES, mesh):
    out = nnx.jit(lambda m, x: m(x))(vit, xs)
  assert out.tokens.sharding.spec[0] == ("data", "fsdp")
  ref = ctor()  # same seed, unsharded
  np.testing.assert_allclose(out.pooled, nnx.jit(lambda m, x: m(x))(ref, x).pooled, atol=1e-5)
