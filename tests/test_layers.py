"""Layers against PyTorch's attention, cache equivalence, masks, dtypes and logical-axis rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.layers import (DecoderBlock, Encoder, EncoderBlock, LearnedPositions, MultiHeadAttention,
                          PatchEmbed, make_attention_mask, sincos_2d_positions, sinusoidal_positions)


def _torch_mha(mha, x, ctx, mask):
  """Reference: the same projections with torch SDPA."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  lin = lambda layer, a: a @ t(layer.kernel[...]) + t(layer.bias[...])
  B, Lq, _ = x.shape
  H, Dh = mha.num_heads, mha.head_dim
  q = lin(mha.query, t(x)).reshape(B, Lq, H, Dh).transpose(1, 2)
  k = lin(mha.key, t(ctx)).reshape(B, -1, H, Dh).transpose(1, 2)
  v = lin(mha.value, t(ctx)).reshape(B, -1, H, Dh).transpose(1, 2)
  o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(np.asarray(mask)))
  return lin(mha.out, o.transpose(1, 2).reshape(B, Lq, H * Dh)).numpy()


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_torch_sdpa(cross):
  rng = np.random.default_rng(0)
  mha = MultiHeadAttention(4, 16, kv_features=12 if cross else None, rngs=nnx.Rngs(0))
  x = rng.normal(size=(3, 5, 16)).astype(np.float32)
  ctx = rng.normal(size=(3, 7, 12)).astype(np.float32) if cross else x
  q_mask = np.ones((3, 5), bool)
  kv_mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], bool)[:, : ctx.shape[1]]
  mask = make_attention_mask(jnp.asarray(q_mask), jnp.asarray(kv_mask))
  ours = mha(jnp.asarray(x), jnp.asarray(ctx) if cross else None, mask=mask)
  ref = _torch_mha(mha, x, ctx, np.asarray(mask))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)
  ours_w, w = mha(jnp.asarray(x), jnp.asarray(ctx) if cross else None, mask=mask, return_weights=True)
  np.testing.assert_allclose(np.asarray(ours_w), ref, atol=1e-5)
  assert w.shape == (3, 4, 5, ctx.shape[1])
  np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, atol=1e-6)
  assert float(jnp.abs(w[1, :, :, 4:]).max()) == 0.0  # masked keys get no weight


def test_attention_bias_matches_torch_sdpa():
  rng = np.random.default_rng(1)
  mha = MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))
  x = rng.normal(size=(3, 5, 16)).astype(np.float32)
  bias = rng.normal(size=(1, 4, 5, 5)).astype(np.float32) * 3  # per head, shared by the batch
  mask = np.broadcast_to(np.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 5], bool)[:, None, None], (3, 1, 5, 5))
  ref = _torch_mha(mha, x, x, np.where(mask, bias, -np.inf).astype(np.float32))  # float mask: added
  for weights in (False, True):  # the fused and the explicit path
    out = mha(jnp.asarray(x), mask=jnp.asarray(mask), bias=jnp.asarray(bias), return_weights=weights)
    np.testing.assert_allclose(np.asarray(out[0] if weights else out), ref, atol=1e-5)
  assert not np.allclose(np.asarray(mha(jnp.asarray(x), mask=jnp.asarray(mask))), ref, atol=1e-3)


def test_context_repeats_equals_repeated_context_with_mask_and_bias():
  """A context row shared by r queries (one image, several questions) gives what repeating it
  gives, with a per-example key mask and a per-example, per-head bias, on both paths."""
  rng = np.random.default_rng(2)
  mha = MultiHeadAttention(4, 16, kv_features=12, rngs=nnx.Rngs(0))
  r, rows = 3, 2
  x = jnp.asarray(rng.normal(size=(r * rows, 2, 16)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(rows, 7, 12)), jnp.float32)
  mask = jnp.asarray(rng.random((r * rows, 1, 1, 7)) > 0.3).at[..., 0].set(True)
  bias = jnp.asarray(rng.normal(size=(r * rows, 4, 2, 7)) * 3, jnp.float32)
  full = jnp.repeat(ctx, r, axis=0)
  for weights in (False, True):
    ref = mha(x, full, mask=mask, bias=bias, return_weights=weights)
    got = mha(x, ctx, mask=mask, bias=bias, return_weights=weights, context_repeats=r)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  no_bias = mha(x, ctx, mask=mask, context_repeats=r)
  assert not np.allclose(np.asarray(no_bias), np.asarray(mha(x, full, mask=mask, bias=bias)), atol=1e-3)


