"""Multi-head attention: self and cross, padding and causal masks, and a KV cache for decoding."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax import sharding
from mmjax.layers.common import Dtype, dense

log = logging.getLogger(__name__)


def make_attention_mask(q_mask: jax.Array | None, kv_mask: jax.Array | None, causal: bool = False,
                        q_len: int | None = None, kv_len: int | None = None) -> jax.Array | None:
  """Boolean (B, 1, Lq, Lk) mask from per-token masks (B, L) and/or causality; None = attend all."""
  mask = None
  if q_mask is not None or kv_mask is not None:
    qm = q_mask if q_mask is not None else jnp.ones(kv_mask.shape[:1] + (q_len,), bool)
    km = kv_mask if kv_mask is not None else jnp.ones(q_mask.shape[:1] + (kv_len,), bool)
    mask = qm.astype(bool)[:, None, :, None] & km.astype(bool)[:, None, None, :]
  if causal:
    lq = q_len if q_len is not None else q_mask.shape[1]
    lk = kv_len if kv_len is not None else lq
    c = jnp.tril(jnp.ones((lq, lk), bool))[None, None]
    mask = c if mask is None else mask & c
  return mask


# cuDNN's fused attention took query / key lengths 208 and 256 but not 197 (H200, jax 0.11.2).
CUDNN_SEQ_MULTIPLE = 64


def _default_platform() -> str:
  """The platform computations go to by default: `jax.default_device`'s if one is set (a
  lowering for the CPU inside `jax.default_device(cpu)` on a GPU host must not pick cuDNN),
  else the default backend."""
  device = jax.config.jax_default_device
  if device is None:
    return jax.default_backend()
  return device if isinstance(device, str) else device.platform


# What `MultiHeadAttention(attention=...)` takes: the kernel that computes softmax(q k^T) v.
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "reference")
_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's fused attention takes no float32
_logged: set[tuple[str, str]] = set()


def check_attention(attention: str) -> str:
  """Returns `attention`, or raises a ValueError listing `ATTENTION_KERNELS`."""
  if attention not in ATTENTION_KERNELS:
    raise ValueError(f"attention: expected one of {ATTENTION_KERNELS}, got {attention!r}")
  return attention


def cudnn_unavailable(dtype) -> str | None:
  """Why cuDNN's fused attention cannot run here for `dtype`, or None when it can be tried."""
  platform = _default_platform()
  if platform != "gpu":
    return f"cuDNN's fused attention needs a GPU; the default platform is {platform!r}"
  if jnp.dtype(dtype) not in _FUSED_DTYPES:
    return f"cuDNN's fused attention takes bfloat16 or float16, got {jnp.dtype(dtype).name}"
  return None


def _log_choice(kernel: str, why: str) -> None:
  if (kernel, why) not in _logged:
    _logged.add((kernel, why))
    log.info("attention='auto' picked %r (%s)", kernel, why)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None,
                     mask: jax.Array | None, scale: float, implementation: str,
                     multiple: int = CUDNN_SEQ_MULTIPLE) -> jax.Array:
  """`jax.nn.dot_product_attention` with the query and key lengths padded up to `multiple`.

  cuDNN's kernel rejects lengths such as ViT's 197 tokens ("Unsupported sequence length", jax
  0.11.2 on an H200) and takes 208 or 256; the padded keys are left out through
  `key_value_seq_lengths` and the padded query rows are dropped, so the result equals the
  unpadded attention. Without a bias or mask only (with them the call is made unpadded).
  """
  lq, lk = q.shape[1], k.shape[1]
  pq, pk = -lq % multiple, -lk % multiple
  if (pq == 0 and pk == 0) or bias is not None or mask is not None:
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        implementation=implementation)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
  lengths = jnp.full((q.shape[0],), lk, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q, pq), pad(k, pk), pad(v, pk), scale=scale,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :lq]


