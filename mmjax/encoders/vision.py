"""Vision encoders: ViT (big_vision variants, HF-compatible parameters), ResNet, and a small CNN.

All three take images (B, H, W, C) float and return the `EncoderOutput` contract: patch or grid
tokens (B, N, D), an all-True mask (B, N) and a pooled (B, D) vector. Models with a
classification head expose it as `head` and through `classify(images)`.

`ViT`'s parameters map one to one onto HF `ViTModel` / `ViTForImageClassification` (see
`mmjax.transfer.vit`); `ResNet` follows torchvision's layout and parameter counts.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax import sharding
from mmjax.encoders.base import ENCODERS, EncoderOutput
from mmjax.layers.attention import MultiHeadAttention
from mmjax.layers.common import Dtype, activation, dense, layer_norm, ones, part, zeros
from mmjax.layers.embeddings import LearnedPositions, PatchEmbed, normal02, sincos_2d_positions
from mmjax.layers.transformer import Encoder, Mlp

CONV_KERNEL = (None, None, None, "conv_out")
NORMS = ("batch", "group", "layer", "none")

# big_vision's ViT sizes (google-research/big_vision, models/vit.py).
_WIDTH = {"mu": 32, "Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "H": 1280}
_DEPTH = {"mu": 1, "Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "H": 32}
_MLP = {"mu": 128, "Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096, "H": 5120}
_HEADS = {"mu": 2, "Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "H": 16}


def _pair(v: int | tuple[int, int] | list[int], field: str) -> tuple[int, int]:
  """An int or a pair of ints -> (h, w)."""
  t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
  if len(t) != 2 or not all(isinstance(i, (int, np.integer)) and i > 0 for i in t):
    raise ValueError(f"{field}: expected a positive int or a pair of them, got {v!r}")
  return int(t[0]), int(t[1])


def check_images(images: jax.Array, in_channels: int) -> None:
  """Raises TypeError/ValueError naming `images` unless it is float (B, H, W, in_channels) and, when
  concrete (not traced), finite."""
  if not hasattr(images, "dtype") or not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images: expected a float array of shape (B, H, W, {in_channels}), got "
                    f"{getattr(images, 'dtype', type(images).__name__)}")
  if images.ndim != 4 or images.shape[-1] != in_channels:
    raise ValueError(f"images: expected shape (B, H, W, {in_channels}), got {images.shape}")
  if not isinstance(images, jax.core.Tracer) and not np.isfinite(np.asarray(images)).all():
    raise ValueError("images: contains NaN or Inf")


def mean_pool(tokens: jax.Array) -> jax.Array:
  """Mean over tokens (B, N, D) -> (B, D), accumulated in float32, returned in tokens' dtype."""
  return jnp.mean(tokens, axis=1, dtype=jnp.float32).astype(tokens.dtype)


