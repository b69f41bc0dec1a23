"""Captioners: teacher forcing equals cached step-by-step decoding, beam 1 equals greedy, one
compilation per shape, and a few Adam steps learn a tiny synthetic captioning task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.encoders.base import ENCODERS, EncoderOutput
from mmjax.layers import PatchEmbed
from mmjax.models import decoding
from mmjax.models.captioner import ShowAndTell, TransformerCaptioner

PAD, BOS, EOS, V, ENC_D, L = 0, 1, 2, 12, 12, 4
# Class c of the synthetic task: image colour c, caption words below, then EOS.
CAPTIONS = [[3, 7], [4, 8], [5, 7, 9], [6]]


class TinyEncoder(nnx.Module):
  """4x4 patches of (B, 8, 8, 3) images -> 4 tokens; the last is masked where pixel (0, 0, 1) < 0."""

  def __init__(self, features: int, *, dtype=None, rngs: nnx.Rngs):
    del dtype  # float32: built by name, encoders get the model's compute dtype
    self.patch = PatchEmbed(4, 3, features, rngs=rngs)

  def __call__(self, images, *, deterministic=True):
    tokens, _ = self.patch(images)  # (B, 4, D)
    N = tokens.shape[1]
    mask = (jnp.arange(N)[None, :] < N - 1) | (images[:, :1, 0, 1] >= 0)
    pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return EncoderOutput(tokens, mask, pooled)


if "test_captioner_tiny" not in ENCODERS:
  ENCODERS.register("test_captioner_tiny")(TinyEncoder)


def make(kind, encoder=None, cls=None, **kw):
  """The tiny captioner of `kind` ("transformer" or "lstm") used throughout."""
  encoder = encoder or TinyEncoder(ENC_D, rngs=nnx.Rngs(1))
  common = {"encoders": {"image": encoder}, "image_shape": (8, 8, 3), "features": 16,
            "rngs": nnx.Rngs(0), **kw}
  if kind == "transformer":
    return (cls or TransformerCaptioner)(V, depth=2, num_heads=2, max_len=8, **common)
  return (cls or ShowAndTell)(V, **common)


def images(seed, B=4):
  """Test data made with NumPy, so that no eager JAX op needs compiling."""
  return np.random.default_rng(seed).normal(size=(B, 8, 8, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=["transformer", "lstm"])
def kind(request):
  return request.param


@pytest.fixture(scope="module")
def model(kind):
  return make(kind)


def test_teacher_forcing_equals_cached_decoding(model):
  tokens = np.random.default_rng(2).integers(0, V, size=(4, 5)).astype(np.int32)
  mask = np.arange(5)[None, :] < np.array([5, 5, 3, 4])[:, None]  # right padding

  @jax.jit
  def both(graphdef, state, imgs, tokens, mask):
    m = nnx.merge(graphdef, state)
    forced, _ = m(imgs, tokens, mask)
    m.init_decode(imgs, beams=1, max_len=tokens.shape[1])
    step_def, cache, rest = nnx.split(m, nnx.Cache, ...)

    def step(cache, tok):
      m = nnx.merge(step_def, cache, rest)
      logits = m.decode_step(tok[:, None])
      return nnx.state(m, nnx.Cache), logits

    _, stepped = jax.lax.scan(step, cache, tokens.T)  # (L, B, V)
    return forced, stepped.swapaxes(0, 1)

  forced, stepped = both(*nnx.split(model), images(0), tokens, mask)
  assert forced.shape == (4, 5, V)
  np.testing.assert_allclose(np.asarray(forced)[mask], np.asarray(stepped)[mask], atol=1e-5)
  assert np.abs(np.asarray(forced)).max() > 1e-3  # not trivially zero


def test_beam_one_equals_greedy(model):
  kw = dict(max_len=6, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  greedy = model.generate(images(3), method="greedy", **kw)
  beam = model.generate(images(3), method="beam", beam_size=1, **kw)
  assert greedy.tokens.shape == (4, 6)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)


class CountingShowAndTell(ShowAndTell):
  """Counts Python executions (= traces) of decode_step."""

  traces = 0

  def decode_step(self, tokens):
    CountingShowAndTell.traces += 1
    return super().decode_step(tokens)


class CountingTransformer(TransformerCaptioner):
  """Counts Python executions (= traces) of decode_step."""

  traces = 0

  def decode_step(self, tokens):
    CountingTransformer.traces += 1
    return super().decode_step(tokens)


@nnx.jit
def sequence_log_probs(model, imgs, seqs, lengths):
  """Teacher-forced log-probability of each generated sequence (B, L) up to its length."""
  inputs = jnp.concatenate([jnp.full((seqs.shape[0], 1), BOS), seqs[:, :-1]], axis=1)
  mask = jnp.arange(seqs.shape[1])[None, :] < lengths[:, None]
  logits, _ = model(imgs, inputs, mask)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), seqs[..., None], -1)[..., 0]
  return (lp * mask).sum(-1)


def test_beam_search_compiles_once_and_scores_its_beams(kind):
  cls = CountingTransformer if kind == "transformer" else CountingShowAndTell
  model = make(kind, cls=cls)
  kw = dict(method="beam", beam_size=3, max_len=5, bos_id=BOS, eos_id=EOS, return_all=True)
  size0, traces0 = decoding.decode_jit._cache_size(), cls.traces
  counts = []
  for seed, alpha in ((4, 0.0), (5, 0.0), (6, 0.8)):  # same shape, new contents and penalty
    out = model.generate(images(seed), length_penalty=alpha, **kw)
    counts.append(cls.traces - traces0)
  assert counts == [1, 1, 1]  # one trace of the step for the whole loop, none on later calls
  assert decoding.decode_jit._cache_size() == size0 + 1
  # Every beam's score is its teacher-forced log-probability, length-normalised.
  seqs = np.asarray(out.beam_tokens).reshape(12, 5)
  lengths = np.where((seqs == EOS).any(1), np.argmax(seqs == EOS, axis=1) + 1, 5)
  assert np.all(seqs[np.arange(5)[None, :] >= lengths[:, None]] == PAD)
  lp = sequence_log_probs(model, np.repeat(images(6), 3, axis=0), seqs, lengths)
  expected = np.asarray(lp) / ((5.0 + lengths) / 6.0) ** 0.8
  np.testing.assert_allclose(np.asarray(out.beam_scores).reshape(12), expected, rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.diff(np.asarray(out.beam_scores), axis=1) <= 0)  # best first
  np.testing.assert_array_equal(out.tokens, out.beam_tokens[:, 0])


def masked_ce(logits, targets, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return (ce * mask).sum() / mask.sum()


def caption_batch():
  """Two images per class (colour = class, plus noise); inputs, targets and mask padded to L."""
  cls = np.repeat(np.arange(4), 2)
  imgs = np.random.default_rng(0).normal(scale=0.1, size=(8, 8, 8, 3)).astype(np.float32)
  imgs[..., 0] += cls[:, None, None]
  seqs = [CAPTIONS[c] + [EOS] for c in cls]
  targets = np.array([s + [PAD] * (L - len(s)) for s in seqs])
  inputs = np.concatenate([np.full((8, 1), BOS), targets[:, :-1]], axis=1)
  inputs[inputs == EOS] = PAD
  mask = np.array([[t < len(s) for t in range(L)] for s in seqs])
  return imgs, inputs, targets, mask, seqs


def test_training_reduces_loss_and_learns_captions(kind):
  model = make(kind)
  imgs, inputs, targets, mask, seqs = caption_batch()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(2e-2)

  @jax.jit
  def train_step(params, opt_state):
    def loss_fn(params):
      logits, _ = nnx.merge(graphdef, params, rest)(imgs, inputs, mask)
      return masked_ce(logits, targets, mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(150):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.05 * losses[0], losses[::10]
  nnx.update(model, params)
  out = model.generate(imgs[::2], method="greedy", max_len=6, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  expected = [s + [PAD] * (6 - len(s)) for s in seqs[::2]]
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.lengths, [len(s) for s in seqs[::2]])


def test_decoding_on_a_mesh_matches_one_device():
  """Params placed by their logical names on 4x2 devices, images split over data: same captions."""
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  graphdef, state = nnx.split(make("transformer"))
  state = jax.device_put(state, sharding.param_shardings(state, mesh, sharding.DEFAULT_RULES))
  sharded = nnx.merge(graphdef, state)
  assert sharded.layers[0].mlp.fc1.kernel[...].sharding.spec == P(None, "tensor")
  imgs = jax.device_put(images(3), jax.NamedSharding(mesh, P("data")))
  kw = dict(method="beam", beam_size=1, max_len=6, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES, mesh):
    got = sharded.generate(imgs, **kw)
  assert got.tokens.sharding.spec == P("data")
  ref = make("transformer").generate(images(3), **kw)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5)


def test_encoder_by_name_and_input_errors():
  model = TransformerCaptioner(V, encoders={"image": {"name": "test_captioner_tiny", "features": ENC_D}},
                               image_shape=(8, 8, 3), features=16, depth=2, num_heads=2,
                               max_len=8, rngs=nnx.Rngs(0))
  assert isinstance(model.encoders["image"], TinyEncoder)
  assert model.layers[0].cross_attn.key.kernel.shape[0] == ENC_D  # the encoder's width, read off it
  # An encoder that takes no param_dtype is built in float32, and refused for another one.
  with pytest.raises(ValueError, match="encoder 'test_captioner_tiny' takes no param_dtype"):
    TransformerCaptioner(V, encoders={"image": {"name": "test_captioner_tiny", "features": ENC_D}},
                         image_shape=(8, 8, 3), features=16, depth=2, num_heads=2, max_len=8,
                         param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"encoders: expected one encoder spec per modality \['image'\]"):
    make("lstm", encoders={"text": {"name": "test_captioner_tiny", "features": 4}})
  with pytest.raises(TypeError, match="encoder"):
    make("lstm", encoder=lambda x: x)
  with pytest.raises(ValueError, match="image_shape"):
    make("lstm", image_shape=(8, 8))
  with pytest.raises(ValueError, match="tokens"):
    model(images(0), np.zeros((4,), np.int32))
  with pytest.raises(TypeError, match="tokens"):
    model(images(0), np.zeros((4, 3), np.float32))
  with pytest.raises(ValueError, match="mask"):
    model(images(0), np.zeros((4, 3), np.int32), np.ones((4, 2), bool))
  with pytest.raises(ValueError, match="max_len"):
    model.init_decode(images(0), beams=1, max_len=9)
  with pytest.raises(ValueError, match="init_decode"):
    make("lstm").decode_step(np.zeros((4, 1), np.int32))
