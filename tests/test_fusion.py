"""Fusion zoo: the absent-modality, mask and gradient contracts for every family, plus oracles.

One jitted function per (family, number of modalities) returns the pooled vector, the fused
tokens and the gradients of a random projection of both w.r.t. every modality's tokens; the
contract tests all reuse it, so each configuration compiles once. Parameters are seeded numpy
draws (no init compiles) and XLA compiles with optimisation off (these graphs are compile-bound).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax import sharding
from mmjax.encoders.base import EncoderOutput
from mmjax.fusion import FUSIONS, build_fusion, full_presence, masked_mean, modality_dropout

DIMS = {"image": 6, "text": 4, "audio": 2}
LENS = {"image": 4, "text": 4, "audio": 3}  # 4 image tokens: a 2x2 grid for `spatial`
B, F = 4, 8
# Variants "family:tag" with their extra arguments: cross-attention that rewrites the text stream
# only (the question reads the image, whose tokens stay as projected), FiLM with max pooling.
# The Sort-of-CLEVR project's cross-attention with a distance-biased second hop (built from
# cross_attention's extension points), named as configs name it.
DISTANCE = "mmjax.projects.sort_of_clevr.fusion:distance_cross_attention"
FLAT = "mmjax.projects.sort_of_clevr.model:flat_concat"
# (attention maps on: the reference kernel, with shared context rows when only the text is updated)
VARIANTS = {"cross_attention:text": dict(update=("text",), attention_maps=True),
            "cross_attention:pre": dict(norm="pre"),
            # the distance and revisit biases on from the start (as in the VQA config)
            f"{DISTANCE}:spatial": dict(spatial="image", depth=2, num_heads=2, revisit=True,
                                        distance_init=0.1, revisit_init=-4.0),
            "film:max": dict(pool="max"),
            # the CNN+MLP baseline of the Relation Networks paper: the image's grid flattened
            f"{FLAT}:flatten": dict(flatten={"image": LENS["image"]})}
FAMILIES = FUSIONS.names() + list(VARIANTS)
EXTRA = {
    "bottleneck": dict(depth=1, num_heads=2, num_bottleneck=2),
    "cross_attention": dict(depth=1, num_heads=2),
    "film": dict(num_blocks=2),
    "lmf": dict(rank=3),
    "relation": dict(g_layers=2),
    "single_stream": dict(depth=1, num_heads=2, max_len=8),
    "tfn": dict(tensor_dim=3),
}
# Compile fast, run slow: these tiny graphs are compile-bound (5x faster to compile on CPU); CI's
# numerics job (MMJAX_TEST_XLA=default) keeps XLA's defaults.
FAST_COMPILE = ({} if os.environ.get("MMJAX_TEST_XLA") == "default" else
                {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False})
FILLS = {"random": None, "zeros": 0.0, "huge": 1e30, "nan": np.nan}


def mods(M):
  return dict(list(DIMS.items())[:M])


def build(family, M, **kw):
  """The block with seeded numpy parameters: `nnx.eval_shape` + numpy, so no init compiles."""
  kw = {**VARIANTS.get(family, {}), **kw}
  family = family.rpartition(":")[0] if family in VARIANTS else family  # "family:tag"
  abstract = nnx.eval_shape(lambda: build_fusion(family, modalities=mods(M), features=F, rngs=nnx.Rngs(0),
                                                 **{**EXTRA.get(family, {}), **kw}))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(0)

  def fill(path, v):
    x = rng.normal(size=v.shape)
    if v.ndim >= 2:
      x = x / np.sqrt(v.shape[-2])
    elif getattr(path[-1], "key", None) == "scale":
      x = 1 + 0.1 * x
    else:
      x = 0.1 * x
    return jnp.asarray(x, v.dtype)

  params = jax.tree_util.tree_map_with_path(fill, params)
  key = jax.random.key(0)
  rest = jax.tree.map(lambda v: key if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
                      else jnp.zeros(v.shape, v.dtype), rest)
  return nnx.merge(graphdef, params, rest)


def make_tokens(M, seed=0):
  rng = np.random.default_rng(seed)
  return {m: rng.normal(size=(B, LENS[m], d)).astype(np.float32) for m, d in mods(M).items()}


def make_masks(M):
  """Some padding: example 1 lacks the last image token, example 3 the last two text tokens."""
  masks = {m: np.ones((B, LENS[m]), bool) for m in mods(M)}
  masks["image"][1, -1:] = False
  masks["text"][3, -2:] = False
  return masks


def all_present(M):
  return {m: np.ones(B, bool) for m in mods(M)}


def fill_like(x, fill, seed):
  if fill is None:
    return np.random.default_rng(seed).normal(size=x.shape).astype(x.dtype)
  return np.full_like(x, fill)


def jit(fn, **kw):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


def forward(block):
  """A compiled `block(inputs, presence)` returning the whole FusionOutput."""
  graphdef, state = nnx.split(block)
  fn = jit(lambda state, inputs, presence: nnx.merge(graphdef, state)(inputs, presence))
  return lambda inputs, presence=None: jax.device_get(fn(state, inputs, presence))


class Harness:
  """One compiled forward + backward of a fusion block: (pooled, tokens, grads, aux)."""

  def __init__(self, family, M):
    self.names = list(mods(M))
    self.block = build(family, M)
    graphdef, self.state = nnx.split(self.block)
    rng = np.random.default_rng(7)
    w_pooled = jnp.asarray(rng.normal(size=(F,)), jnp.float32)
    w_tokens = {m: jnp.asarray(rng.normal(size=(LENS[m], F)), jnp.float32) for m in self.names}

    def run(state, tokens, masks, presence):
      model = nnx.merge(graphdef, state)

      def loss(tokens):
        out = model({m: (tokens[m], masks[m]) for m in tokens}, presence)
        value = jnp.sum(out.pooled * w_pooled)
        for m, t in (out.tokens or {}).items():
          value = value + jnp.sum(t * w_tokens[m])
        return value, out

      (_, out), grads = jax.value_and_grad(loss, has_aux=True)(tokens)
      return out.pooled, out.tokens, grads, out.aux

    self.fn = jit(run)

  def __call__(self, tokens, masks=None, presence=None):
    M = len(self.names)
    masks = make_masks(M) if masks is None else masks
    presence = all_present(M) if presence is None else presence
    return jax.device_get(self.fn(self.state, tokens, masks, presence))


@functools.cache
def harness(family, M):
  return Harness(family, M)


def assert_same(a, b):
  """Same pooled vectors and fused tokens, bit for bit."""
  np.testing.assert_array_equal(a[0], b[0])
  assert (a[1] is None) == (b[1] is None)
  for m in a[1] or {}:
    np.testing.assert_array_equal(a[1][m], b[1][m])


configs = pytest.mark.parametrize("family,M", [(f, M) for f in FAMILIES for M in (2, 3)])


@configs
def test_absent_modality_does_not_change_output(family, M):
  h = harness(family, M)
  tokens = make_tokens(M)
  absent = [0, 2]
  for m in h.names:
    presence = all_present(M)
    presence[m][absent] = False
    ref = h(tokens, presence=presence)
    assert np.isfinite(ref[0]).all()
    for i, (kind, fill) in enumerate(FILLS.items()):
      changed = {k: v.copy() for k, v in tokens.items()}
      changed[m][absent] = fill_like(changed[m][absent], fill, seed=i + 10)
      out = h(changed, presence=presence)
      assert_same(out, ref)
      for k, g in out[2].items():
        assert np.isfinite(g).all(), (m, kind, k)
      np.testing.assert_array_equal(out[2][m][absent], 0.0)


@configs
def test_examples_are_independent(family, M):
  h = harness(family, M)
  tokens = make_tokens(M)
  ref = h(tokens)
  changed = {m: v.copy() for m, v in tokens.items()}
  for m in changed:
    changed[m][0] = fill_like(changed[m][0], None, seed=3)
  out = h(changed)
  np.testing.assert_allclose(out[0][1:], ref[0][1:], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[0][0], ref[0][0])


@configs
def test_present_modality_changes_output(family, M):
  h = harness(family, M)
  tokens = make_tokens(M)
  ref = h(tokens)
  for m in h.names:
    changed = dict(tokens, **{m: fill_like(tokens[m], None, seed=5)})
    out = h(changed)
    diff = np.abs(out[0] - ref[0]).max(axis=-1)
    assert (diff > 1e-5).all(), (m, diff)


@configs
def test_padded_tokens_do_not_change_output(family, M):
  h = harness(family, M)
  tokens = make_tokens(M)
  masks = make_masks(M)
  ref = h(tokens, masks)
  for fill in FILLS.values():
    changed = {m: np.where(masks[m][..., None], v, fill_like(v, fill, seed=11)) for m, v in tokens.items()}
    out = h(changed, masks)
    assert_same(out, ref)
    for m, g in out[2].items():
      assert np.isfinite(g).all()
      np.testing.assert_array_equal(g[~masks[m]], 0.0)


@configs
def test_gradients_reach_every_present_modality(family, M):
  h = harness(family, M)
  presence = all_present(M)
  for b, m in enumerate(h.names):
    presence[m][b] = False  # each example misses at most one modality
  grads = h(make_tokens(M), presence=presence)[2]
  masks = make_masks(M)
  for m, g in grads.items():
    assert np.isfinite(g).all()
    for b in range(B):
      norm = np.abs(g[b][masks[m][b]]).sum()
      if presence[m][b]:
        assert norm > 0, (m, b)
      else:
        assert norm == 0, (m, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_and_omission_match_masking(family):
  """Two extra padded (NaN) tokens change nothing, and leaving a modality out of the inputs
  equals marking it absent. (A spatial grid and a flattened modality take no extra tokens: only
  the omission part.)"""
  M = 3
  h = harness(family, M)
  graphdef, state = nnx.split(h.block)
  tokens, masks = make_tokens(M), make_masks(M)
  ref = h(tokens, masks, dict(all_present(M), audio=np.zeros(B, bool)))
  pad = 0 if family.endswith((":spatial", ":flatten")) else 2  # both need a fixed token count
  inputs = {m: (np.concatenate([tokens[m], np.full_like(tokens[m][:, :pad], np.nan)], 1),
                np.concatenate([masks[m], np.zeros((B, pad), bool)], 1)) for m in ("image", "text")}
  out = jax.device_get(jit(lambda state, inputs: nnx.merge(graphdef, state)(inputs))(state, inputs))
  np.testing.assert_allclose(out.pooled, ref[0], rtol=1e-5, atol=1e-5)
  for m in set(ref[1] or {}) - {"audio"}:
    np.testing.assert_allclose(out.tokens[m][:, :LENS[m]], ref[1][m], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.tokens[m][:, LENS[m]:], 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_sharded_matches_f32(family):
  """bf16 compute under a (data, fsdp, tensor) mesh with sharded parameters stays near f32."""
  M = 2
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(build(family, M, dtype=jnp.bfloat16))
  for v in jax.tree.leaves(nnx.state(state, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
    assert len(v.get_metadata()["logical_axes"]) == v.ndim
  state = jax.device_put(state, sharding.param_shardings(state, mesh, sharding.DEFAULT_RULES))
  tokens, masks = make_tokens(M), make_masks(M)
  presence = all_present(M)
  presence["image"][1] = False

  def fwd(state, tokens, masks, presence):
    out = nnx.merge(graphdef, state)({m: (tokens[m], masks[m]) for m in tokens}, presence)
    return out.pooled

  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES, mesh):
    pooled = jit(fwd)(state, tokens, masks, presence)
  assert pooled.shape == (B, F) and pooled.dtype == jnp.bfloat16
  ref = harness(family, M)(tokens, masks, presence)[0]
  pooled = np.asarray(pooled, np.float32)
  assert np.isfinite(pooled).all()
  assert np.linalg.norm(pooled - ref) <= 0.05 * np.linalg.norm(ref)


# ---------------------------------------------------------------- oracles per family


def np_masked_mean(x, mask, present):
  m = (mask & present[:, None])[..., None]
  return (x * m).sum(1) / np.maximum(m.sum(1), 1)


def test_masked_mean_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  x_nan = np.where(mask[..., None], x, np.nan)
  np.testing.assert_allclose(jit(masked_mean)(x_nan, mask),
                             np_masked_mean(x, mask, np.ones(3, bool)), rtol=1e-6)


@pytest.mark.parametrize("family", ["mean", "sum"])
def test_pooled_reductions_match_numpy(family):
  M = 3
  h = harness(family, M)
  tokens, masks = make_tokens(M), make_masks(M)
  presence = all_present(M)
  presence["image"][0] = presence["audio"][0] = presence["text"][1] = False
  pooled = h(tokens, masks, presence)[0]
  proj = {m: np_masked_mean(tokens[m], masks[m], presence[m]) @ np.asarray(h.block.proj[m].kernel[...])
          + np.asarray(h.block.proj[m].bias[...]) for m in h.names}
  total = sum(np.where(presence[m][:, None], proj[m], 0) for m in h.names)
  if family == "mean":
    total = total / sum(presence[m].astype(np.float32) for m in h.names)[:, None]
  np.testing.assert_allclose(pooled, total, rtol=1e-5, atol=1e-6)


def test_lmf_equals_full_tensor_fusion():
  """LMF's factored form equals contracting the full rank-r weight tensor with z_1 x z_2 x z_3."""
  M = 3
  h = harness("lmf", M)
  tokens, masks = make_tokens(M), make_masks(M)
  presence = all_present(M)
  presence["audio"][2] = False
  pooled = h(tokens, masks, presence)[0]
  blk = h.block
  z = []
  for m in h.names:
    hm = np.where(presence[m][:, None], np_masked_mean(tokens[m], masks[m], presence[m]),
                  np.asarray(blk.missing[m][...]))
    z.append(np.concatenate([hm, np.ones((B, 1))], -1))
  f1, f2, f3 = (np.asarray(blk.factors[m][...], np.float64) for m in h.names)
  w = np.asarray(blk.weights[...], np.float64)[0]
  full = np.einsum("r,raf,rbf,rcf->abcf", w, f1, f2, f3)
  expected = np.einsum("za,zb,zc,abcf->zf", *z, full) + np.asarray(blk.bias[...])
  np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)