def decode_variant(variant: str) -> dict[str, int]:
  """big_vision-style "B/16" -> dict(width, depth, mlp_dim, heads, patch)."""
  m = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant or "")
  if m is None or m.group(1) not in _WIDTH:
    raise ValueError(f"variant: expected '<size>/<patch>' with size in {sorted(_WIDTH)}, "
                     f"e.g. 'B/16', got {variant!r}")
  v = m.group(1)
  return dict(width=_WIDTH[v], depth=_DEPTH[v], mlp_dim=_MLP[v], heads=_HEADS[v],
              patch=int(m.group(2)))


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Hyper-parameters of a ViT.

  Attributes:
    width: token width D.
    depth: number of pre-LN encoder blocks.
    heads: attention heads.
    mlp_dim: feed-forward width.
    patch: patch size (ph, pw).
    image_size: input size (H, W) the learned position table is built for.
    in_channels: image channels C.
    num_classes: classification head outputs; 0 = no head.
    pool: "cls" (class token; the model has one), "gap" (mean of patch tokens; no class token) or
      "map" (multihead attention pooling of the patch tokens, SigLIP's / big_vision's MAP head; no
      class token).
    posemb: "learn" (learned table, covering the class token too, as HF/timm) or "sincos2d"
      (fixed 2-D sin-cos on the patches; the class token gets none, as big_vision).
    pooler: HF ViTModel's pooler (dense + tanh) on the pooled vector.
    pre_norm: a LayerNorm on the embeddings before the encoder (CLIP's "pre_layrnorm").
    patch_bias: whether the patch conv has a bias (CLIP's has none).
    ln_eps: LayerNorm epsilon (HF ViT uses 1e-12, timm/big_vision 1e-6).
    act: feed-forward activation name (see `mmjax.layers.activation`).
    dropout: dropout after the embeddings and each sub-layer.
    attn_dropout: dropout on attention weights.
  """

  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  patch: tuple[int, int] = (16, 16)
  image_size: tuple[int, int] = (224, 224)
  in_channels: int = 3
  num_classes: int = 0
  pool: str = "cls"
  posemb: str = "learn"
  pooler: bool = False
  pre_norm: bool = False
  patch_bias: bool = True
  ln_eps: float = 1e-6
  act: str = "gelu"
  dropout: float = 0.0
  attn_dropout: float = 0.0

  @property
  def grid(self) -> tuple[int, int]:
    return self.image_size[0] // self.patch[0], self.image_size[1] // self.patch[1]


@ENCODERS.register("vit")
class ViT(nnx.Module):
  """Vision Transformer: patch embedding, class token, positions, pre-LN encoder, final LN.

  Attributes:
    spec: the `ViTSpec` hyper-parameters.
    patch_embed: strided conv patchifier (kernel (ph, pw, C, D)).
    cls_token: (1, 1, D) class token, or None for pool="gap".
    pos_embed: `LearnedPositions` over the class token + N patches, or None for "sincos2d".
    map_head: the `MapHead` of pool="map", else None.
    pre_norm: LayerNorm on the embeddings before the encoder, or None.
    encoder: `mmjax.layers.Encoder` of pre-LN blocks with its final LayerNorm.
    pooler: dense (D -> D) + tanh (HF ViTModel's pooler), or None.
    head: dense (D -> num_classes) on the pooled vector, or None.

  Args:
    variant: "<size>/<patch>" (see `decode_variant`), or None to give every size explicitly.
    dtype: compute dtype; param_dtype: parameter dtype.
    remat: what each encoder block keeps for the backward pass: "none", "dots" or "full" (see
      `mmjax.layers.REMAT_POLICIES`): less memory, the same outputs and gradients.
    attention: attention kernel of every block: auto | xla | cudnn | reference, see `MultiHeadAttention`.
    rngs: parameter and dropout keys.
    **overrides: any `ViTSpec` field; ints are accepted for `patch` and `image_size`.
  """

  def __init__(self, variant: str | None = "B/16", *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: str = "none", attention: str = "auto",
               rngs: nnx.Rngs, **overrides):
    fields = {f.name for f in dataclasses.fields(ViTSpec)}
    bad = sorted(set(overrides) - fields)
    if bad:
      raise TypeError(f"unknown ViT field(s) {bad}; known: {sorted(fields)}")
    cfg = {**(decode_variant(variant) if variant is not None else {}), **overrides}
    for key in ("patch", "image_size"):
      if key in cfg:
        cfg[key] = _pair(cfg[key], key)
    spec = ViTSpec(**cfg)
    if spec.pool not in ("cls", "gap", "map"):
      raise ValueError(f"pool: expected 'cls', 'gap' or 'map', got {spec.pool!r}")
    if spec.posemb not in ("learn", "sincos2d"):
      raise ValueError(f"posemb: expected 'learn' or 'sincos2d', got {spec.posemb!r}")
    # A size that is no multiple of the patch drops the last rows and columns, as a strided
    # convolution does in HF and big_vision (SigLIP So400m/14 at 384 px: a 27 x 27 grid).
    if min(spec.grid) < 1:
      raise ValueError(f"image_size: {spec.image_size} is smaller than one patch {spec.patch}")
    self.spec = spec
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d = spec.width
    self.patch_embed = PatchEmbed(spec.patch, spec.in_channels, d, use_bias=spec.patch_bias, **kw)
    cls_init = part(normal02, (None, None, "embed"))
    self.cls_token = (nnx.Param(cls_init(rngs.params(), (1, 1, d), param_dtype))
                      if spec.pool == "cls" else None)
    n = spec.grid[0] * spec.grid[1] + (spec.pool == "cls")
    self.pos_embed = (LearnedPositions(n, d, param_dtype=param_dtype, rngs=rngs)
                      if spec.posemb == "learn" else None)
    self.pre_norm = layer_norm(d, eps=spec.ln_eps, **kw) if spec.pre_norm else None
    self.dropout = nnx.Dropout(spec.dropout, rngs=rngs)
    self.encoder = Encoder(spec.depth, d, spec.heads, spec.mlp_dim, norm="pre", final_norm=True,
                           ln_eps=spec.ln_eps, act=spec.act, dropout=spec.dropout,
                           attn_dropout=spec.attn_dropout, remat=remat, attention=attention,
                           **kw)
    self.map_head = (MapHead(d, spec.heads, spec.mlp_dim, act=spec.act, ln_eps=spec.ln_eps,
                             attention=attention, **kw) if spec.pool == "map" else None)
    self.pooler = dense(d, d, ("embed", None), **kw) if spec.pooler else None
    self.head = dense(d, spec.num_classes, ("embed", None), **kw) if spec.num_classes else None

  def __call__(self, images: jax.Array, *, deterministic: bool = True,
               return_hidden: bool = False):
    """Encodes images.

    Args:
      images: (B, H, W, C) float; (H, W) must equal `spec.image_size` with learned positions.
      deterministic: disables dropout when True.
      return_hidden: also return the embedding output and every block's output (depth + 1
        arrays (B, 1 + N, D) with the class token first, before the final LayerNorm, as HF).

    Returns:
      `EncoderOutput` with the N patch tokens (class token excluded) after the final LayerNorm,
      and with `return_hidden` a tuple of hidden states too.
    """
    spec = self.spec
    check_images(images, spec.in_channels)
    if spec.posemb == "learn" and tuple(images.shape[1:3]) != spec.image_size:
      raise ValueError(f"images: size {tuple(images.shape[1:3])} differs from image_size "
                       f"{spec.image_size} that the learned position table was built for")
    images = sharding.constrain(images, ("batch", None, None, None))
    x, (h, w) = self.patch_embed(images)  # (B, N, D)
    if spec.posemb == "sincos2d":
      x = x + jnp.asarray(sincos_2d_positions(h, w, spec.width), x.dtype)[None]
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
      x = jnp.concatenate([cls, x], axis=1)  # (B, 1 + N, D)
    if self.pos_embed is not None:
      x = self.pos_embed(x)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = self.dropout(x, deterministic=deterministic)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    x, hidden = self.encoder(x, deterministic=deterministic, return_hidden=True)
    if spec.pool == "cls":
      tokens, pooled = x[:, 1:], x[:, 0]
    elif spec.pool == "map":
      tokens, pooled = x, self.map_head(x)
    else:
      tokens, pooled = x, mean_pool(x)
    if self.pooler is not None:
      pooled = jnp.tanh(self.pooler(pooled))
    mask = jnp.ones(tokens.shape[:2], bool)
    out = EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)
    return (out, tuple(hidden)) if return_hidden else out

  def classify(self, images: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Class logits (B, num_classes) from the pooled vector (HF: classifier on the LN'd CLS)."""
    return _classify(self, images, deterministic)


class MapHead(nnx.Module):
  """Multihead attention pooling (big_vision's `MAPHead`, HF SigLIP's vision head).

  A learned probe attends over the tokens; the result passes a pre-LN MLP with a residual:
  y = attn(probe, x); pooled = y + mlp(LN(y)).

  Attributes:
    probe: (1, 1, D) query.
    attn: `MultiHeadAttention` from the probe to the tokens.
    norm, mlp: LayerNorm and feed-forward block (D -> mlp_dim -> D).
  """

  def __init__(self, features: int, num_heads: int, mlp_dim: int, *, act: str = "gelu_tanh",
               ln_eps: float = 1e-6, attention: str = "auto", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    init = part(nnx.initializers.xavier_uniform(), (None, None, "embed"))
    self.probe = nnx.Param(init(rngs.params(), (1, 1, features), param_dtype))
    self.attn = MultiHeadAttention(num_heads, features, attention=attention, **kw)
    self.norm = layer_norm(features, eps=ln_eps, **kw)
    self.mlp = Mlp(features, mlp_dim, act=act, **kw)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, N, D) -> pooled (B, D)."""
    b, _, d = tokens.shape
    probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype), (b, 1, d))
    y = self.attn(probe, tokens)  # (B, 1, D)
    return (y + self.mlp(self.norm(y)))[:, 0]


def _classify(model, images, deterministic):
  """Logits of `model.head` on the pooled vector; a clear error without a head."""
  if model.head is None:
    raise ValueError(f"{type(model).__name__} has no classification head (num_classes=0)")
  return model.head(model(images, deterministic=deterministic).pooled)


def make_norm(kind: str, features: int, *, groups: int = 32, eps: float = 1e-5,
              dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              rngs: nnx.Rngs) -> nnx.Module | None:
  """A channel norm for (B, H, W, C) maps: "batch", "group", "layer", or None for "none"."""
  kw = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            scale_init=part(ones, ("norm",)), bias_init=part(zeros, ("norm",)))
  if kind == "batch":
    return nnx.BatchNorm(features, momentum=0.9, **kw)  # torch's momentum 0.1
  if kind == "group":
    if features % groups:
      raise ValueError(f"norm_groups: {groups} does not divide {features} channels")
    return nnx.GroupNorm(features, num_groups=groups, **kw)
  if kind == "layer":
    return layer_norm(features, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if kind == "none":
    return None
  raise ValueError(f"norm: expected one of {NORMS}, got {kind!r}")


class ConvNorm(nnx.Module):
  """Conv (torch-style symmetric padding k//2; bias only without a norm) followed by a norm."""

  def __init__(self, in_features: int, out_features: int, kernel: int, stride: int = 1, *,
               norm: str = "batch", groups: int = 32, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    pad = kernel // 2
    self.conv = nnx.Conv(
        in_features, out_features, kernel_size=(kernel, kernel), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), use_bias=norm == "none", dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=part(nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), CONV_KERNEL),
        bias_init=part(zeros, ("conv_out",)), rngs=rngs)
    self.norm = make_norm(norm, out_features, groups=groups, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    x = self.conv(x)
    if isinstance(self.norm, nnx.BatchNorm):
      return self.norm(x, use_running_average=deterministic)
    return x if self.norm is None else self.norm(x)


class BasicBlock(nnx.Module):
  """ResNet-18/34 block: 3x3 -> 3x3, identity or 1x1 projection shortcut."""

  expansion = 1

  def __init__(self, in_features: int, features: int, stride: int, **kw):
    self.conv1 = ConvNorm(in_features, features, 3, stride, **kw)
    self.conv2 = ConvNorm(features, features, 3, **kw)
    self.downsample = (ConvNorm(in_features, features, 1, stride, **kw)
                       if stride != 1 or in_features != features else None)

  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    y = jax.nn.relu(self.conv1(x, deterministic))
    y = self.conv2(y, deterministic)
    short = x if self.downsample is None else self.downsample(x, deterministic)
    return jax.nn.relu(y + short)


class Bottleneck(nnx.Module):
  """ResNet-50+ block (torchvision v1.5: stride on the 3x3): 1x1 -> 3x3 -> 1x1 (x4)."""

  expansion = 4

  def __init__(self, in_features: int, features: int, stride: int, **kw):
    out = features * self.expansion
    self.conv1 = ConvNorm(in_features, features, 1, **kw)
    self.conv2 = ConvNorm(features, features, 3, stride, **kw)
    self.conv3 = ConvNorm(features, out, 1, **kw)
    self.downsample = (ConvNorm(in_features, out, 1, stride, **kw)
                       if stride != 1 or in_features != out else None)

  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    y = jax.nn.relu(self.conv1(x, deterministic))
    y = jax.nn.relu(self.conv2(y, deterministic))
    y = self.conv3(y, deterministic)
    short = x if self.downsample is None else self.downsample(x, deterministic)
    return jax.nn.relu(y + short)


RESNET_STAGES: dict[int, tuple[type, tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


@ENCODERS.register("resnet")
class ResNet(nnx.Module):
  """ResNet in torchvision's layout (7x7/2 stem, 3x3/2 max-pool, four stages, optional fc).

  Attributes:
    stem: 7x7 stride-2 `ConvNorm` (torchvision conv1 + bn1).
    stages: four lists of blocks (torchvision layer1..layer4); stage i has width * 2**i channels
      (x4 out for bottlenecks) and stride 2 from the second stage on.
    head: dense (C -> num_classes) on the pooled vector (torchvision fc), or None.
    out_features: C, the token width.

  Args:
    depth: 18, 34, 50, 101 or 152.
    width: stem / first-stage channels (64 in the published models; smaller for tests).
    stage_sizes: blocks per stage, overriding the depth's counts (keeps its block type).
    num_classes: fc outputs; 0 = no head.
    norm: "batch" (running statistics used when `deterministic`), "group", "layer" or "none".
    norm_groups: groups for "group".
    in_channels: image channels C.
    dtype, param_dtype: compute and parameter dtypes.
    rngs: parameter keys.
  """

  def __init__(self, depth: int = 50, *, width: int = 64,
               stage_sizes: tuple[int, ...] | None = None, num_classes: int = 0, norm: str = "batch", norm_groups: int = 32,
               in_channels: int = 3, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    if depth not in RESNET_STAGES:
      raise ValueError(f"depth: expected one of {sorted(RESNET_STAGES)}, got {depth!r}")
    block, sizes = RESNET_STAGES[depth]
    sizes = tuple(stage_sizes) if stage_sizes is not None else sizes
    self.depth, self.in_channels = depth, in_channels
    kw = dict(norm=norm, groups=norm_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem = ConvNorm(in_channels, width, 7, 2, **kw)
    stages, c = [], width
    for i, n in enumerate(sizes):
      blocks = []
      for j in range(n):
        blocks.append(block(c, width * 2 ** i, 2 if (j == 0 and i > 0) else 1, **kw))
        c = width * 2 ** i * block.expansion
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.out_features = c
    self.head = (dense(c, num_classes, ("conv_out", None), rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype) if num_classes else None)

  def __call__(self, images: jax.Array, *, deterministic: bool = True) -> EncoderOutput:
    """images (B, H, W, C) float -> tokens (B, h*w, C_out) of the last stage, pooled mean."""
    check_images(images, self.in_channels)
    x = sharding.constrain(images, ("batch", None, None, None))
    x = jax.nn.relu(self.stem(x, deterministic))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in self.stages:
      for blk in stage:
        x = blk(x, deterministic)
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)  # (B, h*w, C)
    return EncoderOutput(tokens=tokens, mask=jnp.ones((b, h * w), bool),
                         pooled=mean_pool(tokens))

  def classify(self, images: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Class logits (B, num_classes) from the pooled vector."""
    return _classify(self, images, deterministic)


def grid_coords(h: int, w: int, freqs: int = 0) -> np.ndarray:
  """(h, w, 2 + 4 * freqs) cell coordinates (x, y), each spanning [-1, 1] (0 for a single
  cell), then sin((pi / 2) k x), cos(...), sin((pi / 2) k y), cos(...) for k = 1..freqs."""
  ys = np.linspace(-1.0, 1.0, h) if h > 1 else np.zeros(1)
  xs = np.linspace(-1.0, 1.0, w) if w > 1 else np.zeros(1)
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  out = [xx, yy]
  for k in range(1, freqs + 1):
    for v in (xx, yy):
      out += [np.sin(np.pi / 2 * k * v), np.cos(np.pi / 2 * k * v)]
  return np.stack(out, axis=-1).astype(np.float32)


@ENCODERS.register("small_cnn")
class SmallCNN(nnx.Module):
  """A few stride-2 convs for small images (e.g. 75x75 -> a 5x5 grid with four of them).

  Attributes:
    layers: `ConvNorm`s, each 3x3 (by default) with stride 2, followed by the activation.
    proj: dense (C [+ 2] -> features) applied to every grid cell.
    encoder: optional Transformer `Encoder` over the grid tokens.

  Args:
    features: token width D.
    channels: output channels of each conv (the relation-network paper uses four of 24).
    kernel_size: conv kernel size.
    norm: "batch", "group", "layer" or "none".
    norm_groups: groups for "group".
    coords: append each cell's normalised (x, y) in [-1, 1] before the projection.
    coord_freqs: with `coords`, also append sin and cos of (pi / 2) k x and (pi / 2) k y for
      k = 1..coord_freqs (4 * coord_freqs channels). Attention logits between such tokens can
      then be functions of the offset between cells (cos a cos b + sin a sin b = cos(a - b)),
      e.g. peaked on the nearest object, which the linear (x, y) alone cannot express. The
      lowest frequency has period 4, twice the grid's span, so no two offsets in the grid alias.
    depth: pre-LN Transformer layers over the grid tokens after the projection (0: none). With
      coordinates this lets every cell see every other once per image, which relational questions
      need, at a cost shared by all questions about the image.
    num_heads, mlp_ratio: of those layers.
    in_channels: image channels C.
    act: activation after each conv.
    dtype, param_dtype: compute and parameter dtypes.
    remat: rematerialisation of the Transformer layers ("none", "dots" or "full"; see `ViT`).
    attention: attention kernel of every block: auto | xla | cudnn | reference, see `MultiHeadAttention`.
    rngs: parameter keys.

  Subclasses may override `input_features` to give the first conv per-pixel features computed
  from the image (its input channels are sized from that method's output).
  """

  def __init__(self, features: int = 64, *, channels: tuple[int, ...] = (24, 24, 24, 24),
               kernel_size: int = 3, norm: str = "batch", norm_groups: int = 8,
               coords: bool = False, coord_freqs: int = 0, depth: int = 0, num_heads: int = 4,
               mlp_ratio: int = 2, in_channels: int = 3, act: str = "relu",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, remat: str = "none",
               attention: str = "auto", rngs: nnx.Rngs):
    if not channels:
      raise ValueError("channels: expected at least one conv layer")
    if depth < 0:
      raise ValueError(f"depth: expected a non-negative int, got {depth!r}")
    if coord_freqs < 0 or (coord_freqs and not coords):
      raise ValueError(f"coord_freqs: expected a non-negative int, and coords=True when > 0; "
                       f"got coord_freqs={coord_freqs!r}, coords={coords!r}")
    self.in_channels, self.coords, self.coord_freqs = in_channels, coords, coord_freqs
    self.act = activation(act)
    kw = dict(norm=norm, groups=norm_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    pixel = jax.ShapeDtypeStruct((1, 1, 1, in_channels), jnp.float32)
    cins = (jax.eval_shape(self.input_features, pixel).shape[-1],) + tuple(channels[:-1])
    self.layers = nnx.List([ConvNorm(ci, co, kernel_size, 2, **kw)
                            for ci, co in zip(cins, channels)])
    self.proj = dense(channels[-1] + 2 * coords + 4 * coord_freqs, features, (None, "embed"),
                      rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = (Encoder(depth, features, num_heads, mlp_ratio * features, remat=remat,
                            attention=attention, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                    if depth else None)

  def input_features(self, images: jax.Array) -> jax.Array:
    """images (B, H, W, C) -> what the first conv reads, (B, H, W, C'): the images themselves."""
    return images

  def __call__(self, images: jax.Array, *, deterministic: bool = True) -> EncoderOutput:
    """images (B, H, W, C) float -> tokens (B, h*w, features), grid row-major, pooled mean."""
    check_images(images, self.in_channels)
    x = self.input_features(sharding.constrain(images, ("batch", None, None, None)))
    for layer in self.layers:
      x = self.act(layer(x, deterministic))  # (B, h, w, C)
    b, h, w, _ = x.shape
    if self.coords:
      xy = grid_coords(h, w, self.coord_freqs)
      xy = jnp.broadcast_to(jnp.asarray(xy, x.dtype), (b, h, w, xy.shape[-1]))
      x = jnp.concatenate([x, xy], axis=-1)
    tokens = self.proj(x.reshape(b, h * w, x.shape[-1]))  # (B, h*w, D)
    tokens = sharding.constrain(tokens, ("batch", "length", "embed"))
    if self.encoder is not None:
      tokens = self.encoder(tokens, deterministic=deterministic)
    return EncoderOutput(tokens=tokens, mask=jnp.ones((b, h * w), bool),
                         pooled=mean_pool(tokens))
