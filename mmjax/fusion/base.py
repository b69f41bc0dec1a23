"""The fusion contract: a registry, the block interface, and the helpers every family shares.

A fusion block is built from `modalities` (name -> token feature dim D_m) and an output width
`features`, and called as `block(inputs, presence=None, *, deterministic=True)`:

- `inputs` maps modality name -> `(tokens (B, N_m, D_m), mask (B, N_m) bool)` (an
  `EncoderOutput` works too; a mask of None means every token is real). A modality the block was
  built for may be left out of `inputs`: it is then absent for every example.
- `presence` maps modality name -> (B,) bool, True where the example has that modality; None (or
  a left-out name) means present. A present modality whose mask is all False counts as absent.
- Shared inputs: a modality's tokens may have batch B / r (r dividing B, the largest batch):
  each row then serves r consecutive examples, as one image serves several questions. Its mask
  is per row, presence stays per example. Blocks with `shares_inputs = True` (cross-attention)
  use the shared rows as they are, e.g. projecting keys and values once per row; the others see
  the rows repeated to B, which is what the caller would otherwise have done.

Absent modalities and padded tokens are first-class: `prepare_inputs` replaces their tokens by
zeros with `jnp.where` before any arithmetic, so neither their values (NaN and Inf included) nor
their gradients reach the output, and each family masks them out of attention and pooling, or
puts a learned "missing" embedding in their place.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax import sharding
from mmjax.layers.common import Dtype, part
from mmjax.registry import Registry

FUSIONS = Registry("fusion", modules=(
    "mmjax.fusion.bottleneck", "mmjax.fusion.cross_attention", "mmjax.fusion.film", "mmjax.fusion.gated",
    "mmjax.fusion.late", "mmjax.fusion.lmf", "mmjax.fusion.relation", "mmjax.fusion.single_stream",
    "mmjax.fusion.tfn"))

normal02 = nnx.initializers.normal(0.02)


class FusionOutput(NamedTuple):
  """What every fusion block returns.

  Attributes:
    pooled: (B, features) fused summary vector.
    tokens: modality name -> fused tokens (B, N_m, features) for the families that keep token
      sequences (zeros where a token is padded or its modality absent), else None.
    aux: named intermediates: `masks` (name -> effective (B, N_m) token masks), `present`
      (name -> effective (B,) presence) and family-specific entries such as attention maps.
  """

  pooled: jax.Array
  tokens: dict[str, jax.Array] | None
  aux: dict[str, Any]


class FusionInputs(NamedTuple):
  """Validated inputs: tokens zeroed wherever `masks` is False; names in construction order.

  With `prepare_inputs(..., keep_shared=True)`, a shared modality's tokens keep their B / r rows
  (r = batch // tokens[m].shape[0]; zeroed only where a token is masked for all r examples)
  while its `masks` and `present` are per example.
  """

  tokens: dict[str, jax.Array]  # name -> (B / r, N_m, D_m); r = 1 unless shared
  masks: dict[str, jax.Array]  # name -> (B, N_m) bool: token mask AND presence
  present: dict[str, jax.Array]  # name -> (B,) bool: presence AND at least one real token
  batch: int


def build_fusion(name: str, *, modalities: Mapping[str, int], features: int, rngs: nnx.Rngs,
                 **kwargs) -> "FusionBlock":
  """Builds the fusion family `name` (see `FUSIONS.names()`) for `modalities` -> `features`."""
  return FUSIONS.build(name, modalities=modalities, features=features, rngs=rngs, **kwargs)


def check_modalities(modalities: Mapping[str, int], min_count: int = 2) -> tuple[tuple[str, int], ...]:
  """Validates a name -> feature-dim mapping; returns it as ordered (name, dim) pairs."""
  if not isinstance(modalities, Mapping):
    raise TypeError(f"modalities: expected a dict of name -> feature dim, got {type(modalities).__name__}")
  if len(modalities) < min_count:
    raise ValueError(f"modalities: expected at least {min_count} modalities, got {list(modalities)}")
  for name, dim in modalities.items():
    if not isinstance(name, str) or not name:
      raise TypeError(f"modalities: names must be non-empty strings, got {name!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
      raise ValueError(f"modalities[{name!r}]: expected a positive int feature dim, got {dim!r}")
  return tuple(modalities.items())


def _split_entry(name: str, entry: Any) -> tuple[Any, Any]:
  """(tokens, mask) from a 2-tuple or anything with `.tokens` and `.mask` (an EncoderOutput)."""
  if hasattr(entry, "tokens") and hasattr(entry, "mask"):
    return entry.tokens, entry.mask
  if isinstance(entry, (tuple, list)) and len(entry) == 2:
    return entry[0], entry[1]
  raise TypeError(f"fusion input {name!r}: expected (tokens, mask) or an EncoderOutput, "
                  f"got {type(entry).__name__}")


def prepare_inputs(inputs: Mapping[str, Any], presence: Mapping[str, Any] | None,
                   modalities: Sequence[tuple[str, int]], *, keep_shared: bool = False) -> FusionInputs:
  """Validates inputs against the construction-time modalities and applies the masks.

  Shared inputs (batch B / r, see the module docstring) are repeated to B unless `keep_shared`.

  Raises ValueError naming the modality and the expected shape on an unknown name, a wrong rank
  or feature dim, a mask or presence of the wrong shape, or mismatched batch sizes.
  """
  dims = dict(modalities)
  if not isinstance(inputs, Mapping):
    raise TypeError(f"fusion inputs: expected a dict of name -> (tokens, mask), got {type(inputs).__name__}")
  unknown = [m for m in inputs if m not in dims]
  if unknown:
    raise ValueError(f"fusion inputs: unknown modality {unknown[0]!r}; this block was built for {list(dims)}")
  presence = {} if presence is None else presence
  if not isinstance(presence, Mapping):
    raise TypeError(f"presence: expected a dict of name -> (B,) bool or None, got {type(presence).__name__}")
  unknown = [m for m in presence if m not in dims]
  if unknown:
    raise ValueError(f"presence: unknown modality {unknown[0]!r}; this block was built for {list(dims)}")
  if not inputs:
    raise ValueError(f"fusion inputs: got no modality; expected some of {list(dims)}")

  raw: dict[str, tuple[jax.Array, jax.Array]] = {}
  rows = {m: (jnp.shape(_split_entry(m, e)[0])[:1] or (0,))[0] for m, e in inputs.items()}
  first = max(rows, key=rows.get)  # the full batch B; the other modalities' rows divide it
  batch = rows[first]
  for name, entry in inputs.items():
    tokens, mask = _split_entry(name, entry)
    d = dims[name]
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 3 or tokens.shape[-1] != d:
      raise ValueError(f"fusion input {name!r}: tokens expected shape (B, N, {d}), got {tokens.shape}")
    if mask is None:
      mask = jnp.ones(tokens.shape[:2], bool)
    mask = jnp.asarray(mask)
    if mask.shape != tokens.shape[:2]:
      raise ValueError(f"fusion input {name!r}: mask expected shape (B, N) = {tokens.shape[:2]}, "
                       f"got {mask.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.floating):
      raise TypeError(f"fusion input {name!r}: tokens expected a float array, got {tokens.dtype}")
    if tokens.shape[0] != batch and (tokens.shape[0] == 0 or batch % tokens.shape[0]):
      raise ValueError(f"fusion input {name!r}: batch size {tokens.shape[0]} differs from "
                       f"{first!r}'s {batch} and does not divide it; expected tokens of shape "
                       f"({batch}, N, {d}), or (B / r, N, {d}) for rows shared by r examples")
    raw[name] = tokens, mask.astype(bool)
  for name, p in presence.items():
    if jnp.shape(p) != (batch,):
      raise ValueError(f"presence[{name!r}]: expected shape (B,) = ({batch},), got {jnp.shape(p)}")
  dtype = next(iter(raw.values()))[0].dtype

  out_tokens, out_masks, out_present = {}, {}, {}
  for name, d in modalities:
    if name in raw:
      tokens, mask = raw[name]
    else:
      tokens, mask = jnp.zeros((batch, 1, d), dtype), jnp.zeros((batch, 1), bool)
    r = batch // tokens.shape[0] if tokens.shape[0] else 1
    if r > 1 and not keep_shared:
      tokens, mask, r = jnp.repeat(tokens, r, axis=0), jnp.repeat(mask, r, axis=0), 1
    mask = jnp.repeat(mask, r, axis=0)  # (B, N) per example
    if name in presence and name in raw:
      mask = mask & jnp.asarray(presence[name]).astype(bool)[:, None]
    row_mask = mask.reshape(-1, r, mask.shape[1]).any(axis=1)  # (B / r, N): used by any example
    if name in raw and not isinstance(tokens, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer) and not (
        np.isfinite(np.asarray(tokens)) | ~np.asarray(row_mask, bool)[..., None]).all():
      raise ValueError(f"fusion input {name!r}: tokens contain NaN or Inf at unmasked positions "
                       "of present examples")
    tokens = jnp.where(row_mask[..., None], tokens, jnp.zeros((), tokens.dtype))  # (B / r, N, D_m)
    out_tokens[name] = sharding.constrain(tokens, ("batch", "length", "embed"))
    out_masks[name] = mask
    out_present[name] = mask.any(axis=1)
  return FusionInputs(out_tokens, out_masks, out_present, batch)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x (B, N, D) over the tokens where mask (B, N) is True; zeros where none is."""
  m = mask[..., None]
  total = jnp.where(m, x, jnp.zeros((), x.dtype)).sum(axis=1, dtype=jnp.float32)  # (B, D)
  count = jnp.maximum(mask.sum(axis=1, dtype=jnp.float32), 1.0)[:, None]  # (B, 1)
  return (total / count).astype(x.dtype)


def masked_token_output(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Fused tokens for return: zeros at padded / absent positions."""
  x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
  return sharding.constrain(x, ("batch", "length", "embed"))


def select(present: jax.Array, value: jax.Array, missing: jax.Array) -> jax.Array:
  """`value` (B, ...) where present (B,) else the learned `missing` (broadcast over the batch)."""
  p = present.reshape(present.shape + (1,) * (value.ndim - 1))
  return jnp.where(p, value, missing.astype(value.dtype))


def learned(shape: tuple[int, ...], names: tuple[str | None, ...], *, rngs: nnx.Rngs,
            param_dtype: Dtype = jnp.float32) -> nnx.Param:
  """A learned embedding (e.g. a "missing modality" vector) initialised N(0, 0.02)."""
  return nnx.Param(part(normal02, names)(rngs.params(), shape, param_dtype))


def full_presence(inputs: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Presence with every given modality present for every example."""
  return {m: jnp.ones(jnp.shape(_split_entry(m, e)[0])[:1], bool) for m, e in inputs.items()}


def modality_dropout(presence: Mapping[str, jax.Array], rate: float,
                     key: jax.Array | nnx.Rngs) -> dict[str, jax.Array]:
  """Drops whole modalities per example for training, keeping at least one per example.

  Each present modality is dropped independently with probability `rate`; an example that would
  lose all of its modalities keeps one of them, chosen uniformly among those it had, so the
  per-modality drop rate for M present modalities is `rate - rate**M / M`. Examples with no
  modality present stay so. `key` is a PRNG key or an `nnx.Rngs` (its `dropout` stream).

  Args:
    presence: name -> (B,) bool.
    rate: drop probability in [0, 1].
    key: randomness.

  Returns:
    name -> (B,) bool, a subset of `presence`.
  """
  if not isinstance(presence, Mapping) or not presence:
    raise ValueError("modality_dropout: presence must be a non-empty dict of name -> (B,) bool")
  if not 0.0 <= float(rate) <= 1.0:
    raise ValueError(f"modality_dropout: rate must be in [0, 1], got {rate}")
  if isinstance(key, nnx.Rngs):
    key = key.dropout()
  names = list(presence)
  for m in names:
    if jnp.ndim(presence[m]) != 1:
      raise ValueError(f"modality_dropout: presence[{m!r}] expected shape (B,), got {jnp.shape(presence[m])}")
  p = jnp.stack([jnp.asarray(presence[m]).astype(bool) for m in names], axis=1)  # (B, M)
  k_drop, k_keep = jax.random.split(key)
  keep = p & (jax.random.uniform(k_drop, p.shape) >= rate)
  lost = p.any(axis=1) & ~keep.any(axis=1)  # (B,)
  scores = jnp.where(p, jax.random.gumbel(k_keep, p.shape), -jnp.inf)
  rescue = jax.nn.one_hot(jnp.argmax(scores, axis=1), len(names), dtype=bool) & p
  keep = jnp.where(lost[:, None], rescue, keep)
  return {m: keep[:, i] for i, m in enumerate(names)}


class FusionBlock(nnx.Module):
  """Base of every fusion family: validates and masks the inputs, then calls `fuse`.

  Attributes:
    modality_dims: ordered (name, D_m) pairs the block was built for.
    names: the modality names in construction order.
    features: output width.
  """

  min_modalities = 2
  shares_inputs = False  # True: `fuse` takes shared inputs unrepeated (see FusionInputs)

  def __init__(self, modalities: Mapping[str, int], features: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.modality_dims = check_modalities(modalities, self.min_modalities)
    self.names = tuple(m for m, _ in self.modality_dims)
    if not isinstance(features, int) or features < 1:
      raise ValueError(f"features: expected a positive int, got {features!r}")
    self.features = features
    self.dtype, self.param_dtype = dtype, param_dtype

  def __call__(self, inputs: Mapping[str, Any], presence: Mapping[str, jax.Array] | None = None,
               *, deterministic: bool = True) -> FusionOutput:
    """Fuses `inputs` (name -> (tokens (B, N_m, D_m), mask (B, N_m))) given `presence` (name -> (B,))."""
    x = prepare_inputs(inputs, presence, self.modality_dims, keep_shared=self.shares_inputs)
    out = self.fuse(x, deterministic=deterministic)
    pooled = sharding.constrain(out.pooled, ("batch", "embed"))
    return FusionOutput(pooled, out.tokens, {"masks": x.masks, "present": x.present, **out.aux})

  def fuse(self, x: FusionInputs, *, deterministic: bool) -> FusionOutput:
    raise NotImplementedError

  def _check_member(self, field: str, name: str) -> str:
    if name not in self.names:
      raise ValueError(f"{field}={name!r} is not one of the modalities {list(self.names)}")
    return name
