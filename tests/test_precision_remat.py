"""Remat policies and bf16 mixed precision of the Transformer encoders (`mmjax.layers.Encoder`).

Remat ("none", "dots", "full"): the compiled loss-and-gradient step's temporary memory orders
full < dots < none, while outputs and gradients are the same under all three. Mixed precision
(bf16 compute, float32 parameters): the bf16 train step has no float32 op on the MLP's
(B, L, mlp) activations, LayerNorm statistics are float32, and a tiny ViT's bf16 loss curve stays
within 2% of its float32 curve.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmjax.encoders.text import BertEncoder
from mmjax.encoders.vision import SmallCNN, ViT
from mmjax.layers import REMAT_POLICIES, layer_norm
from mmjax.models.base import build_encoder

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# XLA:CPU's default (concurrency-optimised) scheduler runs each block's recomputation in the
# forward pass, so every policy holds the same temporaries there (measured: 1.0 / 0.99 / 0.99);
# its memory-minimising scheduler keeps the recomputation in the backward pass, where remat puts
# it. The flag is read when the backend starts (`compile(compiler_options=...)` does not reach
# it), hence a process of its own.
MEMORY_SCRIPT = """
import json
import jax, jax.numpy as jnp, optax
from flax import nnx
from mmjax.encoders.vision import ViT