@pytest.mark.parametrize("lq,lk", [(197, 197), (20, 36), (64, 64)])
def test_padded_attention_equals_unpadded(lq, lk):
  """The cuDNN path pads query / key lengths to a multiple of 64 (cuDNN rejected ViT's 197):
  padded keys are left out and padded query rows dropped, so values and gradients equal the
  unpadded attention (checked with XLA's implementation, which takes the same arguments)."""
  from mmjax.layers.attention import padded_attention  # noqa: PLC0415
  q, k, v = (jax.random.normal(jax.random.key(i), (2, n, 4, 16)) for i, n in enumerate((lq, lk, lk)))
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.3, implementation="xla")  # noqa: E731
  pad = lambda q, k, v: padded_attention(q, k, v, bias=None, mask=None, scale=0.3, implementation="xla")  # noqa: E731
  np.testing.assert_allclose(pad(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda *a: (f(*a) * jnp.arange(16.0)).sum()  # noqa: E731
  for g_pad, g_ref in zip(jax.grad(loss(pad), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_pad, g_ref, rtol=1e-4, atol=1e-5)
  mask = jnp.ones((2, 1, lq, lk), bool).at[:, :, :, -1].set(False)  # with a mask: unpadded call
  got = padded_attention(q, k, v, bias=None, mask=mask, scale=0.3, implementation="xla")
  np.testing.assert_array_equal(got, jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3,
                                                                  implementation="xla"))


def test_cudnn_is_chosen_by_the_default_device():
  """A lowering inside `jax.default_device(cpu)` (gpu_mfu's FLOP count on a GPU host) must not
  pick cuDNN: the platform is the default device's when one is set."""
  from mmjax.layers import attention  # noqa: PLC0415
  assert attention._default_platform() == jax.default_backend()
  with jax.default_device(jax.devices("cpu")[0]):
    assert attention._default_platform() == "cpu"
  with jax.default_device("cpu"):
    assert attention._default_platform() == "cpu"


def test_causal_mask_blocks_future():
  blk = EncoderBlock(16, 4, 32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  causal = make_attention_mask(None, None, causal=True, q_len=6, kv_len=6)
  y1 = blk(x, causal)
  y2 = blk(x.at[:, 4:].set(100.0), causal)
  np.testing.assert_allclose(y1[:, :4], y2[:, :4], atol=1e-6)
  assert not np.allclose(y1[:, 4:], y2[:, 4:])


def test_padding_invariance_encoder():
  enc = Encoder(2, 16, 4, 32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 6, 16))
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [1] * 6], bool)
  y1 = enc(x, mask)
  y2 = enc(x.at[0, 3:].set(-50.0), mask)
  np.testing.assert_allclose(y1[0, :3], y2[0, :3], atol=1e-5)
  np.testing.assert_allclose(y1[1], y2[1], atol=1e-6)


def test_post_ln_differs_from_pre_ln_with_same_params():
  pre = EncoderBlock(8, 2, 16, norm="pre", rngs=nnx.Rngs(0))
  post = EncoderBlock(8, 2, 16, norm="post", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))
  assert not np.allclose(pre(x), post(x))
  # post-LN output is layer-normalised per token (LN scale 1, bias 0 at init).
  y = post(x)
  np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="norm"):
    EncoderBlock(8, 2, 16, norm="middle", rngs=nnx.Rngs(0))