def test_relation_equals_naive_pairs():
  """The broadcast first layer equals g_theta on explicitly concatenated (o_i, o_j, q) pairs."""
  M = 3
  h = harness("relation", M)
  tokens, masks = make_tokens(M), make_masks(M)
  presence = all_present(M)
  presence["audio"][1] = False
  presence["text"][2] = False
  pooled = h(tokens, masks, presence)[0]
  blk = h.block
  P = lambda v: np.asarray(v[...], np.float64)
  objs_dims = [DIMS[m] for m in blk.objects]
  width = sum(objs_dims)
  objs, valid = [], []
  for k, m in enumerate(blk.objects):  # each object placed in its modality's slot of a shared space
    o = np.concatenate([np.broadcast_to(P(blk.missing[m]), (B, 1, DIMS[m])), tokens[m]], 1)
    slot = np.zeros(o.shape[:2] + (width,))
    start = sum(objs_dims[:k])
    slot[..., start:start + DIMS[m]] = o
    objs.append(slot)
    valid.append(np.concatenate([~presence[m][:, None], masks[m] & presence[m][:, None]], 1))
  objs, valid = np.concatenate(objs, 1), np.concatenate(valid, 1)
  q = np.where(presence["text"][:, None], np_masked_mean(tokens["text"], masks["text"], presence["text"]),
               P(blk.missing_query))
  w1 = np.concatenate([np.concatenate([P(blk.g_a[m].kernel) for m in blk.objects]),
                       np.concatenate([P(blk.g_b[m].kernel) for m in blk.objects]), P(blk.g_q.kernel)])
  expected = []
  for b in range(B):
    s = 0
    for i in np.flatnonzero(valid[b]):
      for j in np.flatnonzero(valid[b]):
        g = np.maximum(np.concatenate([objs[b, i], objs[b, j], q[b]]) @ w1 + P(blk.g_q.bias), 0)
        for layer in blk.g_rest:
          g = np.maximum(g @ P(layer.kernel) + P(layer.bias), 0)
        s = s + g
    f = np.maximum(s @ P(blk.f.fc1.kernel) + P(blk.f.fc1.bias), 0)
    expected.append(f @ P(blk.f.fc2.kernel) + P(blk.f.fc2.bias))
  np.testing.assert_allclose(pooled, np.stack(expected), rtol=1e-4, atol=1e-5)