def temp_bytes(remat):
  model = nnx.eval_shape(lambda: ViT(None, width=64, depth=3, heads=4, mlp_dim=256, patch=16,
                                     image_size=64, num_classes=10, remat=remat, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  def loss(params, rest, images, labels):  # merged without copy=True, as bench/throughput.py does
    logits = nnx.merge(graphdef, params, rest).classify(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((8,), jnp.int32)
  step = jax.jit(jax.value_and_grad(loss)).lower(params, rest, images, labels).compile()
  return step.memory_analysis().temp_size_in_bytes

print(json.dumps({remat: temp_bytes(remat) for remat in ("none", "dots", "full")}))
"""


def test_remat_policies_order_the_train_steps_temporary_memory():
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
         + " --xla_cpu_enable_concurrency_optimized_scheduler=false"}
  run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  temp = json.loads(run.stdout.strip().splitlines()[-1])
  # Measured 2,581,536 / 2,409,632 / 1,987,936 bytes (1.0 / 0.93 / 0.77); ViT-B/16 at batch 8
  # in float32 (224 px): 1.0 / 0.69 / 0.58.
  assert temp["full"] < temp["dots"] < temp["none"], temp
  assert temp["full"] < 0.9 * temp["none"], temp


def _vit(remat, **kw):
  return ViT(None, width=32, depth=2, heads=2, mlp_dim=64, patch=4, image_size=8,
             dropout=0.1, attn_dropout=0.1, remat=remat, rngs=nnx.Rngs(0), **kw)


def _bert(remat):
  return BertEncoder("tiny", depth=2, pooler=False, remat=remat, rngs=nnx.Rngs(0))


def _small_cnn(remat):
  return SmallCNN(16, channels=(8, 8), depth=2, num_heads=2, norm="layer",
                  remat=remat, rngs=nnx.Rngs(0))


IDS = np.array([[2, 5, 9, 11, 0, 0], [3, 4, 4, 7, 8, 1]], np.int32)  # row 0 right-padded
ENCODERS = {  # name -> (constructor, example input); dropout active in ViT and BERT
    "vit": (_vit, np.linspace(-1, 1, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)),
    "bert": (_bert, IDS),
    "small_cnn": (_small_cnn, np.linspace(0, 1, 2 * 12 * 12 * 3, dtype=np.float32)
                  .reshape(2, 12, 12, 3)),  # no dropout: equal outputs without shared masks
}


def _loss_and_grads(model, x, deterministic=False):
  """Loss (tokens dotted with fixed weights), tokens and parameter gradients, as the trainer
  runs them (a sum of squares would be constant after the final LayerNorm)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    m = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(m, dropout=jax.random.key(7))
    tokens = m(jnp.asarray(x), deterministic=deterministic).tokens
    weights = jnp.cos(jnp.arange(tokens.size, dtype=jnp.float32)).reshape(tokens.shape)
    return jnp.sum(tokens * weights), tokens

  (loss, tokens), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, tokens, grads


def _assert_equal_to_rounding(actual, desired, what):
  """Equal up to float32 rounding of sums taken in another order (remat changes XLA's fusions):
  within 2e-6 of the array's largest entry (measured <= 8e-7), plus 1e-6 for the key biases,
  whose exact gradient is 0 (softmax ignores them) and computed one rounding alone (<= 4e-7)."""
  bound = 2e-6 * np.abs(np.asarray(desired)).max() + 1e-6
  np.testing.assert_allclose(actual, desired, rtol=0, atol=bound, err_msg=what)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_remat_policies_give_the_same_outputs_and_gradients(name):
  make, x = ENCODERS[name]
  loss, tokens, grads = _loss_and_grads(make("none"), x)
  if name != "small_cnn":  # dropout is on: the recomputation must draw the same masks
    assert abs(float(_loss_and_grads(make("none"), x, deterministic=True)[0]) - float(loss)) > 1e-3
  for remat in ("dots", "full"):
    loss_r, tokens_r, grads_r = _loss_and_grads(make(remat), x)
    _assert_equal_to_rounding(loss_r, loss, f"{remat} loss")
    _assert_equal_to_rounding(tokens_r, tokens, f"{remat} tokens")
    for (path, g_r), g in zip(jax.tree_util.tree_leaves_with_path(grads_r), jax.tree.leaves(grads)):
      _assert_equal_to_rounding(g_r, g, f"{remat} gradient {jax.tree_util.keystr(path)}")


def test_remat_is_a_constructor_argument_reachable_from_an_encoder_spec():
  specs = {
      "vit": dict(variant="mu/16", image_size=32),
      "bert": dict(variant="tiny"),
      "clip_text": dict(vocab_size=100, hidden=32, depth=1, heads=2, mlp_dim=64, max_len=8,
                        eos_id=99),
      "ast": dict(width=32, depth=1, num_heads=2, n_mels=16, max_frames=32),
      "small_cnn": dict(features=16, depth=1, num_heads=2),
  }
  for name, spec in specs.items():
    for remat in REMAT_POLICIES:
      encoder = nnx.eval_shape(lambda: build_encoder({"name": name, "remat": remat, **spec},
                                                     rngs=nnx.Rngs(0)))
      assert encoder.encoder.remat == remat, name
    bad = r"remat: expected one of \['dots', 'full', 'none'\], got 'dot'"
    with pytest.raises(ValueError, match=bad):
      build_encoder({"name": name, "remat": "dot", **spec}, rngs=nnx.Rngs(0))


B, IMAGE, MLP = 3, 12, 40  # 3x3 patches of 4 px + the class token: L = 10; width 16
INSTRUCTION = re.compile(r"\s+(?:ROOT )?\S+ = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(")
# Dropout's keep mask: jax.random.bernoulli compares a float32 uniform, made from random bits,
# with the keep rate (nnx.Dropout; torch's dropout draws float32 too); the activations stay bf16.
RNG_COMPUTATIONS = ("_uniform", "_bernoulli")


def _ops_of_shape(hlo, shape):
  """(dtype, op, computation) of every instruction of array shape `shape` in HLO text."""
  ops, computation = [], None
  for line in hlo.splitlines():
    if line.rstrip().endswith("{") and not line[:1].isspace():  # "[ENTRY ]name {"
      computation = line.split()[-2]
    elif m := INSTRUCTION.match(line):
      if tuple(int(d) for d in m.group(2).split(",") if d) == shape:
        ops.append((m.group(1), m.group(3), computation))
  return ops


def _train_step_hlo(act):
  """The HLO XLA receives for a bf16 ViT loss-and-gradient step with dropout on."""
  model = ViT(None, width=16, depth=2, heads=2, mlp_dim=MLP, patch=4, image_size=IMAGE,
              num_classes=5, act=act, dropout=0.1, attn_dropout=0.1, dtype=jnp.bfloat16,
              param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, images, labels):
    m = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(m, dropout=jax.random.key(1))
    logits = m.classify(images, deterministic=False)
    assert logits.dtype == jnp.bfloat16
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  step = jax.value_and_grad(loss_fn)
  images, labels = jnp.zeros((B, IMAGE, IMAGE, 3)), jnp.zeros((B,), jnp.int32)
  _, grads = jax.eval_shape(step, params, images, labels)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}  # master weights
  # Not the compiled CPU HLO: XLA:CPU turns every bf16 elementwise op into float32 (it has no bf16
  # arithmetic). This is what every backend starts from, after XLA's CHLO decompositions (where
  # erfc became ~90 float32 ops on the GPU's slowest fusions, bf16[256,197,3072]).
  return jax.jit(step).lower(params, images, labels).compiler_ir("hlo").as_hlo_text()


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])  # BERT/ViT, big_vision, CLIP
def test_bf16_train_step_keeps_the_mlp_activations_in_bf16(act):
  ops = _ops_of_shape(_train_step_hlo(act), (B, 10, MLP))
  assert sum(dtype == "bf16" for dtype, _, _ in ops) > 20  # the parser reads the HLO
  assert any(c.startswith(RNG_COMPUTATIONS) for _, _, c in ops)  # the mask is drawn here
  f32 = sorted({(op, c) for dtype, op, c in ops
                if dtype == "f32" and not c.startswith(RNG_COMPUTATIONS)})
  assert f32 == [], f"float32 (op, computation) on the (B, L, mlp) activations: {f32}"


