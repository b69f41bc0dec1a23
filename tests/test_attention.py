"""Attention kernels by name, attention maps on request, the cross-attention bias hook."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.fusion import build_fusion
from mmjax.fusion.cross_attention import CrossAttentionFusion
from mmjax.layers import Encoder, MultiHeadAttention, make_attention_mask
from mmjax.layers import attention
from mmjax.layers.attention import record_attention
from mmjax.models.base import build_encoder
from mmjax.models.captioner import TransformerCaptioner

DISTANCE = "mmjax.projects.sort_of_clevr.fusion:distance_cross_attention"
MODALITIES = {"image": 6, "text": 4}


def kernels_in_hlo(fn, *args) -> set[str]:
  """The attention kernels whose named scopes the compiled HLO of `fn(*args)` holds."""
  return set(re.findall(r"attention_(xla|cudnn|auto_cudnn|reference)\b", jax.jit(fn).lower(*args).compile().as_text()))


def inputs(seed=0, batch=4, lq=5, lk=7, d=16, dk=12):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, lq, d)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(batch, lk, dk)), jnp.float32)
  return x, ctx, rng


def test_unknown_kernel_lists_the_choices():
  with pytest.raises(ValueError, match=r"attention: expected one of \('auto', 'xla', 'cudnn', 'reference'\), got 'flash'"):
    MultiHeadAttention(2, 8, attention="flash", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention='xla': the fused kernels have no dropout"):
    MultiHeadAttention(2, 8, attention="xla", dropout=0.1, rngs=nnx.Rngs(0))


def test_cudnn_on_cpu_raises_naming_the_setting():
  """No silent fallback: asking for cuDNN where it cannot run fails at the first call."""
  assert jax.default_backend() == "cpu"
  x, _, _ = inputs()
  mha = MultiHeadAttention(4, 16, attention="cudnn", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"attention='cudnn': cuDNN's fused attention needs a GPU; "
                                       r"the default platform is 'cpu'"):
    mha(x)
  block = build_fusion("cross_attention", modalities=MODALITIES, features=8, num_heads=2,
                       attention="cudnn", rngs=nnx.Rngs(0))  # set as a config's fusion_kwargs would
  with pytest.raises(ValueError, match="attention='cudnn'"):
    block({"image": (jnp.ones((2, 4, 6)), None), "text": (jnp.ones((2, 3, 4)), None)})


def test_auto_on_cpu_takes_the_fused_xla_kernel(caplog, monkeypatch):
  """"auto" compiles XLA's fused attention on the CPU (read in the compiled HLO's op names, where
  each kernel runs in a named scope) and logs its pick once; "reference" is seen there too."""
  monkeypatch.setattr(attention, "_logged", set())  # as in a fresh process
  x, _, _ = inputs()
  mask = make_attention_mask(jnp.ones((4, 5), bool), jnp.arange(5)[None] < jnp.array([[5], [3], [4], [5]]))
  for kernel, want in (("auto", {"xla"}), ("auto", {"xla"}), ("xla", {"xla"}), ("reference", {"reference"})):
    graphdef, state = nnx.split(MultiHeadAttention(4, 16, attention=kernel, rngs=nnx.Rngs(0)))
    with caplog.at_level(logging.INFO, logger="mmjax.layers.attention"):
      got = kernels_in_hlo(lambda s, x, m: nnx.merge(graphdef, s)(x, mask=m), state, x, mask)
    assert got == want, kernel
  picked = [r.getMessage() for r in caplog.records if "attention='auto' picked" in r.getMessage()]
  assert picked == ["attention='auto' picked 'xla' (float32 on cpu)"]  # once for two compilations
  # Weights asked for: the reference kernel, the only one that computes them.
  graphdef, state = nnx.split(MultiHeadAttention(4, 16, rngs=nnx.Rngs(0)))
  assert kernels_in_hlo(lambda s, x: nnx.merge(graphdef, s)(x, return_weights=True)[1], state, x) == {"reference"}


def _pair(**kw):
  """The same parameters under XLA's fused kernel and the reference kernel; a logit scale that
  is no power of 2, so that where each kernel applies it rounds differently."""
  return (MultiHeadAttention(4, 16, attention="xla", qk_scale=1.7, rngs=nnx.Rngs(0), **kw),
          MultiHeadAttention(4, 16, attention="reference", qk_scale=1.7, rngs=nnx.Rngs(0), **kw))


def _assert_same_outputs_and_grads(fused, reference, call, *args):
  def loss(model, *args):
    out = call(model, *args)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), out

  grad = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, a), (ga, gxa) = grad(fused, *args)
  (_, b), (gb, gxb) = grad(reference, *args)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Gradients: sums of O(1) terms, so rounding is absolute (the key bias's is zero up to it).
  np.testing.assert_allclose(gxa, gxb, rtol=1e-6, atol=2e-6)
  for u, v in zip(jax.tree.leaves(nnx.state(ga, nnx.Param)), jax.tree.leaves(nnx.state(gb, nnx.Param))):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=2e-6)
  assert np.abs(np.asarray(a)).max() > 0.1  # not trivially equal


def test_fused_equals_reference_self_attention_with_padding_and_bias():
  x, _, rng = inputs(1)
  lengths = jnp.array([[5], [3], [1], [4]])
  mask = make_attention_mask(*(jnp.arange(5)[None] < lengths,) * 2)
  bias = jnp.asarray(rng.normal(size=(4, 4, 5, 5)) * 3, jnp.float32)
  fused, reference = _pair()
  _assert_same_outputs_and_grads(fused, reference, lambda m, x: m(x, mask=mask, bias=bias), x)


def test_fused_equals_reference_cross_attention_with_context_repeats():
  """Keys and values shared by r = 2 consecutive queries (one image, two questions), with a
  per-example key mask and a per-example, per-head bias: both kernels, and the repeated context."""
  x, _, rng = inputs(2)
  ctx = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)
  mask = jnp.asarray(rng.random((4, 1, 1, 7)) > 0.3).at[..., 0].set(True)
  bias = jnp.asarray(rng.normal(size=(4, 4, 5, 7)) * 3, jnp.float32)
  fused, reference = _pair(kv_features=12)
  shared = lambda m, x, c: m(x, c, mask=mask, bias=bias, context_repeats=2)  # noqa: E731
  _assert_same_outputs_and_grads(fused, reference, shared, x, ctx)
  repeated = reference(x, jnp.repeat(ctx, 2, axis=0), mask=mask, bias=bias)
  np.testing.assert_allclose(fused(x, ctx, mask=mask, bias=bias, context_repeats=2), repeated,
                             rtol=1e-6, atol=1e-6)


def _fusion_inputs(rng, batch=4):
  return {"image": (jnp.asarray(rng.normal(size=(batch, 4, 6)), jnp.float32), None),
          "text": (jnp.asarray(rng.normal(size=(batch, 3, 4)), jnp.float32),
                   jnp.arange(3)[None] < jnp.array([[3], [2], [1], [3]]))}


def test_cross_attention_maps_only_when_asked():
  """By default the block returns no maps and compiles no reference kernel; asked, it returns
  them (rows summing to 1 over the real tokens of the other modality) with the same output."""
  rng = np.random.default_rng(3)
  x = _fusion_inputs(rng)
  kw = dict(modalities=MODALITIES, features=8, num_heads=2)
  plain = build_fusion("cross_attention", rngs=nnx.Rngs(0), **kw)  # the default
  maps = build_fusion("cross_attention", attention_maps=True, rngs=nnx.Rngs(0), **kw)
  graphdef, state = nnx.split(plain)
  assert kernels_in_hlo(lambda s, x: nnx.merge(graphdef, s)(x).pooled, state, x) == {"xla"}
  a, b = plain(x), maps(x)
  assert "cross_attention" not in a.aux
  text = b.aux["cross_attention"]["text"]["image"]  # (depth, B, H, N_text, N_image)
  assert text.shape == (2, 4, 2, 3, 4)
  np.testing.assert_allclose(text.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(a.pooled, b.pooled, rtol=1e-5, atol=1e-6)


def test_recorded_weights_are_the_returned_ones():
  """record_attention + nnx.capture collect every layer's weights (reference kernel); with the
  flags off again the encoder sows nothing and computes the same output."""
  x, _, _ = inputs(4)
  mask = jnp.arange(5)[None] < jnp.array([[5], [3], [4], [2]])
  enc = Encoder(2, 16, 4, 32, rngs=nnx.Rngs(0))
  with record_attention(enc):
    out, recorded = nnx.capture(enc, nnx.Intermediate)(x, mask)
  amask = make_attention_mask(mask, mask)
  h = x
  for i, block in enumerate(enc.layers):
    _, w = block.attn(block.attn_norm(h), mask=amask, return_weights=True)
    np.testing.assert_allclose(recorded["layers"][i]["attn"]["attention_weights"].get_value()[0], w,
                               rtol=1e-6, atol=1e-7)
    h = block(h, amask)
  again, nothing = nnx.capture(enc, nnx.Intermediate)(x, mask)
  assert not any(m.record_weights for _, m in nnx.iter_graph(enc) if isinstance(m, MultiHeadAttention))
  assert not jax.tree.leaves(nothing)
  np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-6)


def test_single_stream_maps_only_when_asked():
  rng = np.random.default_rng(5)
  x = _fusion_inputs(rng)
  kw = dict(modalities=MODALITIES, features=8, num_heads=2)
  plain = build_fusion("single_stream", rngs=nnx.Rngs(0), **kw)  # the default
  maps = build_fusion("single_stream", attention_maps=True, rngs=nnx.Rngs(0), **kw)
  a, b = plain(x), maps(x)
  assert "self_attention" not in a.aux
  cls = b.aux["self_attention"]["cls"]  # (depth, B, H, 1, N_o): [CLS] over each modality
  assert cls["image"].shape == (2, 4, 2, 1, 4) and cls["text"].shape == (2, 4, 2, 1, 3)
  on_tokens = cls["image"].sum(-1) + cls["text"].sum(-1)  # the rest is on [CLS] itself
  assert (on_tokens > 0.1).all() and (on_tokens < 1).all()
  np.testing.assert_array_equal(cls["text"][:, 2, :, :, 1:], 0.0)  # example 2 has one text token
  np.testing.assert_allclose(a.pooled, b.pooled, rtol=1e-5, atol=1e-6)


class NearestToken(CrossAttentionFusion):
  """A variant built on the bias hook: from the second layer on the text attends to image token 2."""

  def layer_bias(self, i, layer, m, query, previous, x):
    if i == 0 or m != "text":
      return None
    start, n = self.context_slots(m, x)["image"]
    ctx = sum(1 + k for _, k in self.context_slots(m, x).values())
    bias = jnp.full((ctx,), -1e4).at[start + 2].set(0.0)  # (ctx,) broadcast to (B, H, L_m, ctx)
    return jnp.broadcast_to(bias, query.shape[:1] + (layer.cross.num_heads, query.shape[1], ctx))


def test_layer_bias_hook_builds_a_variant():
  rng = np.random.default_rng(6)
  x = _fusion_inputs(rng)
  kw = dict(modalities=MODALITIES, features=8, num_heads=2, attention_maps=True)
  maps = NearestToken(**kw, rngs=nnx.Rngs(0))(x).aux["cross_attention"]["text"]["image"]
  plain = CrossAttentionFusion(**kw, rngs=nnx.Rngs(0))(x).aux["cross_attention"]["text"]["image"]
  np.testing.assert_allclose(maps[0], plain[0], rtol=1e-6)  # the first layer has no bias
  np.testing.assert_allclose(maps[1][..., 2], 1.0, atol=1e-6)
  assert not np.allclose(plain[1][..., 2], 1.0, atol=1e-2)


def test_distance_fusion_with_zero_scales_is_the_plain_block():
  """The project's distance bias, with its scales at zero, adds exact zeros: the block equals
  the generic cross-attention (reference kernel) with the same parameters, bit for bit; with its
  initial scales it differs. Its layers that feed the next one's bias run the reference kernel."""
  rng = np.random.default_rng(7)
  x = _fusion_inputs(rng)
  kw = dict(modalities=MODALITIES, features=8, num_heads=2, update=("text",), norm="pre",
            qk_scale=4.0)
  zero = build_fusion(DISTANCE, spatial="image", revisit=True, rngs=nnx.Rngs(0), **kw)
  biased = build_fusion(DISTANCE, spatial="image", revisit=True, distance_init=0.1, revisit_init=-4.0,
                        rngs=nnx.Rngs(0), **kw)
  plain = build_fusion("cross_attention", attention="reference", rngs=nnx.Rngs(1), **kw)
  scales = nnx.Any(nnx.PathContains("distance_scale"), nnx.PathContains("revisit_scale"))
  shared = nnx.state(zero, nnx.All(nnx.Param, nnx.Not(scales)))  # every parameter the plain block has
  nnx.update(plain, shared)
  nnx.update(biased, shared)
  np.testing.assert_array_equal(zero(x).pooled, plain(x).pooled)
  assert not np.allclose(biased(x).pooled, plain(x).pooled, atol=1e-4)
  graphdef, state = nnx.split(zero)
  # the streams' self-attention is fused, the cross-attention of every layer is the reference's
  assert kernels_in_hlo(lambda s, x: nnx.merge(graphdef, s)(x).pooled, state, x) == {"xla", "reference"}