def test_gated_gates_are_a_softmax_over_present_modalities():
  M = 3
  h = harness("gated", M)
  presence = all_present(M)
  presence["image"][0] = presence["text"][1] = presence["audio"][1] = False
  z = h(make_tokens(M), presence=presence)[3]["gates"]  # (B, M, F)
  present = np.stack([presence[m] for m in h.names], 1)
  np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(z[~present], 0.0)
  np.testing.assert_array_equal(z[1, 0], 1.0)  # only the image is left in example 1


def test_film_is_identity_modulation_without_condition():
  M = 3
  presence = all_present(M)
  presence["text"][[0, 3]] = False
  _, tokens, _, aux = harness("film", M)(make_tokens(M), presence=presence)
  assert set(tokens) == {"image", "audio"}
  for m in ("image", "audio"):
    gamma, beta = aux["gamma"][m], aux["beta"][m]
    assert gamma.shape == (B, 2, F)
    np.testing.assert_array_equal(gamma[[0, 3]], 1.0)
    np.testing.assert_array_equal(beta[[0, 3]], 0.0)
    assert not np.allclose(gamma[1], 1.0)


@pytest.mark.parametrize("M", [2, 3])
def test_cross_attention_maps(M):
  """Off by default (the fused kernel); with attention_maps=True, per stream and modality."""
  h = harness("cross_attention", M)
  masks = make_masks(M)
  presence = all_present(M)
  presence["image"][2] = False
  assert "cross_attention" not in h(make_tokens(M), masks, presence)[3]
  tokens = make_tokens(M)
  out = forward(build("cross_attention", M, attention_maps=True))(
      {m: (tokens[m], masks[m]) for m in tokens}, presence)
  maps = out.aux["cross_attention"]
  for m in h.names:
    assert set(maps[m]) == set(h.names) - {m}
    for o, w in maps[m].items():
      assert w.shape == (1, B, 2, LENS[m], LENS[o])  # (depth, B, H, N_m, N_o)
      invalid = ~(masks[o] & presence[o][:, None])[None, :, None, None, :]
      np.testing.assert_array_equal(w[np.broadcast_to(invalid, w.shape)], 0.0)
    rows = sum(w.sum(-1) for w in maps[m].values())  # (depth, B, H, N_m): mass on real tokens
    others = np.stack([presence[o] for o in maps[m]], 1)
    np.testing.assert_allclose(rows[:, others.all(1)], 1.0, rtol=1e-5)
    np.testing.assert_allclose(rows[:, ~others.any(1)], 0.0, atol=1e-7)
    assert (rows < 1 + 1e-5).all()


