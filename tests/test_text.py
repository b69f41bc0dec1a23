"""Text encoders: shapes, masks, padding invariance, published parameter counts, grads, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.encoders.base import ENCODERS
from mmjax.encoders.text import BertEncoder, BertSpec, RnnTextEncoder, decode_variant, masked_mean

IDS = np.array([[101, 7, 8, 9, 102, 0, 0],
                [101, 5, 102, 0, 0, 0, 0],
                [101, 4, 4, 6, 2, 9, 102]], np.int32)
MASK = IDS != 0


def _scramble_padding(ids, mask, seed=1):
  """The same ids with random tokens written at padded positions."""
  junk = np.random.default_rng(seed).integers(1, 50, ids.shape).astype(ids.dtype)
  return np.where(mask, ids, junk)


@nnx.jit
def _forward(model, ids, mask):
  return model(ids, mask)


def _count(model):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _tiny(**kw):
  return BertEncoder("tiny", dropout=0.0, attn_dropout=0.0, rngs=nnx.Rngs(0), **kw)


@pytest.fixture(scope="module")
def bert():
  return _tiny()


def test_bert_shapes_masks_and_padding_invariance(bert):
  out = _forward(bert, jnp.asarray(IDS), jnp.asarray(MASK))
  assert out.tokens.shape == (3, 7, 32) and out.pooled.shape == (3, 32)
  assert out.mask.dtype == jnp.bool_ and np.array_equal(out.mask, MASK)
  np.testing.assert_allclose(out.pooled, jnp.tanh(bert.pooler(out.tokens[:, 0])), atol=1e-6)
  other = _forward(bert, jnp.asarray(_scramble_padding(IDS, MASK)), jnp.asarray(MASK))
  np.testing.assert_allclose(np.asarray(other.tokens)[MASK], np.asarray(out.tokens)[MASK], atol=1e-6)
  np.testing.assert_allclose(other.pooled, out.pooled, atol=1e-6)


def test_bert_mean_pool_is_padding_invariant():
  model = _tiny(pool="mean")
  out = _forward(model, jnp.asarray(IDS), jnp.asarray(MASK))
  want = np.asarray(out.tokens * MASK[..., None]).sum(1) / MASK.sum(1, keepdims=True)
  np.testing.assert_allclose(out.pooled, want, atol=1e-5)
  other = _forward(model, jnp.asarray(_scramble_padding(IDS, MASK)), jnp.asarray(MASK))
  np.testing.assert_allclose(other.pooled, out.pooled, atol=1e-6)


def test_bert_default_mask_hidden_states_and_type_ids(bert):
  ref = _forward(bert, jnp.asarray(IDS), jnp.asarray(MASK))

  @nnx.jit
  def run(model, ids, types):
    return model(ids, return_hidden=True), model(ids, jnp.asarray(MASK, jnp.int32), types)

  (out, hidden), typed = run(bert, jnp.asarray(IDS), jnp.asarray((np.arange(7) >= 3)[None].repeat(3, 0), jnp.int32))
  np.testing.assert_array_equal(out.mask, MASK)  # the default mask is ids != pad_id
  np.testing.assert_allclose(out.tokens, ref.tokens, atol=1e-6)
  assert len(hidden) == bert.spec.depth + 1
  np.testing.assert_array_equal(hidden[-1], out.tokens)
  assert not np.allclose(typed.pooled, ref.pooled, atol=1e-4)


def test_bert_param_counts_are_published_ones():
  base = nnx.eval_shape(lambda: BertEncoder("bert-base", rngs=nnx.Rngs(0)))
  assert _count(base) == 109_482_240  # bert-base-uncased BertModel, with pooler
  assert _count(base.pooler) == 768 * 768 + 768
  minilm = nnx.eval_shape(lambda: BertEncoder("minilm-l6-h384", rngs=nnx.Rngs(0)))
  assert _count(minilm) == 22_713_216  # all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased)
  assert decode_variant("bert-small") == BertSpec(hidden=512, depth=4, heads=8, mlp_dim=2048)
  assert decode_variant("bert-base", vocab_size=100).vocab_size == 100
  shapes = nnx.eval_shape(lambda m, i: m(i), minilm, jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert shapes.tokens.shape == (2, 16, 384) and shapes.pooled.shape == (2, 384)


def test_bert_validation_errors(bert):
  with pytest.raises(TypeError, match="ids"):
    bert(jnp.ones((2, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"ids.*\(B, L\)"):
    bert(jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"ids.*\[0, 1000\).*max 1000"):
    bert(jnp.array([[1, 1000]]))
  with pytest.raises(ValueError, match=r"ids.*min -1"):
    bert(jnp.array([[1, -1]]))
  with pytest.raises(ValueError, match="ids: length 129 exceeds the 128 positions"):
    bert(jnp.ones((1, 129), jnp.int32))
  with pytest.raises(ValueError, match="mask"):
    bert(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"type_ids.*\[0, 2\)"):
    bert(jnp.ones((1, 3), jnp.int32), type_ids=jnp.full((1, 3), 2))
  with pytest.raises(ValueError, match="pool"):
    BertEncoder("tiny", pooler=False, pool="pooler", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="variant"):
    BertEncoder("bert-huge", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="hidden_size"):
    BertEncoder("tiny", hidden_size=8, rngs=nnx.Rngs(0))


def test_bert_gradients_finite(bert):
  @nnx.jit
  def grads(model, ids, mask):
    return nnx.grad(lambda m: jnp.sum(m(ids, mask).pooled ** 2))(model)

  g = jax.tree.leaves(grads(bert, jnp.asarray(IDS), jnp.asarray(MASK)))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)
  assert all(float(jnp.abs(x).sum()) > 0 for x in g)


def test_bert_bf16_runs_close_to_f32(bert):
  ref = _forward(bert, jnp.asarray(IDS), jnp.asarray(MASK))
  out = _forward(_tiny(dtype=jnp.bfloat16), jnp.asarray(IDS), jnp.asarray(MASK))
  assert out.tokens.dtype == jnp.bfloat16 and out.pooled.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(out.tokens.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(out.pooled, np.float32), ref.pooled, atol=0.1)


def test_masked_mean_ignores_padding_and_empty_rows():
  tokens = jnp.arange(12, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.array([[True, True, False], [False, False, False]])
  np.testing.assert_allclose(masked_mean(tokens, mask), [[1.0, 2.0], [0.0, 0.0]])


@pytest.mark.parametrize("cell,bidirectional,num_layers", [("lstm", True, 1), ("gru", False, 2)])
def test_rnn_padding_invariance_and_last_state(cell, bidirectional, num_layers):
  model = RnnTextEncoder(50, 8, 6, cell=cell, bidirectional=bidirectional, num_layers=num_layers,
                         rngs=nnx.Rngs(0))
  ids = np.where(MASK, IDS % 50, 0).astype(np.int32)
  mask = ids != 0
  out = _forward(model, jnp.asarray(ids), None)
  D = 12 if bidirectional else 6
  assert out.tokens.shape == (3, 7, D) and out.pooled.shape == (3, D)
  np.testing.assert_array_equal(out.mask, mask)
  assert float(jnp.abs(out.tokens[~mask]).max()) == 0.0  # padding is zeroed
  # The pooled state is the forward state at the last real token (and the backward one at 0).
  lengths = mask.sum(1)
  tok = np.asarray(out.tokens)
  last = tok[np.arange(3), lengths - 1, :6]
  np.testing.assert_allclose(np.asarray(out.pooled)[:, :6], last, atol=1e-6)
  if bidirectional:
    np.testing.assert_allclose(np.asarray(out.pooled)[:, 6:], tok[:, 0, 6:], atol=1e-6)
  # A padded sequence gives the same result as the unpadded one, whatever sits in the padding.
  scrambled = _forward(model, jnp.asarray(_scramble_padding(ids, mask)), jnp.asarray(mask))
  np.testing.assert_allclose(scrambled.tokens, out.tokens, atol=1e-6)
  np.testing.assert_allclose(scrambled.pooled, out.pooled, atol=1e-6)
  if cell == "lstm":
    alone = _forward(model, jnp.asarray(ids[1:2, :lengths[1]]), None)
    np.testing.assert_allclose(alone.pooled, out.pooled[1:2], atol=1e-6)
    np.testing.assert_allclose(alone.tokens, out.tokens[1:2, :lengths[1]], atol=1e-6)


def test_rnn_max_pool_over_real_tokens_only():
  model = RnnTextEncoder(50, 8, 6, pool="max", rngs=nnx.Rngs(0))
  ids = jnp.array([[3, 4, 5, 0], [7, 0, 0, 0], [0, 0, 0, 0]], jnp.int32)
  out = _forward(model, ids, None)
  tok = np.asarray(out.tokens)
  np.testing.assert_allclose(out.pooled[0], tok[0, :3].max(0), atol=1e-6)
  np.testing.assert_allclose(out.pooled[1], tok[1, 0], atol=1e-6)  # not max(., 0) of the padding
  assert (tok[1, 0] < 0).any()
  assert float(jnp.abs(out.pooled[2]).max()) == 0.0  # an empty row pools to zeros
  grads = nnx.grad(lambda m: jnp.sum(m(ids).pooled ** 2))(model)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_rnn_embed_skip_adds_a_context_free_part_per_token():
  """embed_skip: tokens = RNN outputs (of the same weights without the skip) + W e(token) + b,
  zero at padding; the added part of a word is the same in every sentence."""
  skip = RnnTextEncoder(50, 8, 6, pool="mean", embed_skip=True, rngs=nnx.Rngs(0))
  plain = RnnTextEncoder(50, 8, 6, pool="mean", rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(skip, nnx.Not(nnx.PathContains("skip"))))
  ids = jnp.array([[3, 4, 5, 0], [9, 4, 0, 0]], jnp.int32)
  a, b = _forward(skip, ids, None), _forward(plain, ids, None)
  emb = np.asarray(skip.embed.embedding[...])[np.asarray(ids)]  # (B, L, F)
  added = emb @ np.asarray(skip.skip.kernel[...]) + np.asarray(skip.skip.bias[...])
  mask = np.asarray(ids != 0)[..., None]
  np.testing.assert_allclose(a.tokens, (np.asarray(b.tokens) + added) * mask, atol=1e-5)
  np.testing.assert_allclose(a.pooled, np.asarray(a.tokens)[:, :3].sum(1) / [[3], [2]], atol=1e-5)
  part = np.asarray(a.tokens) - np.asarray(b.tokens)
  np.testing.assert_allclose(part[0, 1], part[1, 1], atol=1e-5)  # word 4 in two contexts


def test_rnn_attention_pool_is_multi_head_attention_from_a_learned_probe():
  """pool="attention": per head, softmax over the real tokens of (W_q p + b_q).(W_k t + b_k) /
  sqrt(Dh), then the out projection of the weighted values (numpy); the zero probe starts as the
  value and out maps of the mean; padding does not change it; an empty row pools to zeros."""
  model = RnnTextEncoder(50, 8, 6, pool="attention", pool_heads=3, embed_skip=True, rngs=nnx.Rngs(0))
  ids = jnp.array([[3, 4, 5, 0, 0], [9, 4, 0, 0, 0], [0, 0, 0, 0, 0]], jnp.int32)
  at_init = _forward(model, ids, None)
  tokens = np.asarray(at_init.tokens)
  value = lambda x: x @ np.asarray(model.attend.value.kernel[...]) + np.asarray(model.attend.value.bias[...])
  out = lambda x: x @ np.asarray(model.attend.out.kernel[...]) + np.asarray(model.attend.out.bias[...])
  mean = tokens[:2, :3].sum(1) / np.array([[3], [2]])
  np.testing.assert_allclose(at_init.pooled[:2], out(value(mean)), atol=1e-5)
  model.probe[...] = jax.random.normal(jax.random.key(1), (1, 1, 12))
  got = _forward(model, ids, None)
  a = model.attend
  q = (np.asarray(model.probe[...])[0] @ np.asarray(a.query.kernel[...]) + np.asarray(a.query.bias[...]))
  k = tokens @ np.asarray(a.key.kernel[...]) + np.asarray(a.key.bias[...])  # (B, L, 12)
  v = value(tokens)
  logits = np.einsum("hd,blhd->bhl", q.reshape(3, 4), k.reshape(3, 5, 3, 4)) / 2.0  # sqrt(Dh) = 2
  logits = np.where(np.asarray(ids != 0)[:, None, :], logits, -np.inf)
  for b, n in ((0, 3), (1, 2)):
    w = np.exp(logits[b, :, :n] - logits[b, :, :n].max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)  # (H, n)
    heads = np.einsum("hl,lhd->hd", w, v[b, :n].reshape(n, 3, 4)).reshape(12)
    np.testing.assert_allclose(got.pooled[b], out(heads), atol=1e-5)
  assert float(jnp.abs(got.pooled[2]).max()) == 0.0
  padded = _forward(model, jnp.pad(ids, ((0, 0), (0, 3))), None)
  np.testing.assert_allclose(padded.pooled, got.pooled, atol=1e-6)
  with pytest.raises(ValueError, match="pool_heads"):
    RnnTextEncoder(50, 8, 6, pool="attention", pool_heads=5, rngs=nnx.Rngs(0))


def test_rnn_mean_pool_bf16_and_errors():
  model = RnnTextEncoder(50, 8, 6, pool="mean", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ids = jnp.array([[3, 4, 5, 0], [0, 0, 0, 0]], jnp.int32)
  out = _forward(model, ids, None)
  assert out.tokens.dtype == jnp.bfloat16 and out.pooled.shape == (2, 12)
  np.testing.assert_allclose(np.asarray(out.pooled, np.float32)[0],
                             np.asarray(out.tokens, np.float32)[0, :3].mean(0), atol=1e-2)
  assert float(jnp.abs(out.pooled[1]).max()) == 0.0  # an empty row pools to zeros
  with pytest.raises(ValueError, match="right-padded"):
    model(ids, jnp.array([[True, False, True, False], [True, False, False, False]]))
  with pytest.raises(ValueError, match="ids"):
    model(jnp.array([[3, 50]], jnp.int32))
  with pytest.raises(ValueError, match="cell"):
    RnnTextEncoder(50, cell="rnn", rngs=nnx.Rngs(0))


def test_registered_names():
  assert {"bert", "rnn_text", "minilm"} <= set(ENCODERS.names())
  model = nnx.eval_shape(lambda: ENCODERS.build("bert", variant="tiny", rngs=nnx.Rngs(0)))
  assert isinstance(model, BertEncoder) and model.spec.hidden == 32
  rnn = nnx.eval_shape(lambda: ENCODERS.build("rnn_text", vocab_size=10, rngs=nnx.Rngs(0)))
  assert isinstance(rnn, RnnTextEncoder) and rnn.out_features == 256
