"""Autoregressive decoding compiled once: greedy and beam search with a fixed maximum length.

The searches are pure functions over a step function

    step_fn(cache, tokens (N, 1) int32) -> (logits (N, V), cache)

where `cache` is any pytree of per-hypothesis state (a KV cache, an LSTM carry) whose rank >= 1
leaves have a leading axis of N = batch * beams (batch-major: row b * K + k is beam k of example
b) and whose scalar leaves (position counters) are shared. Beam search reorders the cache by
gathering rows of the chosen parent beams. Both run in a `jax.lax.while_loop` of at most
`max_len` steps that stops early once every hypothesis has emitted EOS, so one compilation serves
every batch of the same shape.

`decode` bridges NNX models: it is a pure function of (graphdef, state, inputs) for models that
implement the `Decodable` protocol, and `decode_jit` / `generate` compile it once per model
structure, input shape and static setting.

Length normalisation follows GNMT (Wu et al. 2016) and t5x: a hypothesis of `n` generated tokens
(EOS included) with summed log-probability `lp` scores `lp / ((5 + n) / 6) ** alpha`; alpha = 0
ranks by raw log-probability.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

Cache = Any
StepFn = Callable[[Cache, jax.Array], tuple[jax.Array, Cache]]

METHODS = ("greedy", "beam")


class DecodeResult(NamedTuple):
  """What a search returns.

  Attributes:
    tokens: (B, max_len) int32 best sequence per example, without BOS; EOS is kept and every
      position after it holds `pad_id`.
    scores: (B,) its length-normalised score (equal to `log_probs` when alpha = 0).
    log_probs: (B,) the sum of its tokens' log-probabilities, EOS included.
    lengths: (B,) int32 generated tokens, EOS included (`max_len` when EOS never came).
    beam_tokens: (B, K, max_len) every final beam, best first; None unless `return_all`.
    beam_scores: (B, K) their scores; None unless `return_all`.
  """

  tokens: jax.Array
  scores: jax.Array
  log_probs: jax.Array
  lengths: jax.Array
  beam_tokens: jax.Array | None = None
  beam_scores: jax.Array | None = None


class Decodable(Protocol):
  """An NNX model that `decode` can drive.

  `init_decode` encodes the inputs once, repeats what each hypothesis needs `beams` times along
  the batch (`tile_beams`) and stores it: per-hypothesis state in `nnx.Cache` variables (reordered
  between beam steps), per-example constants in `DecodeContext` variables (never reordered).
  `decode_step` feeds one token per hypothesis and returns the next-token logits.
  """

  def init_decode(self, inputs: Any, beams: int, max_len: int) -> None:
    ...

  def decode_step(self, tokens: jax.Array) -> jax.Array:
    ...


class DecodeContext(nnx.Variable):
  """A per-example decoding input fixed for a whole decode (e.g. image tokens), tiled per beam."""


def length_normalizer(lengths: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """GNMT length penalty ((5 + n) / 6) ** alpha; 1 when alpha = 0."""
  return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def tile_beams(x: jax.Array, beams: int) -> jax.Array:
  """(B, ...) -> (B * beams, ...), each example's row repeated for its beams (batch-major)."""
  return jnp.repeat(x, beams, axis=0)


def gather_beams(cache: Cache, rows: jax.Array) -> Cache:
  """Selects rows `rows` (N,) of every rank >= 1 leaf of `cache`; scalar leaves are shared."""
  n = rows.shape[0]

  def take(x):
    if x.ndim == 0:
      return x
    if x.shape[0] != n:
      raise ValueError(f"cache leaf of shape {x.shape}: expected a leading batch * beams axis of {n}")
    return jnp.take(x, rows, axis=0)

  return jax.tree.map(take, cache)


def _check_max_len(max_len: int) -> None:
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"max_len: expected a positive int, got {max_len!r}")


def _check_logits(logits: jax.Array, rows: int) -> None:
  if logits.ndim != 2 or logits.shape[0] != rows:
    raise ValueError(f"step_fn logits: expected shape ({rows}, V), got {logits.shape}")


