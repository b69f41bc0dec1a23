"""Image pp ops (numpy + PIL on the host): decode, resize, crops, flips, rotation, colour jitter.

Images travel as (H, W, C) arrays: uint8 straight from `image.decode`, float32 after
`image.value_range` or `image.normalize`. Geometric ops keep the dtype.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import PIL.Image
import PIL.ImageOps
from scipy import ndimage

from mmjax.data.pp.registry import Example, bad, field, record_name, register

_RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "area": PIL.Image.Resampling.BOX,
}
_PIL_MODE = {1: "L", 3: "RGB", 4: "RGBA"}


def get_image(example: Example, key: str) -> np.ndarray:
  """The (H, W, C) image array in `example[key]`, or a TypeError naming record and field."""
  x = field(example, key)
  if not isinstance(x, np.ndarray) or x.ndim != 3:
    what = type(x).__name__ if not isinstance(x, np.ndarray) else f"shape {x.shape}"
    raise TypeError(f"{record_name(example)}: field {key!r}: expected an (H, W, C) image array, "
                    f"got {what}; put image.decode first")
  return x


def _size(size) -> tuple[int, int]:
  """(h, w) from an int or a pair."""
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _cast_like(x: np.ndarray, like: np.ndarray) -> np.ndarray:
  """Casts float results back to `like`'s dtype, rounding and clipping for integer images."""
  if np.issubdtype(like.dtype, np.integer):
    info = np.iinfo(like.dtype)
    return np.clip(np.rint(x), info.min, info.max).astype(like.dtype)
  return x.astype(like.dtype)


@register("image.decode")
@dataclasses.dataclass
class Decode:
  """Decodes PNG/JPEG bytes to a uint8 (H, W, channels) array; already-decoded arrays pass through.

  Encoded images are turned upright by their EXIF orientation (as viewers display phone photos),
  and 16-bit greyscale is scaled to 8 bits.

  Attributes:
    channels: 1 (grey), 3 (RGB) or 4 (RGBA).
    key: field holding the bytes (or an (H, W) / (H, W, C) uint8 array).
    outkey: field to write; defaults to `key`.
  """

  channels: int = 3
  key: str = "image"
  outkey: str | None = None

  def __post_init__(self):
    if self.channels not in _PIL_MODE:
      raise ValueError(f"image.decode: channels must be 1, 3 or 4, got {self.channels}")

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = field(example, self.key)
    if isinstance(x, np.ndarray) and x.dtype == object and x.ndim == 0:
      x = x.item()
    if isinstance(x, (bytes, np.bytes_)):
      if not x:
        raise bad(example, self.key, "image bytes are empty")
      try:
        img = PIL.Image.open(io.BytesIO(x))
        img.load()
        PIL.ImageOps.exif_transpose(img, in_place=True)
      except (OSError, SyntaxError, ValueError) as e:
        raise bad(example, self.key, f"cannot decode image bytes ({e})") from None
      if img.mode.startswith("I;16") or img.mode == "I":
        # PIL's convert clips 16-bit values to 255 instead of scaling them.
        img = PIL.Image.fromarray(np.clip(np.rint(np.asarray(img) / 257), 0, 255).astype(np.uint8))
    elif isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim in (2, 3):
      if x.ndim == 3 and x.shape[-1] not in _PIL_MODE:
        raise TypeError(f"{record_name(example)}: field {self.key!r}: image has {x.shape[-1]} "
                        "channels; expected 1, 3 or 4")
      img = PIL.Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x)
    else:
      what = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
      raise TypeError(f"{record_name(example)}: field {self.key!r}: expected encoded image bytes "
                      f"or a uint8 image array, got {what}")
    out = np.asarray(img.convert(_PIL_MODE[self.channels]))
    return {**example, self.outkey or self.key: out.reshape(out.shape[:2] + (self.channels,))}


@register("image.resize")
@dataclasses.dataclass
class Resize:
  """Resizes to `size` with PIL (antialiased when shrinking), channel by channel, keeping dtype.

  Attributes:
    size: int (square) or (height, width).
    method: nearest, bilinear, bicubic, lanczos or area.
  """

  size: int | tuple[int, int]
  method: str = "bilinear"
  key: str = "image"
  outkey: str | None = None

  def __post_init__(self):
    self.size = _size(self.size)
    if self.method not in _RESAMPLE:
      raise ValueError(f"image.resize: method must be one of {sorted(_RESAMPLE)}, got {self.method!r}")

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = get_image(example, self.key)
    h, w = self.size
    if x.shape[:2] == (h, w):
      return {**example, self.outkey or self.key: x}
    mode = "L" if x.dtype == np.uint8 else "F"
    src = x if x.dtype == np.uint8 else x.astype(np.float32)
    chans = [np.asarray(PIL.Image.fromarray(np.ascontiguousarray(src[..., c]), mode=mode)
                        .resize((w, h), _RESAMPLE[self.method])) for c in range(x.shape[-1])]
    out = _cast_like(np.stack(chans, axis=-1), x)
    return {**example, self.outkey or self.key: out}


@register("image.value_range")
@dataclasses.dataclass
class ValueRange:
  """Maps values linearly from [in_min, in_max] to [vmin, vmax] as float32 (e.g. uint8 -> [-1, 1]).

  Attributes:
    clip_values: clip the result to [vmin, vmax].
  """

  vmin: float = -1.0
  vmax: float = 1.0
  in_min: float = 0.0
  in_max: float = 255.0
  clip_values: bool = False
  key: str = "image"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = field(example, self.key)
    if isinstance(x, (bytes, str)):
      raise TypeError(f"{record_name(example)}: field {self.key!r}: expected a numeric array, got "
                      f"{type(x).__name__}; put image.decode first")
    x = (np.asarray(x, np.float32) - self.in_min) / (self.in_max - self.in_min)
    x = (self.vmin + x * (self.vmax - self.vmin)).astype(np.float32)
    if self.clip_values:
      x = np.clip(x, self.vmin, self.vmax)
    return {**example, self.outkey or self.key: x}