class MultiHeadAttention(nnx.Module):
  """Multi-head dot-product attention with HF-compatible separate query/key/value/out projections.

  `attention` picks the kernel for softmax(scale * q k^T + bias) v:
    "xla": `jax.nn.dot_product_attention(implementation="xla")`, on every platform;
    "cudnn": cuDNN's fused kernel (a GPU and bfloat16/float16 only; anything else raises a
      ValueError naming `attention=`, never a silent fallback);
    "reference": explicit einsum and softmax, the only kernel that computes the weights;
    "auto": cuDNN on a GPU in bfloat16/float16 where it takes the shapes, else XLA, and the
      reference kernel while dropout on the weights runs. Logs once (INFO) what it picked.
  Whatever the kernel, a call that returns or records the weights (`return_weights`,
  `record_weights`) runs the reference kernel: the fused ones do not produce them. Every kernel
  takes float32 logits and softmax; XLA's and the reference kernel agree to float32 rounding.

  Attributes:
    num_heads: number of heads; `qkv_features` must divide by it.
    query, key, value: projections (D_in -> H*Dh), kernels named ('embed', 'heads').
    out: projection (H*Dh -> D_out), kernel named ('heads', 'embed').
    scale: logits = scale * q.k, with scale = qk_scale / sqrt(Dh) (qk_scale 1: the usual).
    attention: the kernel name (above).
    record_weights: when True, each call also sows its weights (B, H, Lq, Lk) as
      `nnx.Intermediate` "attention_weights", which `nnx.capture(model, nnx.Intermediate)`
      collects; `record_attention(model)` switches it on for a whole model.
  """

  def __init__(self, num_heads: int, in_features: int, *, kv_features: int | None = None,
               qkv_features: int | None = None, out_features: int | None = None,
               use_bias: bool = True, dropout: float = 0.0, qk_scale: float = 1.0,
               attention: str = "auto", record_weights: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    qkv_features = qkv_features or in_features
    if qkv_features % num_heads:
      raise ValueError(f"qkv_features={qkv_features} is not divisible by num_heads={num_heads}")
    kv_features = kv_features or in_features
    self.num_heads, self.head_dim = num_heads, qkv_features // num_heads
    if not qk_scale > 0:
      raise ValueError(f"qk_scale: expected a positive float, got {qk_scale!r}")
    self.attention = check_attention(attention)
    if attention in ("xla", "cudnn") and dropout > 0:
      raise ValueError(f"attention={attention!r}: the fused kernels have no dropout on the weights, "
                       f"got dropout={dropout} (use attention='auto' or 'reference', or no "
                       "attention dropout)")
    self.record_weights = record_weights
    self.scale = float(qk_scale) * self.head_dim ** -0.5  # logits = scale * q.k
    self.dtype = dtype
    kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
    self.query = dense(in_features, qkv_features, ("embed", "heads"), **kw)
    self.key = dense(kv_features, qkv_features, ("embed", "heads"), **kw)
    self.value = dense(kv_features, qkv_features, ("embed", "heads"), **kw)
    self.out = dense(qkv_features, out_features or in_features, ("heads", "embed"), **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.cache_key: nnx.Cache | None = nnx.data(None)
    self.cache_value: nnx.Cache | None = nnx.data(None)
    self.cache_index: nnx.Cache | None = nnx.data(None)

  def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> None:
    """Allocates an empty KV cache of `max_len` positions for autoregressive decoding."""
    shape = (batch, max_len, self.num_heads, self.head_dim)
    self.cache_key = nnx.Cache(jnp.zeros(shape, dtype or self.dtype))
    self.cache_value = nnx.Cache(jnp.zeros(shape, dtype or self.dtype))
    self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))  # (B, L, H, Dh)

  def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None,
               *, bias: jax.Array | None = None, decode: bool = False, deterministic: bool = True,
               return_weights: bool = False, context_repeats: int = 1):
    """Attends from `x` (B, Lq, D) to `context` (B, Lk, Dk), or to `x` itself when None.

    With `context_repeats=r`, `context` is (B / r, Lk, Dk), each row shared by r consecutive
    queries' rows (one image, several questions): keys and values are projected once per row
    and the r query rows attend to them as one group; same result as repeating the context.

    `mask` is boolean, broadcastable to (B, H, Lq, Lk); True means attend. `bias`, broadcastable
    to (B, H, Lq, Lk), is added to the logits. With `decode=True` (self-attention only) `x` holds
    the next token(s), keys/values are appended to the cache and a causal mask over the filled
    cache is applied. Returns (B, Lq, D_out), and the attention weights (B, H, Lq, Lk) too when
    `return_weights` (computed by the reference kernel).
    """
    kv_in = x if context is None else context
    q = self._heads(self.query(x))
    k = self._heads(self.key(kv_in))
    v = self._heads(self.value(kv_in))
    q = sharding.constrain(q, ("batch", "length", "heads", None))
    if decode:
      if context is not None:
        raise ValueError("decode=True is for self-attention; cross-attention keys need no cache")
      if self.cache_key is None:
        raise ValueError("decode=True needs init_cache(batch, max_len) first")
      idx = self.cache_index[...]
      step = q.shape[1]
      k = jax.lax.dynamic_update_slice(self.cache_key[...], k.astype(self.cache_key.dtype), (0, idx, 0, 0))
      v = jax.lax.dynamic_update_slice(self.cache_value[...], v.astype(self.cache_value.dtype), (0, idx, 0, 0))
      self.cache_key[...], self.cache_value[...] = k, v
      self.cache_index[...] = idx + step
      max_len = k.shape[1]
      q_pos = idx + jnp.arange(step)
      dmask = (jnp.arange(max_len)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, step, max_len)
      mask = dmask if mask is None else mask & dmask
    r = int(context_repeats)
    if r != 1:
      if context is None or decode or r < 1 or q.shape[0] != r * k.shape[0]:
        raise ValueError(f"context_repeats={r}: expected cross-attention whose context has "
                         f"B / {r} rows for the query's B = {q.shape[0]}, got {k.shape[0]} rows")
      B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
      q = q.reshape(B // r, r * Lq, *q.shape[2:])  # the r query rows of one context row, as one

      def group(a):  # (B, H|1, Lq|1, Lk) -> (B / r, H|1, r * Lq, Lk), as the query rows
        a = jnp.asarray(a)
        a = a.reshape((1,) * (4 - a.ndim) + a.shape)
        a = jnp.broadcast_to(a, (B, a.shape[1], Lq, Lk))
        return a.reshape(B // r, r, -1, Lq, Lk).swapaxes(1, 2).reshape(B // r, -1, r * Lq, Lk)

      mask = None if mask is None else group(mask)
      bias = None if bias is None else group(bias)
    weights = return_weights or self.record_weights
    kernel = self._kernel(q.dtype, weights, not deterministic and self.dropout.rate > 0)
    with jax.named_scope(f"attention_{kernel}"):  # the kernel that ran, in the HLO's op names
      if kernel == "reference":
        out, w = self._reference(q, k, v, mask, bias, deterministic)
      elif kernel == "cudnn":
        out, w = padded_attention(q, k, v, bias=bias, mask=mask, scale=self.scale,
                                  implementation="cudnn"), None
      elif kernel == "auto_cudnn":  # cuDNN where it takes the shapes (it raises while tracing)
        try:
          out = padded_attention(q, k, v, bias=bias, mask=mask, scale=self.scale, implementation="cudnn")
          _log_choice("cudnn", f"{q.dtype.name} on a GPU")
        except (ValueError, NotImplementedError, TypeError, RuntimeError) as e:
          _log_choice("xla", f"cuDNN rejected the call: {e}")
          out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=self.scale,
                                             implementation="xla")
        w = None
      else:
        out, w = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=self.scale,
                                              implementation="xla"), None
    if r != 1:
      out = out.reshape(B, Lq, *out.shape[2:])
      if w is not None:  # (B / r, H, r * Lq, Lk) -> (B, H, Lq, Lk)
        w = w.reshape(B // r, w.shape[1], r, Lq, Lk).swapaxes(1, 2).reshape(B, -1, Lq, Lk)
    if self.record_weights:
      self.sow(nnx.Intermediate, "attention_weights", w)
    out = self.out(out.reshape(out.shape[:2] + (-1,)))
    return (out, w) if return_weights else out

  def _kernel(self, dtype, weights: bool, dropout: bool) -> str:
    """The kernel of this call: "reference", "xla", "cudnn" or "auto_cudnn" (cuDNN, else XLA)."""
    if self.attention == "reference" or weights:
      if self.attention == "auto":
        _log_choice("reference", "the attention weights are asked for")
      return "reference"
    if dropout:  # only "auto" gets here: the fused kernels refuse dropout at construction
      _log_choice("reference", "dropout on the attention weights")
      return "reference"
    if self.attention == "cudnn":
      why = cudnn_unavailable(dtype)
      if why is not None:
        raise ValueError(f"attention='cudnn': {why} (use attention='auto' or 'xla')")
      return "cudnn"
    if self.attention == "auto":
      if cudnn_unavailable(dtype) is None:
        return "auto_cudnn"
      _log_choice("xla", f"{jnp.dtype(dtype).name} on {_default_platform()}")
    return "xla"

  def _reference(self, q, k, v, mask, bias, deterministic):
    scale = jnp.asarray(self.scale, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    wd = self.dropout(w, deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", wd, v), w


@contextlib.contextmanager
def record_attention(module: nnx.Module) -> Iterator[nnx.Module]:
  """Within the block, every `MultiHeadAttention` in `module` records its weights.

  Each call then sows (B, H, Lq, Lk) as `nnx.Intermediate` "attention_weights" (computed by the
  reference kernel), collected by `nnx.capture` and keyed by the modules' paths:

    with record_attention(model):
      out, recorded = nnx.capture(model, nnx.Intermediate)(x)

  Restores the flags on exit. Inside a traced function the module must belong to the trace
  (passed through `nnx.jit`, or `nnx.merge`d inside it), as for any change of a module.
  """
  layers = [m for _, m in nnx.iter_graph(module) if isinstance(m, MultiHeadAttention)]
  before = [m.record_weights for m in layers]
  for m in layers:
    m.record_weights = True
  try:
    yield module
  finally:
    for m, flag in zip(layers, before):
      m.record_weights = flag