def greedy_search(step_fn: StepFn, cache: Cache, *, batch_size: int, max_len: int, bos_id: int,
                  eos_id: int, pad_id: int, length_penalty: float | jax.Array = 0.0) -> DecodeResult:
  """Picks the most probable next token at every step; an example stops at its first EOS.

  Args:
    step_fn: `(cache, tokens (B, 1)) -> (logits (B, V), cache)`, a pure function.
    cache: the decoding state after the inputs were encoded, leading axis `batch_size`.
    batch_size: B.
    max_len: number of tokens generated at most (the loop bound, fixed at trace time).
    bos_id, eos_id, pad_id: first input, stop token, filler after EOS.
    length_penalty: alpha of `length_normalizer`; only changes the reported `scores`.
  """
  _check_max_len(max_len)
  B = batch_size

  def cond(s):
    t, _, _, _, _, _, done = s
    return (t < max_len) & ~jnp.all(done)

  def body(s):
    t, last, cache, tokens, logp, lengths, done = s
    logits, cache = step_fn(cache, last[:, None])
    _check_logits(logits, B)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, V)
    tok = jnp.where(done, pad_id, jnp.argmax(lp, axis=-1).astype(jnp.int32))
    tok_lp = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
    logp = logp + jnp.where(done, 0.0, tok_lp)
    lengths = jnp.where(done, lengths, t + 1)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, t))
    return t + 1, tok, cache, tokens, logp, lengths, done | (tok == eos_id)

  init = (jnp.array(0, jnp.int32), jnp.full((B,), bos_id, jnp.int32), cache,
          jnp.full((B, max_len), pad_id, jnp.int32), jnp.zeros((B,), jnp.float32),
          jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))
  _, _, _, tokens, logp, lengths, _ = jax.lax.while_loop(cond, body, init)
  return DecodeResult(tokens, logp / length_normalizer(lengths, length_penalty), logp, lengths)


def beam_search(step_fn: StepFn, cache: Cache, *, batch_size: int, beam_size: int, max_len: int,
                bos_id: int, eos_id: int, pad_id: int, length_penalty: float | jax.Array = 0.0,
                return_all: bool = False) -> DecodeResult:
  """Beam search keeping the `beam_size` best hypotheses, finished or not, per example.

  Every step extends each unfinished beam by every token and keeps the top `beam_size`
  candidates by length-normalised score (an unfinished hypothesis is normalised by its current
  length). A beam that emitted EOS is kept aside: it is not extended, its score is frozen, it is
  padded with `pad_id`, and it competes with the extensions of the others for its slot. Beams
  still unfinished after `max_len` tokens finish there. With `beam_size=1` this is exactly greedy
  search, for any length penalty.

  Args:
    step_fn: `(cache, tokens (B*K, 1)) -> (logits (B*K, V), cache)`, a pure function.
    cache: decoding state with leading axis B*K (batch-major, see `tile_beams`).
    batch_size: B.
    beam_size: K.
    max_len, bos_id, eos_id, pad_id: as in `greedy_search`.
    length_penalty: alpha of `length_normalizer`.
    return_all: also return every final beam and its score (a slot that never held a
      hypothesis, possible only when K exceeds the candidates, scores -inf).
  """
  _check_max_len(max_len)
  B, K = batch_size, beam_size
  if not isinstance(K, int) or K < 1:
    raise ValueError(f"beam_size: expected a positive int, got {K!r}")
  rows_base = (jnp.arange(B, dtype=jnp.int32) * K)[:, None]  # (B, 1)

  def cond(s):
    return (s[0] < max_len) & ~jnp.all(s[7])

  def body(s):
    t, last, cache, tokens, logp, scores, lengths, finished = s
    logits, cache = step_fn(cache, last[:, None])
    _check_logits(logits, B * K)
    V = logits.shape[-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, K, V)
    # A finished beam has a single continuation: pad, at no cost.
    frozen = jnp.where(jnp.arange(V) == pad_id, logp[..., None], -jnp.inf)
    cand_logp = jnp.where(finished[..., None], frozen, logp[..., None] + lp)  # (B, K, V)
    cand_len = jnp.where(finished, lengths, t + 1)  # (B, K)
    cand_score = cand_logp / length_normalizer(cand_len, length_penalty)[..., None]
    scores, idx = jax.lax.top_k(cand_score.reshape(B, K * V), K)  # (B, K), best first
    parent, tok = idx // V, (idx % V).astype(jnp.int32)
    logp = jnp.take_along_axis(cand_logp.reshape(B, K * V), idx, axis=1)
    lengths = jnp.take_along_axis(cand_len, parent, axis=1)
    was_finished = jnp.take_along_axis(finished, parent, axis=1)
    finished = was_finished | (tok == eos_id) | jnp.isneginf(logp)
    tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[..., None], (0, 0, t))
    cache = gather_beams(cache, (rows_base + parent).reshape(B * K))
    return t + 1, tok.reshape(B * K), cache, tokens, logp, scores, lengths, finished

  # Only beam 0 is live at first, so the K copies of BOS do not yield K identical beams.
  first = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf)
  logp0 = jnp.broadcast_to(first, (B, K)).astype(jnp.float32)
  init = (jnp.array(0, jnp.int32), jnp.full((B * K,), bos_id, jnp.int32), cache,
          jnp.full((B, K, max_len), pad_id, jnp.int32), logp0, logp0,
          jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K), bool))
  _, _, _, tokens, logp, scores, lengths, _ = jax.lax.while_loop(cond, body, init)
  return DecodeResult(tokens[:, 0], scores[:, 0], logp[:, 0], lengths[:, 0],
                      tokens if return_all else None, scores if return_all else None)