@register("image.normalize")
@dataclasses.dataclass
class Normalize:
  """(x - mean) / std per channel as float32, in the image's current value scale.

  Attributes:
    mean: a scalar or one value per channel (e.g. ImageNet's after value_range(0, 1)).
    std: likewise.
  """

  mean: float | tuple[float, ...] = (0.485, 0.456, 0.406)
  std: float | tuple[float, ...] = (0.229, 0.224, 0.225)
  key: str = "image"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = get_image(example, self.key).astype(np.float32)
    mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
    for name, v in (("mean", mean), ("std", std)):
      if v.ndim and v.shape != (x.shape[-1],):
        raise ValueError(f"{record_name(example)}: field {self.key!r}: image.normalize {name} has "
                         f"{v.shape[0]} values for an image with {x.shape[-1]} channels")
    return {**example, self.outkey or self.key: (x - mean) / std}


def _crop(example: Example, key: str, x: np.ndarray, size: tuple[int, int], top: int | None,
          left: int | None) -> np.ndarray:
  """Crops `size` at (top, left); None means centred."""
  h, w = size
  if x.shape[0] < h or x.shape[1] < w:
    raise bad(example, key, f"image of shape {x.shape} is smaller than the crop {size}")
  top = (x.shape[0] - h) // 2 if top is None else top
  left = (x.shape[1] - w) // 2 if left is None else left
  return x[top:top + h, left:left + w]


@register("image.random_crop")
@dataclasses.dataclass
class RandomCrop:
  """Crops `size` (int or (h, w)) at a uniformly random position."""

  size: int | tuple[int, int]
  key: str = "image"
  outkey: str | None = None

  def __post_init__(self):
    self.size = _size(self.size)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = get_image(example, self.key)
    top = int(rng.integers(0, max(x.shape[0] - self.size[0], 0) + 1))
    left = int(rng.integers(0, max(x.shape[1] - self.size[1], 0) + 1))
    return {**example, self.outkey or self.key: _crop(example, self.key, x, self.size, top, left)}


@register("image.central_crop")
@dataclasses.dataclass
class CentralCrop:
  """Crops `size` (int or (h, w)) from the centre: the evaluation twin of random_crop."""

  size: int | tuple[int, int]
  key: str = "image"
  outkey: str | None = None

  def __post_init__(self):
    self.size = _size(self.size)

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = get_image(example, self.key)
    return {**example, self.outkey or self.key: _crop(example, self.key, x, self.size, None, None)}


@register("image.flip_lr")
@dataclasses.dataclass
class FlipLr:
  """Mirrors left-right with probability p (only for labels that a mirror leaves true)."""

  p: float = 0.5
  key: str = "image"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = get_image(example, self.key)
    if rng.random() < self.p:
      x = np.ascontiguousarray(x[:, ::-1])
    return {**example, self.outkey or self.key: x}


@register("image.rotate")
@dataclasses.dataclass
class Rotate:
  """Rotates counter-clockwise about the centre by an angle drawn from U(-degrees, degrees).

  Attributes:
    degrees: the largest rotation, in degrees.
    fill: value for pixels rotated in from outside the image.
    order: spline interpolation order (0 nearest, 1 bilinear).
  """

  degrees: float = 10.0
  fill: float = 0.0
  order: int = 1
  key: str = "image"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = get_image(example, self.key)
    angle = rng.uniform(-self.degrees, self.degrees)
    out = ndimage.rotate(x.astype(np.float32), angle, axes=(1, 0), reshape=False, order=self.order,
                         mode="constant", cval=self.fill)
    return {**example, self.outkey or self.key: _cast_like(out, x)}


def luma(x: np.ndarray) -> np.ndarray:
  """ITU-R 601-2 luma (PIL's 'L' conversion) of an (H, W, 3) image, as (H, W, 1)."""
  return (x[..., :3] @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]


@register("image.color_jitter")
@dataclasses.dataclass
class ColorJitter:
  """Random brightness, contrast and saturation, in that order (torchvision/PIL semantics).

  Each factor is drawn from U(max(0, 1 - s), 1 + s) for strength s (0 disables it): brightness
  scales the image, contrast blends it with its mean grey level, saturation blends each pixel with
  its grey level; the result is clipped to the valid range after each step. Expects uint8 images
  or floats in [0, 1] (apply it before value_range); keeps the dtype.
  """

  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  key: str = "image"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = get_image(example, self.key)
    top = 255.0 if x.dtype == np.uint8 else 1.0
    factors = [rng.uniform(max(0.0, 1 - s), 1 + s) if s > 0 else 1.0
               for s in (self.brightness, self.contrast, self.saturation)]
    y = x.astype(np.float32)
    c = slice(0, 3) if y.shape[-1] >= 3 else slice(None)  # colour channels (alpha untouched)
    y[..., c] = np.clip(y[..., c] * factors[0], 0, top)
    mean = (luma(y) if y.shape[-1] >= 3 else y).mean()
    y[..., c] = np.clip(mean + factors[1] * (y[..., c] - mean), 0, top)
    if y.shape[-1] >= 3:
      grey = luma(y)
      y[..., c] = np.clip(grey + factors[2] * (y[..., c] - grey), 0, top)
    return {**example, self.outkey or self.key: _cast_like(y, x)}
