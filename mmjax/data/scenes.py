"""Sort-of-CLEVR scenes: six coloured squares and circles on a white 75x75 canvas.

Faithful to Santoro et al. 2017 (arXiv 1706.01427, appendix D) and to the public generator
(kimhc6028/relational-networks, `sort_of_clevr_generator.py`):

- one object per colour, in the fixed colour order red, green, blue, orange, gray, yellow;
- each object is a square or a circle with probability 1/2, half-width `size` = 5 px, so a
  square covers the 11x11 pixels `[x - 5, x + 5] x [y - 5, y + 5]` and a circle the pixels with
  `dx**2 + dy**2 <= size * (size + 1)` (i.e. `< (size + 0.5) ** 2`) inside that box;
- centres are drawn uniformly from `{size, ..., image_size - size - 1}` per axis (the public
  code's `randint(size, image_size - size)`), x = column, y = row (row 0 at the top).

Placement rule. The public code redraws a centre while its squared Euclidean distance to any
placed centre is `< (2 * size) ** 2`, which still lets two squares overlap diagonally (or share a
pixel column at distance exactly 10). Here a centre is redrawn while its Chebyshev distance to
any placed centre is `< 2 * size + 2`: the objects' 11x11 boxes are then at least one white
pixel apart, so objects never overlap or touch, and the public rule holds a fortiori.
A whole scene is redrawn if some object's nearest or furthest other object is tied in squared
distance, so that "closest"/"furthest" questions have one answer (the public code silently took
the first object in colour order).

Every draw uses the `numpy.random.Generator` passed in; `scene_rng(seed, index)` makes the
generator of image `index` of a split from the split's seed, so an image does not depend on how
many images are generated nor in which order.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

COLORS = ("red", "green", "blue", "orange", "gray", "yellow")
# RGB values of the public generator (it draws in OpenCV's BGR order).
COLOR_RGB = np.array(
  [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 156, 0), (128, 128, 128), (255, 255, 0)],
  dtype=np.uint8,
)
SHAPES = ("square", "circle")
SQUARE, CIRCLE = 0, 1
IMAGE_SIZE = 75
OBJECT_SIZE = 5


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
  """Metadata of one scene; object `i` has colour `colors[i]` (always `i` here).

  Attributes:
    colors: (N,) int, index into `COLORS`.
    shapes: (N,) int, index into `SHAPES`.
    xs: (N,) int, centre column in pixels.
    ys: (N,) int, centre row in pixels (0 at the top).
    image_size: side of the square canvas in pixels.
    size: object half-width in pixels.
  """

  colors: np.ndarray
  shapes: np.ndarray
  xs: np.ndarray
  ys: np.ndarray
  image_size: int = IMAGE_SIZE
  size: int = OBJECT_SIZE

  def squared_distances(self) -> np.ndarray:
    """(N, N) int squared Euclidean distances between centres."""
    dx = self.xs[:, None] - self.xs[None, :]
    dy = self.ys[:, None] - self.ys[None, :]
    return dx * dx + dy * dy

  def closest(self) -> np.ndarray:
    """(N,) index of each object's nearest other object."""
    d = self.squared_distances().astype(np.float64)
    np.fill_diagonal(d, np.inf)
    return d.argmin(axis=1)

  def furthest(self) -> np.ndarray:
    """(N,) index of each object's furthest object."""
    return self.squared_distances().argmax(axis=1)


def scene_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of image `index` in a split with seed `seed`."""
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
  return np.random.default_rng([seed, index])


def _has_ties(xs: np.ndarray, ys: np.ndarray) -> bool:
  """Whether some object's nearest or furthest other object is not unique."""
  d = (xs[:, None] - xs[None, :]) ** 2 + (ys[:, None] - ys[None, :]) ** 2
  n = len(xs)
  off = d[~np.eye(n, dtype=bool)].reshape(n, n - 1)
  lo = off.min(axis=1, keepdims=True)
  hi = off.max(axis=1, keepdims=True)
  return bool(((off == lo).sum(axis=1) > 1).any() or ((off == hi).sum(axis=1) > 1).any())


def sample_scene(
  rng: np.random.Generator,
  *,
  num_objects: int = len(COLORS),
  image_size: int = IMAGE_SIZE,
  size: int = OBJECT_SIZE,
) -> Scene:
  """Draws one scene (see the module docstring for the rules)."""
  if not 2 <= num_objects <= len(COLORS):
    raise ValueError(f"num_objects must be in [2, {len(COLORS)}], got {num_objects}")
  gap = 2 * size + 2
  while True:
    centres = []
    shapes = []
    for _ in range(num_objects):
      while True:
        c = rng.integers(size, image_size - size, size=2)
        if all(max(abs(c[0] - p[0]), abs(c[1] - p[1])) >= gap for p in centres):
          break
      centres.append(c)
      shapes.append(CIRCLE if rng.random() >= 0.5 else SQUARE)
    xy = np.array(centres, dtype=np.int64)
    if not _has_ties(xy[:, 0], xy[:, 1]):
      return Scene(
        colors=np.arange(num_objects, dtype=np.int64),
        shapes=np.array(shapes, dtype=np.int64),
        xs=xy[:, 0],
        ys=xy[:, 1],
        image_size=image_size,
        size=size,
      )


def object_masks(scene: Scene) -> np.ndarray:
  """(N, H, W) bool pixel masks of the objects."""
  s = scene.image_size
  rows = np.arange(s)[None, :, None]  # (1, H, 1)
  cols = np.arange(s)[None, None, :]  # (1, 1, W)
  dy = rows - scene.ys[:, None, None]
  dx = cols - scene.xs[:, None, None]
  box = (np.abs(dx) <= scene.size) & (np.abs(dy) <= scene.size)  # (N, H, W)
  disc = dx * dx + dy * dy <= scene.size * (scene.size + 1)
  is_circle = (scene.shapes == CIRCLE)[:, None, None]
  return np.where(is_circle, disc & box, box)


def render(scene: Scene) -> np.ndarray:
  """(H, W, 3) uint8 RGB image: white background, objects in their colours."""
  image = np.full((scene.image_size, scene.image_size, 3), 255, dtype=np.uint8)
  for mask, color in zip(object_masks(scene), scene.colors):
    image[mask] = COLOR_RGB[color]
  return image


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of an (H, W, 3) uint8 image (deterministic for a given zlib)."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  """(H, W, 3) uint8 RGB pixels of PNG `data`."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))