def _encoder(name, **spec):
  """Builds `name` from a config's encoder spec dict (the ENCODERS registry) with `attention`."""
  return lambda attention: build_encoder({"name": name, "attention": attention, **spec}, rngs=nnx.Rngs(0))


def _ids(rng, vocab, lengths, width=6):
  """Right-padded (B, width) ids in [1, vocab), 0 past each row's length."""
  ids = rng.integers(1, vocab, size=(len(lengths), width))
  return jnp.asarray(np.where(np.arange(width)[None] < np.array(lengths)[:, None], ids, 0), jnp.int32)


def _models(rng):
  """kind -> (build(attention) as a config would, call(model, *args) -> array, args)."""
  images = lambda size: jnp.asarray(rng.random((2, size, size, 3)), jnp.float32)  # noqa: E731
  pooled = lambda m, x: m(x).pooled  # noqa: E731
  clip_ids = _ids(rng, 99, [6, 4]).at[:, 3].set(99)  # an end-of-text token in each row
  captioner = lambda attention: TransformerCaptioner(  # noqa: E731
      20, encoders={"image": {"name": "small_cnn", "features": 16, "channels": (8, 8)}},  # no attention
      image_shape=(16, 16, 3), features=16, depth=2, num_heads=2, max_len=8, attention=attention,
      rngs=nnx.Rngs(0))
  bottleneck = lambda attention: build_fusion("bottleneck", modalities=MODALITIES, features=8,  # noqa: E731
                                              num_heads=2, attention=attention, rngs=nnx.Rngs(0))
  return {
      "vit": (_encoder("vit", variant="mu/16", image_size=32, depth=2), pooled, (images(32),)),
      "small_cnn": (_encoder("small_cnn", features=16, channels=(8, 8), depth=2, num_heads=2), pooled,
                    (images(16),)),
      "bert": (_encoder("bert", variant="tiny", attn_dropout=0.0), pooled, (_ids(rng, 1000, [6, 3]),)),
      "clip_text": (_encoder("clip_text", vocab_size=100, hidden=32, depth=2, heads=2, mlp_dim=64,
                             max_len=8, eos_id=99), pooled, (clip_ids,)),
      "rnn_text": (_encoder("rnn_text", vocab_size=50, features=16, hidden=8, pool="attention",
                            pool_heads=2), pooled, (_ids(rng, 50, [6, 3]),)),
      "ast": (_encoder("ast", width=32, depth=2, num_heads=2, n_mels=16, max_frames=32), pooled,
              (jnp.asarray(rng.normal(size=(2, 32, 16)), jnp.float32),)),
      "captioner": (captioner, lambda m, x, t: m(x, t)[0], (images(16), _ids(rng, 20, [6, 4]))),
      "bottleneck": (bottleneck, pooled, (_fusion_inputs(rng),)),
  }


@pytest.mark.parametrize("kind", ["vit", "small_cnn", "bert", "clip_text", "rnn_text", "ast", "captioner",
                                  "bottleneck"])
def test_models_pass_the_attention_kernel_to_every_layer(kind):
  """`attention` set where a config sets it reaches every attention layer: "cudnn" on the CPU
  raises at the first call, and "reference" is the only kernel in the compiled HLO."""
  build, call, args = _models(np.random.default_rng(8))[kind]
  cudnn = build("cudnn")
  assert {m.attention for _, m in nnx.iter_graph(cudnn) if isinstance(m, MultiHeadAttention)} == {"cudnn"}
  with pytest.raises(ValueError, match=r"attention='cudnn': cuDNN's fused attention needs a GPU"):
    call(cudnn, *args)
  graphdef, state = nnx.split(build("reference"))
  assert kernels_in_hlo(lambda s, *a: call(nnx.merge(graphdef, s), *a), state, *args) == {"reference"}