def decode(graphdef: nnx.GraphDef, state: nnx.State, inputs: Any, *, method: str = "greedy",
           beam_size: int = 4, max_len: int = 20, length_penalty: float | jax.Array = 0.0,
           bos_id: int, eos_id: int, pad_id: int = 0, return_all: bool = False) -> DecodeResult:
  """Decodes a `Decodable` NNX model given as (graphdef, state): a pure function to jit.

  The inputs are encoded once by `init_decode`, then `greedy_search` or `beam_search` runs over
  the model's `decode_step`, with the model's `nnx.Cache` variables as the search cache.

  Args:
    graphdef, state: `nnx.split(model)`.
    inputs: what `init_decode` takes (e.g. images (B, H, W, C)); its first leaf gives B.
    method: "greedy" or "beam".
    beam_size: K for beam search (ignored by greedy).
    max_len, length_penalty, bos_id, eos_id, pad_id: as in `beam_search`.
    return_all: as in `beam_search` (ignored by greedy).
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  beams = beam_size if method == "beam" else 1
  if not isinstance(beams, int) or beams < 1:
    raise ValueError(f"beam_size: expected a positive int, got {beams!r}")
  batch = jax.tree.leaves(inputs)[0].shape[0]
  model = nnx.merge(graphdef, state)
  model.init_decode(inputs, beams=beams, max_len=max_len)
  step_def, cache, rest = nnx.split(model, nnx.Cache, ...)

  def step_fn(cache, tokens):
    m = nnx.merge(step_def, cache, rest)
    logits = m.decode_step(tokens)
    return logits, nnx.state(m, nnx.Cache)

  kw = dict(max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
            length_penalty=length_penalty)
  if method == "greedy":
    return greedy_search(step_fn, cache, batch_size=batch, **kw)
  return beam_search(step_fn, cache, batch_size=batch, beam_size=beams, return_all=return_all, **kw)


# `decode` compiled once per (graphdef, input shapes, static settings); length_penalty is traced.
decode_jit = jax.jit(decode, static_argnums=(0,), static_argnames=(
    "method", "beam_size", "max_len", "bos_id", "eos_id", "pad_id", "return_all"))


def generate(model: nnx.Module, inputs: Any, **kwargs) -> DecodeResult:
  """Splits `model` and runs the compiled `decode_jit` (keyword arguments as in `decode`)."""
  graphdef, state = nnx.split(model)
  length_penalty = jnp.asarray(kwargs.pop("length_penalty", 0.0), jnp.float32)
  if kwargs.get("method", "greedy") == "greedy":  # settings greedy ignores must not recompile
    kwargs.update(beam_size=1, return_all=False)
  return decode_jit(graphdef, state, inputs, length_penalty=length_penalty, **kwargs)


__all__ = ["DecodeContext", "DecodeResult", "Decodable", "beam_search", "decode", "decode_jit",
           "gather_beams", "generate", "greedy_search", "length_normalizer", "tile_beams"]
