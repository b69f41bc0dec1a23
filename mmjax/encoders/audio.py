"""Audio encoders over log-mel spectrograms: an AST-style spectrogram Transformer and a small CNN.

Both take either padded waveforms (B, T) and run `mmjax.encoders.audio_frontend.log_mel` inside,
or precomputed log-mel features (B, frames, n_mels); the `input_kind` argument says which. Valid
extent comes from `lengths` (B,) in samples or frames, or an equivalent prefix `mask` (B, T). Both return
the `EncoderOutput` contract, and both are padding-invariant by design: padded frames are zeroed
before any layer that mixes time, a patch or pooled step is valid when any of its frames is, and
attention and pooling ignore invalid tokens; so a clip's pooled vector does not depend on how much
padding shares its batch (up to float rounding). The only global normalisation is a fixed
(dataset) mean/std, which is per-frame and so keeps that property.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax import sharding
from mmjax.encoders import audio_frontend as af
from mmjax.encoders.base import ENCODERS, EncoderOutput, masked_mean
from mmjax.layers.common import Dtype, activation, dense, layer_norm, part
from mmjax.layers.embeddings import LearnedPositions, sincos_2d_positions
from mmjax.layers.transformer import Encoder

INPUTS = ("features", "waveform")


def _lengths(x, mask, lengths, field: str) -> jax.Array:
  """(B,) int32 valid lengths along axis 1 of x, from `lengths`, a prefix `mask`, or full."""
  if mask is not None and lengths is not None:
    raise ValueError(f"{field}: pass either mask or lengths, not both")
  if mask is not None:
    if getattr(mask, "shape", None) != x.shape[:2]:
      raise ValueError(f"{field} mask: expected shape {x.shape[:2]}, got {getattr(mask, 'shape', None)}")
    return jnp.sum(jnp.asarray(mask).astype(jnp.int32), axis=1)
  if lengths is None:
    return jnp.full(x.shape[:1], x.shape[1], jnp.int32)
  if not hasattr(lengths, "dtype"):
    lengths = np.asarray(lengths)
  if lengths.shape != x.shape[:1] or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{field} lengths: expected an integer array of shape {x.shape[:1]}, got "
                     f"{lengths.dtype}{tuple(lengths.shape)}")
  return jnp.asarray(lengths).astype(jnp.int32)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_features(x, n, n_mels: int) -> None:
  """Raises ValueError for features that are not (B, F, n_mels), empty, non-finite, or bad lengths."""
  if getattr(x, "ndim", None) != 3 or x.shape[-1] != n_mels:
    raise ValueError(f"features: expected log-mel of shape (B, frames, {n_mels}), got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"features: empty input of shape {x.shape}; need at least one frame")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"features: expected a floating-point array, got dtype {x.dtype}")
  if _is_concrete(x) and not np.all(np.isfinite(np.asarray(x, np.float32))):
    raise ValueError("features: contains NaN or Inf")
  if _is_concrete(n) and (int(np.min(n)) < 1 or int(np.max(n)) > x.shape[1]):
    raise ValueError(f"features lengths: expected values in [1, {x.shape[1]}], got min {int(np.min(n))}, "
                     f"max {int(np.max(n))}")


def _log_mel_input(x, mask, lengths, kind: str, frontend: af.FrontEndConfig | None, n_mels: int,
                   mean: float, std: float):
  """Normalised log-mel (B, F, n_mels) float32 with padded frames zeroed, and frame lengths (B,)."""
  if kind == "waveform":
    if getattr(x, "ndim", None) != 2:
      raise ValueError(f"waveform: expected shape (B, T), got {getattr(x, 'shape', type(x).__name__)}")
    values, n, fmask = af.log_mel(x, _lengths(x, mask, lengths, "waveform"), frontend)
  else:
    if getattr(x, "ndim", None) != 3:
      raise ValueError(f"features: expected log-mel of shape (B, frames, {n_mels}), got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    n = _lengths(x, mask, lengths, "features")
    _check_features(x, n, n_mels)
    values, fmask = jnp.asarray(x, jnp.float32), af.lengths_to_mask(n, x.shape[1])
  values = (values - mean) / std
  return jnp.where(fmask[..., None], values, 0.0), n


def _check_input_kind(input_kind: str, frontend: af.FrontEndConfig | None, n_mels: int):
  """The front-end config a module uses (None for feature input), checked against n_mels."""
  if input_kind not in INPUTS:
    raise ValueError(f"input_kind: expected one of {INPUTS}, got {input_kind!r}")
  if input_kind == "features":
    return None
  frontend = frontend or af.FrontEndConfig(n_mels=n_mels)
  if frontend.n_mels != n_mels:
    raise ValueError(f"frontend.n_mels={frontend.n_mels} differs from n_mels={n_mels}")
  return frontend


@ENCODERS.register("ast")
class SpectrogramTransformer(nnx.Module):
  """AST-style encoder: time x frequency patches of a log-mel, a cls token and a pre-LN Transformer.

  Patches are taken time-major (token t * n_freq_patches + f), so a learned position table made
  for `max_frames` serves any shorter clip and positions do not depend on padding. A patch is
  valid when any of its frames is; the time axis is zero-padded so every frame lies in a patch.

  Attributes:
    input_kind: "features" (x is (B, frames, n_mels) log-mel) or "waveform" (x is (B, T) samples).
    frontend: the `FrontEndConfig` used for waveform input (None for features).
    patch, stride: (time, freq) patch size and stride (stride = patch: non-overlapping).
    pool: "cls" (the cls token's output) or "mean" (masked mean of patch tokens).
    patch_embed: the patch projection, a conv (pt, pf, 1 -> D).
    cls: (1, 1, D) learned cls token (zero-initialised, as big_vision's ViT).
    positions: learned table, or None for fixed 2-D sin-cos positions.
    encoder: the pre-LN `Encoder` stack (with its final LayerNorm).

  Args:
    width, depth, num_heads, mlp_dim: Transformer size (mlp_dim None = 4 * width).
    n_mels: mel bands of the input.
    max_frames: longest input in frames (sizes the learned position table; no limit with sincos2d).
    posemb: "learned" or "sincos2d".
    feature_mean, feature_std: fixed normalisation (x - mean) / std of log-mel values
      (AST uses dataset statistics).
    dropout, attn_dropout: dropout on embeddings/sub-layers and on attention weights.
    remat: what each encoder block keeps for the backward pass: "none", "dots" or "full" (see
      `mmjax.layers.REMAT_POLICIES`).
    attention: attention kernel of every block: auto | xla | cudnn | reference, see `MultiHeadAttention`.
  """

  def __init__(self, width: int = 192, depth: int = 4, num_heads: int = 3,
               mlp_dim: int | None = None, *, n_mels: int = 128,
               patch: int | tuple[int, int] = 16, stride: int | tuple[int, int] | None = None,
               max_frames: int = 1024, posemb: str = "learned", pool: str = "cls",
               input_kind: str = "features", frontend: af.FrontEndConfig | None = None,
               feature_mean: float = 0.0, feature_std: float = 1.0, dropout: float = 0.0,
               attn_dropout: float = 0.0, ln_eps: float = 1e-6, remat: str = "none",
               attention: str = "auto", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    stride = self.patch if stride is None else stride
    self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if min(self.patch + self.stride) < 1:
      raise ValueError(f"patch {self.patch} and stride {self.stride} must be positive")
    if n_mels < self.patch[1]:
      raise ValueError(f"n_mels={n_mels} is smaller than the frequency patch size {self.patch[1]}")
    if posemb not in ("learned", "sincos2d"):
      raise ValueError(f"posemb: expected 'learned' or 'sincos2d', got {posemb!r}")
    if pool not in ("cls", "mean"):
      raise ValueError(f"pool: expected 'cls' or 'mean', got {pool!r}")
    if feature_std <= 0:
      raise ValueError(f"feature_std: expected > 0, got {feature_std}")
    self.input_kind, self.frontend = input_kind, _check_input_kind(input_kind, frontend, n_mels)
    self.n_mels, self.max_frames, self.pool, self.posemb = n_mels, max_frames, pool, posemb
    self.feature_mean, self.feature_std = float(feature_mean), float(feature_std)
    self.width, self.dtype = width, dtype
    self.n_freq = (n_mels - self.patch[1]) // self.stride[1] + 1
    self.max_time = math.ceil(max_frames / self.stride[0])
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = nnx.Conv(
        1, width, kernel_size=self.patch, strides=self.stride, padding="VALID",
        kernel_init=part(nnx.initializers.lecun_uniform(), (None, None, None, "embed")),
        bias_init=part(nnx.initializers.zeros_init(), ("embed",)), **kw)
    self.cls = nnx.Param(part(nnx.initializers.zeros_init(), (None, None, "embed"))(
        rngs.params(), (1, 1, width), param_dtype))
    self.positions = (LearnedPositions(self.max_time * self.n_freq, width, param_dtype=param_dtype,
                                       rngs=rngs) if posemb == "learned" else None)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.encoder = Encoder(depth, width, num_heads, mlp_dim or 4 * width, norm="pre",
                           ln_eps=ln_eps, dropout=dropout, attn_dropout=attn_dropout, remat=remat,
                           attention=attention, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               lengths: jax.Array | None = None, deterministic: bool = True) -> EncoderOutput:
    """Encodes x (see `input_kind`); mask (B, T) prefix or lengths (B,) give the valid extent.

    Returns tokens (B, 1 + n_time * n_freq, D) with the cls token first, their mask, and pooled.
    """
    feats, n = _log_mel_input(x, mask, lengths, self.input_kind, self.frontend, self.n_mels,
                              self.feature_mean, self.feature_std)  # (B, F, M), (B,)
    (pt, pf), (st, sf) = self.patch, self.stride
    F = feats.shape[1]
    n_time = math.ceil(F / st)
    if self.positions is not None and n_time > self.max_time:
      raise ValueError(f"input: {F} frames exceed max_frames={self.max_frames}")
    span = (n_time - 1) * st + pt  # frames the time patches cover
    feats = jnp.pad(feats, ((0, 0), (0, max(span - F, 0)), (0, 0)))[:, :span]
    y = self.patch_embed(feats[..., None].astype(self.dtype))  # (B, n_time, n_freq, D)
    b, _, nf, d = y.shape
    tokens = y.reshape(b, n_time * nf, d)
    if self.positions is not None:
      tokens = self.positions(tokens)
    else:
      tokens = tokens + jnp.asarray(sincos_2d_positions(n_time, nf, d), tokens.dtype)[None]
    pmask = jnp.repeat(jnp.arange(n_time)[None, :] * st < n[:, None], nf, axis=1)  # (B, n_time * nf)
    cls = jnp.broadcast_to(self.cls[...].astype(tokens.dtype), (b, 1, d))
    tokens = jnp.concatenate([cls, tokens], axis=1)  # (B, 1 + N, D)
    tmask = jnp.concatenate([jnp.ones((b, 1), bool), pmask], axis=1)
    tokens = sharding.constrain(self.dropout(tokens, deterministic=deterministic),
                                ("batch", "length", "embed"))
    out = self.encoder(tokens, tmask, deterministic=deterministic)
    out = jnp.where(tmask[..., None], out, 0).astype(out.dtype)
    pooled = out[:, 0] if self.pool == "cls" else masked_mean(out[:, 1:], pmask).astype(out.dtype)
    return EncoderOutput(out, tmask, pooled)


class _ConvStage(nnx.Module):
  """3x3 conv (stride 1, zero padding 1), per-position LayerNorm, activation."""

  def __init__(self, in_ch: int, out_ch: int, act: str, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.conv = nnx.Conv(
        in_ch, out_ch, kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=part(nnx.initializers.he_uniform(), (None, None, None, "conv_out")),
        bias_init=part(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs)
    self.norm = nnx.LayerNorm(out_ch, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                              scale_init=part(nnx.initializers.ones_init(), ("norm",)),
                              bias_init=part(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.act(self.norm(self.conv(x)))


def _pool2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, over (B, T, F, C), zero-padding T and F to even first."""
  b, t, f, c = x.shape
  x = jnp.pad(x, ((0, 0), (0, t % 2), (0, f % 2), (0, 0)))
  return x.reshape(b, (t + 1) // 2, 2, (f + 1) // 2, 2, c).max(axis=(2, 4))


@ENCODERS.register("audio_cnn")
class AudioCNN(nnx.Module):
  """A small 2-D CNN over log-mel: conv stages with 2x2 pooling, then one token per time step.

  Each stage is conv3x3 -> LayerNorm over channels -> activation -> zero padded frames -> 2x2
  max-pool, so time steps past a clip's length never leak into valid ones. The frequency axis is
  averaged away at the end; tokens are a projection of each remaining time step.

  Attributes:
    input_kind: "features" (x is (B, frames, n_mels) log-mel) or "waveform" (x is (B, T) samples).
    frontend: the `FrontEndConfig` used for waveform input (None for features).
    stages: the conv stages; time and frequency halve after each.
    proj: channels -> D projection of each time step; `norm` a final LayerNorm.

  Args:
    features: token width D.
    channels: output channels per stage.
    n_mels: mel bands of the input.
    act: activation name.
    feature_mean, feature_std: fixed normalisation (x - mean) / std of log-mel values.
  """

  def __init__(self, features: int = 128, channels: tuple[int, ...] = (32, 64, 128), *,
               n_mels: int = 64, act: str = "relu", input_kind: str = "features",
               frontend: af.FrontEndConfig | None = None, feature_mean: float = 0.0,
               feature_std: float = 1.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if not channels:
      raise ValueError("channels: expected at least one conv stage")
    if feature_std <= 0:
      raise ValueError(f"feature_std: expected > 0, got {feature_std}")
    self.input_kind, self.frontend = input_kind, _check_input_kind(input_kind, frontend, n_mels)
    self.n_mels, self.dtype = n_mels, dtype
    self.feature_mean, self.feature_std = float(feature_mean), float(feature_std)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ins = (1,) + tuple(channels[:-1])
    self.stages = nnx.List([_ConvStage(i, o, act, **kw) for i, o in zip(ins, channels)])
    self.proj = dense(channels[-1], features, ("conv_out", "embed"), **kw)
    self.norm = layer_norm(features, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               lengths: jax.Array | None = None, deterministic: bool = True) -> EncoderOutput:
    """Encodes x (see `input_kind`); mask (B, T) prefix or lengths (B,) give the valid extent.

    Returns tokens (B, ceil(frames / 2^stages), D), their mask, and the masked mean as pooled.
    `deterministic` is accepted for interface parity; the CNN has no dropout.
    """
    del deterministic
    feats, n = _log_mel_input(x, mask, lengths, self.input_kind, self.frontend, self.n_mels,
                              self.feature_mean, self.feature_std)  # (B, F, M), (B,)
    h = feats[..., None].astype(self.dtype)  # (B, F, M, 1)
    for stage in self.stages:
      h = stage(h)
      h = jnp.where(af.lengths_to_mask(n, h.shape[1])[:, :, None, None], h, 0).astype(h.dtype)
      h = _pool2(h)  # (B, ceil(F / 2), ceil(M / 2), C)
      n = (n + 1) // 2
    tokens = self.norm(self.proj(jnp.mean(h, axis=2)))  # (B, T', D)
    tmask = af.lengths_to_mask(n, tokens.shape[1])
    tokens = jnp.where(tmask[..., None], tokens, 0).astype(tokens.dtype)
    tokens = sharding.constrain(tokens, ("batch", "length", "embed"))
    return EncoderOutput(tokens, tmask, masked_mean(tokens, tmask).astype(tokens.dtype))