def test_decoder_kv_cache_equals_teacher_forcing():
  dec = DecoderBlock(16, 4, 32, context_features=12, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  ctx = jax.random.normal(jax.random.key(1), (2, 4, 12))
  cmask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  full = dec(x, ctx, cmask)
  dec.init_cache(2, 6)

  @nnx.jit
  def step(m, xt):
    return m(xt, ctx, cmask, decode=True)

  outs = [step(dec, x[:, i : i + 1]) for i in range(6)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  assert int(dec.self_attn.cache_index[...]) == 6


def test_decode_without_cache_is_a_clear_error():
  mha = MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    mha(jnp.ones((1, 1, 8)), decode=True)


def test_positions():
  table = sinusoidal_positions(50, 16)
  assert table.shape == (50, 16)
  np.testing.assert_allclose(table[0, :8], 0.0)
  np.testing.assert_allclose(table[0, 8:], 1.0)
  np.testing.assert_allclose(table[7, 0], np.sin(7.0), rtol=1e-6)
  t2 = sincos_2d_positions(3, 4, 8)
  assert t2.shape == (12, 8) and len({tuple(r) for r in t2.round(6)}) == 12
  pos = LearnedPositions(4, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len"):
    pos(jnp.zeros((1, 5, 8)))


def test_patch_embed_errors_and_shapes():
  pe = PatchEmbed(4, 3, 8, rngs=nnx.Rngs(0))
  tokens, grid = pe(jnp.zeros((2, 16, 12, 3)))
  assert tokens.shape == (2, 12, 8) and grid == (4, 3)
  with pytest.raises(ValueError, match="images"):
    pe(jnp.zeros((16, 16, 3)))
  # Off the patch grid the last rows / columns are dropped (HF's strided convolution does too).
  x = jax.random.normal(jax.random.key(0), (1, 15, 18, 3))
  tokens, grid = pe(x)
  assert grid == (3, 4)
  np.testing.assert_array_equal(tokens, pe(x[:, :12, :16])[0])
  with pytest.raises(ValueError, match="smaller than one patch"):
    pe(jnp.zeros((1, 3, 16, 3)))


def test_bfloat16_compute_keeps_f32_params():
  enc = Encoder(1, 16, 4, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = enc(jnp.ones((2, 3, 16), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())
  assert enc.layers[0].attn.query.kernel[...].dtype == jnp.float32


def test_logical_rules_semantics():
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # 'fsdp' already taken by batch -> embed falls through to replicated.
  assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("norm",), rules) == P(None)
  mesh = sharding.make_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 4, "tensor": 2}
  # Rules naming an axis the mesh lacks are skipped: batch falls back to ("data",).
  assert sharding.logical_to_spec(("batch", "embed"), rules, mesh) == P("data", None)
  # A size-1 axis gives way to the next rule; so does one that does not divide the dimension.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  assert sharding.logical_to_spec(("mlp", "vocab"), rules, mesh, (1024, 3129)) == P("fsdp", None)
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (6, 64)) == P(None, "fsdp")
  assert sharding.logical_to_spec(("batch", "embed"), rules, mesh, (8, 64)) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("batch", "embed"), rules, mesh, (2, 64)) == P("data", "fsdp")
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh({"data": 16})
  with pytest.raises(ValueError, match="divisible"):
    sharding.make_mesh({"data": -1, "tensor": 3})


def test_golden_sharding_of_an_encoder_on_8_devices():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  enc = sharding.init_sharded(lambda: Encoder(2, 16, 4, 32, rngs=nnx.Rngs(0)), mesh)
  expected = {
      "layers.0.attn.query.kernel": P("fsdp", "tensor"),
      "layers.0.attn.query.bias": P("tensor"),
      "layers.1.attn.out.kernel": P("tensor", "fsdp"),
      "layers.1.attn.out.bias": P("fsdp"),
      "layers.0.mlp.fc1.kernel": P("fsdp", "tensor"),
      "layers.0.mlp.fc2.kernel": P("tensor", "fsdp"),
      "layers.0.attn_norm.scale": P(None),
      "final_norm.bias": P(None),
  }
  got = {".".join(map(str, p)): v[...].sharding.spec for p, v in nnx.iter_graph(enc)
         if isinstance(v, nnx.Param)}
  for name, spec in expected.items():
    assert got[name] == spec, name
  assert len(got) == 2 * 16 + 2
  # Values equal an unsharded init with the same seed.
  ref = Encoder(2, 16, 4, 32, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(enc.layers[1].mlp.fc1.kernel[...], ref.layers[1].mlp.fc1.kernel[...])
  x = jax.device_put(jnp.ones((8, 5, 16)), jax.NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES, mesh):
    y = nnx.jit(lambda m, x: m(x))(enc, x)
  assert y.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(y, ref(jnp.ones((8, 5, 16))), atol=1e-5)