@pytest.mark.parametrize("audio_rows", [2, 1])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_rows_equal_repeated_rows(family, audio_rows):
  """A modality given once per r examples (one image, several questions) fuses as if repeated.

  Image rows serve 2 examples each, audio's rows 2 or all 4; presence differs within a group.
  Cross-attention keeps the shared rows (keys and values once per row when the whole context
  shares them alike), the others repeat them.
  """
  block = build(family, 3)
  tokens, masks = make_tokens(3), make_masks(3)
  rows = {"image": 2, "audio": audio_rows}
  shared = {m: (tokens[m][:n], masks[m][:n]) for m, n in rows.items()}
  shared["text"] = (tokens["text"], masks["text"])
  repeated = {m: tuple(np.repeat(a, B // rows.get(m, B), axis=0) for a in v) for m, v in shared.items()}
  presence = all_present(3)
  presence["image"][1] = False  # example 0 has its image, example 1 (same image) does not
  presence["text"][2] = False
  run = forward(block)
  a, b = run(shared, presence), run(repeated, presence)
  np.testing.assert_allclose(a.pooled, b.pooled, rtol=1e-5, atol=1e-6)
  for m in b.tokens or {}:
    assert a.tokens[m].shape == (B, LENS[m], F)
    np.testing.assert_allclose(a.tokens[m], b.tokens[m], rtol=1e-5, atol=1e-6)
  for m in a.aux["masks"]:
    np.testing.assert_array_equal(a.aux["masks"][m], b.aux["masks"][m])
  if "cross_attention" in a.aux:  # the maps come back per example too
    for m, per in a.aux["cross_attention"].items():
      for o, w in per.items():
        np.testing.assert_allclose(w, b.aux["cross_attention"][m][o], rtol=1e-5, atol=1e-6)


def test_presence_none_and_encoder_outputs():
  h = harness("concat", 2)
  tokens, masks = make_tokens(2), make_masks(2)
  enc = {m: EncoderOutput(tokens[m], masks[m], tokens[m].mean(1)) for m in tokens}
  out = forward(h.block)(enc)
  np.testing.assert_allclose(out.pooled, h(tokens, masks)[0], rtol=1e-6, atol=1e-6)
  assert {m: p.shape for m, p in full_presence(enc).items()} == {"image": (B,), "text": (B,)}


# ---------------------------------------------------------------- modality dropout


def test_modality_dropout_rate_and_at_least_one():
  n, rate = 20_000, 0.3
  ones = {m: np.ones(n, bool) for m in ("image", "text")}
  keep = jit(modality_dropout, static_argnums=1)(ones, rate, jax.random.key(0))
  kept = np.stack([np.asarray(keep[m]) for m in ones], 1)
  assert kept.any(1).all()
  expected = rate - rate ** 2 / 2  # a fully dropped example gets one modality back
  np.testing.assert_allclose(1 - kept.mean(0), expected, atol=0.015)

  rng = np.random.default_rng(0)
  presence = {m: rng.random(n) < 0.6 for m in ("image", "text", "audio")}
  before = np.stack(list(presence.values()), 1)
  drop = jit(lambda p: [modality_dropout(p, r, nnx.Rngs(dropout=1)) for r in (0.0, 0.5, 1.0)])
  for r, out in zip((0.0, 0.5, 1.0), jax.device_get(drop(presence))):
    after = np.stack([out[m] for m in presence], 1)
    assert not (after & ~before).any()
    np.testing.assert_array_equal(after.any(1), before.any(1))
    if r == 0.0:
      np.testing.assert_array_equal(after, before)
    if r == 1.0:
      np.testing.assert_array_equal(after.sum(1), np.minimum(before.sum(1), 1))


def test_modality_dropout_rejects_bad_rate():
  with pytest.raises(ValueError, match="rate"):
    modality_dropout({"image": jnp.ones(2, bool)}, 1.5, jax.random.key(0))


# ---------------------------------------------------------------- errors


def test_unknown_family_lists_known_ones():
  with pytest.raises(KeyError, match="concat.*cross_attention.*relation"):
    build_fusion("nope", modalities=mods(2), features=F, rngs=nnx.Rngs(0))


def test_bad_construction_is_rejected():
  with pytest.raises(ValueError, match="at least 2"):
    build_fusion("mean", modalities={"image": 4}, features=F, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="condition='speech'"):
    build_fusion("film", modalities=mods(2), features=F, rngs=nnx.Rngs(0), condition="speech")
  with pytest.raises(ValueError, match="query='speech'"):
    build_fusion("relation", modalities=mods(2), features=F, rngs=nnx.Rngs(0), query="speech")
  with pytest.raises(ValueError, match="norm must be 'pre' or 'post'"):
    build_fusion("cross_attention", modalities=mods(2), features=F, rngs=nnx.Rngs(0), norm="mid")
  with pytest.raises(ValueError, match="spatial='speech' is not one of"):
    build_fusion(DISTANCE, modalities=mods(2), features=F, rngs=nnx.Rngs(0), spatial="speech")
  with pytest.raises(ValueError, match="spatial='image': expected another modality in update"):
    build_fusion(DISTANCE, modalities=mods(2), features=F, rngs=nnx.Rngs(0), spatial="image",
                 update=("image",))
  with pytest.raises(ValueError, match="spatial='image': the distance bias .* expected depth >= 2, got 1"):
    build_fusion(DISTANCE, modalities=mods(2), features=F, rngs=nnx.Rngs(0), spatial="image",
                 depth=1)
  tokens = make_tokens(2)
  block = build(DISTANCE, 2, spatial="image", depth=2)
  with pytest.raises(ValueError, match="spatial='image': expected its tokens to form a square grid, got 3"):
    block({"image": (tokens["image"][:, :3], None), "text": (tokens["text"], None)})


def test_spatial_bias_pairs_each_head_with_its_own_previous_centroid():
  """The bias formula against numpy: head h's centroid is where head h looked in the previous
  layer (normalised over the grid), zero bias outside the grid's slots."""
  block = build(DISTANCE, 2, spatial="image", depth=2, num_heads=2, update=("text",))
  layer = block.layers[1]
  rng = np.random.default_rng(3)
  query = rng.normal(size=(B, 3, F)).astype(np.float32)
  previous = rng.random((B, 2, 3, 7)).astype(np.float32)  # 2 slots before the 2x2 grid, 1 after
  previous[:, 0, :, 2:6] = [1.0, 0, 0, 0]  # head 0 looked at cell (0, 0) only
  previous[:, 1, :, 2:6] = [0, 0, 0, 3.0]  # head 1 at cell (1, 1)
  coords = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
  bias = np.asarray(layer._distance_bias("text", jnp.asarray(query), jnp.asarray(previous),
                                         jnp.asarray(coords), 2, 7))
  lin = layer.distance_scale["text"]
  scale = query @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])  # (B, 3, H)
  dist2 = np.array([[0, 1, 1, 2], [2, 1, 1, 0]], np.float32)  # (H, N) from (0, 0) and (1, 1)
  expected = np.zeros((B, 2, 3, 7), np.float32)
  expected[..., 2:6] = scale.transpose(0, 2, 1)[..., None] * dist2[None, :, None]
  np.testing.assert_allclose(bias, expected, rtol=1e-5, atol=1e-6)


def test_revisit_bias_weighs_each_heads_previous_attention_relative_to_its_peak():
  """revisit=True adds u_h(query) * w_hj / max_j w_hj (w: head h's previous weights over the
  grid) to the distance bias; zero outside the grid's slots. Then, with a near distance scale and
  a large negative u, a second hop from the centre of a 3x3 grid lands on the four cells next to
  it and not on the centre it came from (the "closest other object" pattern)."""
  block = build(DISTANCE, 2, spatial="image", depth=2, num_heads=2, update=("text",),
                revisit=True)
  layer = block.layers[1]
  rng = np.random.default_rng(4)
  for lin in (layer.distance_scale["text"], layer.revisit_scale["text"]):
    lin.kernel[...] = jnp.asarray(rng.normal(size=lin.kernel[...].shape), jnp.float32)
    lin.bias[...] = jnp.asarray(rng.normal(size=lin.bias[...].shape), jnp.float32)
  query = rng.normal(size=(B, 3, F)).astype(np.float32)
  previous = rng.random((B, 2, 3, 7)).astype(np.float32)  # 2 slots before the 2x2 grid, 1 after
  previous[:, 0, :, 2:6] = [0.5, 0.25, 0, 0]
  previous[:, 1, :, 2:6] = [0, 0, 0.1, 0.3]
  coords = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
  bias = np.asarray(layer._distance_bias("text", jnp.asarray(query), jnp.asarray(previous),
                                         jnp.asarray(coords), 2, 7))
  d, u = layer.distance_scale["text"], layer.revisit_scale["text"]
  s = (query @ np.asarray(d.kernel[...]) + np.asarray(d.bias[...])).transpose(0, 2, 1)[..., None]
  r = (query @ np.asarray(u.kernel[...]) + np.asarray(u.bias[...])).transpose(0, 2, 1)[..., None]
  cx = np.array([[0, 1 / 3], [1, 0.75]], np.float32)  # (H, 2) (row, col) centroids of the heads
  dist2 = np.sum((coords[None] - cx[:, None]) ** 2, -1)  # (H, N)
  peak = np.array([[1, 0.5, 0, 0], [0, 0, 1 / 3, 1]], np.float32)
  expected = np.zeros((B, 2, 3, 7), np.float32)
  expected[..., 2:6] = s * dist2[None, :, None] + r * peak[None, :, None]
  np.testing.assert_allclose(bias, expected, rtol=1e-4, atol=1e-5)

  # Near but not the same: hop 1 on the centre cell of a 3x3 grid.
  coords9 = np.stack(np.divmod(np.arange(9), 3), -1).astype(np.float32)
  prev9 = np.zeros((B, 2, 3, 9), np.float32)
  prev9[..., 4] = 1.0
  for lin, value in ((d, -40.0), (u, -1000.0)):
    lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
    lin.bias[...] = jnp.full_like(lin.bias[...], value)
  logits = np.asarray(layer._distance_bias("text", jnp.asarray(query), jnp.asarray(prev9),
                                           jnp.asarray(coords9), 0, 9))
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.zeros(9)
  expected[[1, 3, 5, 7]] = 0.25
  np.testing.assert_allclose(weights, np.broadcast_to(expected, weights.shape), atol=1e-6)
  with pytest.raises(ValueError, match="revisit=True: expected spatial="):
    build(DISTANCE, 2, revisit=True)


@pytest.mark.parametrize("sign,cells", [(-1, [4]), (1, [0, 2, 6, 8])])
def test_spatial_second_hop_prefers_near_or_far_from_the_first_hops_centroid(sign, cells):
  """Layer 1 looks everywhere (zero queries: uniform attention over a 3x3 grid, centroid at the
  centre cell); layer 2 has no content logits and a distance scale of -/+40 per head, so it
  attends to the centre (near) or to the four corners (far). Text comes first and audio sits
  between it and the image, so the grid's slot in the context is offset."""
  modalities = {"text": 4, "audio": 2, "image": 6}
  block = build_fusion(DISTANCE, modalities=modalities, features=F, rngs=nnx.Rngs(0), depth=2,
                       num_heads=2, update=("text",), norm="pre", spatial="image", attention_maps=True)
  for layer in block.layers:
    for p in (layer.cross.query.kernel, layer.cross.query.bias):
      p[...] = jnp.zeros_like(p[...])
  scale = block.layers[1].distance_scale["text"]
  scale.bias[...] = jnp.full_like(scale.bias[...], 40.0 * sign)
  rng = np.random.default_rng(0)
  inputs = {m: (rng.normal(size=(2, n, d)).astype(np.float32), None)
            for m, d, n in (("text", 4, 3), ("audio", 2, 5), ("image", 6, 9))}
  maps = block(inputs).aux["cross_attention"]["text"]
  first, second = np.asarray(maps["image"][0]), np.asarray(maps["image"][1])  # (B, H, 3, 9)
  np.testing.assert_allclose(first.sum(-1), 9 / (9 + 5), rtol=1e-5)  # uniform over 9 + 5 tokens
  expected = np.zeros(9)
  expected[cells] = 1 / len(cells)
  # The bias is zero off the grid, so audio keeps its content logits: compare within the grid.
  np.testing.assert_allclose(second / second.sum(-1, keepdims=True), np.broadcast_to(expected, second.shape),
                             atol=1e-4)


def test_bad_inputs_give_clear_errors():
  block = harness("concat", 2).block
  tokens, masks = make_tokens(2), make_masks(2)
  good = {m: (tokens[m], masks[m]) for m in tokens}
  with pytest.raises(ValueError, match=r"'text'.*batch size 3.*does not divide.*\(4, N, 4\)"):
    block(dict(good, text=(tokens["text"][:3], masks["text"][:3])))
  with pytest.raises(ValueError, match=r"'image': tokens expected shape \(B, N, 6\)"):
    block(dict(good, image=(tokens["image"][:, 0], masks["image"])))
  with pytest.raises(ValueError, match=r"'image': tokens expected shape \(B, N, 6\)"):
    block(dict(good, image=(tokens["image"][..., :5], masks["image"])))
  with pytest.raises(ValueError, match=r"'text': mask expected shape"):
    block(dict(good, text=(tokens["text"], masks["text"][:, :2])))
  with pytest.raises(ValueError, match=r"unknown modality 'audio'.*\['image', 'text'\]"):
    block(dict(good, audio=(np.zeros((B, 2, 2)), None)))
  with pytest.raises(ValueError, match=r"presence\['text'\]: expected shape \(B,\)"):
    block(good, {"text": np.ones((B, 1), bool)})
  with pytest.raises(ValueError, match=r"presence: unknown modality 'speech'"):
    block(good, {"speech": np.ones(B, bool)})