def test_layer_norm_in_bf16_takes_float32_statistics():
  # bf16 steps of 0.5 near 100: a mean or a centring in bf16 is off by ~0.1 of a std or more.
  x = (100 + 2 * jax.random.normal(jax.random.key(0), (4, 64))).astype(jnp.bfloat16)
  ln16 = layer_norm(64, eps=1e-6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ln32 = layer_norm(64, eps=1e-6, rngs=nnx.Rngs(0))
  y16, y32 = ln16(x), ln32(x.astype(jnp.float32))
  assert y16.dtype == jnp.bfloat16 and ln16.scale[...].dtype == jnp.float32
  # One bf16 rounding of the float32 result: bf16's unit roundoff 2**-8 (measured 0.97 of it; a
  # centring x - mean in bf16 is 256 times off, bf16 statistics up to 1.04 absolute).
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=2 ** -8, atol=1e-6)


def _loss_curve(dtype, images, labels, steps):
  """Per-step training losses of a tiny ViT (Adam) on the given batches, f32 master weights."""
  model = ViT(None, width=32, depth=2, heads=2, mlp_dim=128, patch=4, image_size=16,
              num_classes=3, pool="gap", dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-3)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params, rest, copy=True).classify(x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), (images, labels), length=steps)[1])
  return np.asarray(run(params))


def test_bf16_loss_curve_stays_within_2_percent_of_float32():
  steps = 200
  kx, ky = jax.random.split(jax.random.key(0))
  labels = jax.random.randint(ky, (steps, 16), 0, 3)
  # Noise images, the label's colour channel raised by 0.1 std: learnt, not memorised, in 200 steps.
  images = (jax.random.normal(kx, (steps, 16, 16, 16, 3))
            + 0.1 * jax.nn.one_hot(labels, 3)[:, :, None, None])
  f32 = _loss_curve(jnp.float32, images, labels, steps)
  bf16 = _loss_curve(jnp.bfloat16, images, labels, steps)
  assert f32[-20:].mean() < 0.6 * f32[:20].mean()  # it learns (measured 1.01 -> 0.54)
  deviation = np.abs(bf16 - f32) / f32
  # Measured: max 1.27% (step 128), mean 0.26%.
  assert deviation.max() < 0.02, (deviation.max(), int(deviation.argmax()))
