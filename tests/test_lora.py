"""LoRA: starts equal to the base, merge equals unmerged, only adapters train."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmjax.layers import Encoder
from mmjax.train import optim
from mmjax.transfer.lora import LoRADense, apply_lora, merge_lora


def _model():
  return Encoder(2, 16, 4, 32, rngs=nnx.Rngs(0))


def test_apply_and_merge():
  model, ref = _model(), _model()
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  paths = apply_lora(model, r"attn/(query|value)$", rank=4, alpha=8, rngs=nnx.Rngs(1))
  assert paths == ["layers/0/attn/query", "layers/0/attn/value", "layers/1/attn/query", "layers/1/attn/value"]
  assert isinstance(model.layers[0].attn.query, LoRADense)
  np.testing.assert_allclose(model(x), ref(x), atol=1e-6)  # b = 0 at init
  # Perturb the adapters, then merge: outputs equal the unmerged model.
  for p, v in nnx.iter_graph(model):
    if isinstance(v, nnx.LoRAParam):
      v[...] = jax.random.normal(jax.random.key(len(p)), v[...].shape) * 0.1
  y = model(x)
  assert not np.allclose(y, ref(x), atol=1e-3)
  merged = merge_lora(model)
  assert len(merged) == 4 and not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))
  np.testing.assert_allclose(model(x), y, atol=1e-5)
  with pytest.raises(ValueError, match="matches no Dense"):
    apply_lora(_model(), "nothing_here", rank=2, rngs=nnx.Rngs(0))


def test_only_adapters_change_in_training():
  model = _model()
  apply_lora(model, r"attn/(query|value)$", rank=2, rngs=nnx.Rngs(1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  groups = [{"name": "lora", "pattern": r".*/lora_[ab]"}, {"name": "frozen", "pattern": ".*", "freeze": True}]
  tx = optim.make_optimizer({"lr": 1e-2, "groups": groups}, params, 10)
  opt = tx.init(params)
  x = jax.random.normal(jax.random.key(2), (4, 5, 16))
  target = jax.random.normal(jax.random.key(3), (4, 5, 16))  # LayerNorm-ed outputs can fit it

  @jax.jit
  def step(params, opt):
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p, rest)(x) - target) ** 2)
    l, g = jax.value_and_grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, l

  p0 = jax.device_get(params)
  losses = []
  for _ in range(5):
    params, opt, l = step(params, opt)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  changed = jax.tree_util.tree_map_with_path(
      lambda path, a, b: (optim.path_str(path), not np.array_equal(a, b)), p0, jax.device_get(params))
  for name, did in jax.tree.leaves(changed, is_leaf=lambda t: isinstance(t, tuple)):
    assert did == ("lora_" in name), name
