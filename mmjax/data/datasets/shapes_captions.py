"""Shapes captions: scenes of coloured shapes with English captions built from the scene graph.

Scenes come from `mmjax.data.scenes` (six objects with unique colours, squares and circles,
75x75), drawn with this data set's own seeds. Each image has `CAPTIONS_PER_IMAGE` reference
captions, one of each kind below (in this order), each from a template picked at random:

- count:    how many squares and circles ("two squares and four circles on a white background");
- position: the image quarter of a random object ("a red circle in the top left of the image");
- relation: twice, a random ordered pair (a, b) and where a lies relative to b, on the axis of
            their larger offset (ties go to the horizontal axis): "to the left of" / "to the
            right of" (x), "above" / "below" (y, row 0 at the top)
            ("a red circle to the left of a blue square");
- closest:  a random object and its nearest other object (unique by construction).

An object is "<colour> <shape>", after "a" or "an" as English wants; "left"/"top" mean
centre x/y < image_size / 2. Captions are lower case without final punctuation. Splits:
train 9,800 and test 200 images.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmjax.data import datasets, scenes
from mmjax.data import tokenizer as tokenizer_lib

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerFast

CAPTION_KINDS = ("count", "position", "relation", "relation", "closest")
CAPTIONS_PER_IMAGE = len(CAPTION_KINDS)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")

TEMPLATES: dict[str, tuple[str, ...]] = {
  "count": (
    "{squares} and {circles} on a white background",
    "a white image with {squares} and {circles}",
    "{total} shapes: {squares} and {circles}",
  ),
  "position": (
    "{ia} in the {vertical} {horizontal} of the image",
    "the {a} is in the {vertical} {horizontal} part of the picture",
    "there is {ia} at the {vertical} {horizontal}",
  ),
  "relation": (
    "{ia} {relation} {ib}",
    "there is {ia} {relation} {ib}",
    "the {a} is {relation} the {b}",
  ),
  "closest": (
    "the {a} is closest to the {b}",
    "the {b} is the nearest shape to the {a}",
    "the shape nearest to the {a} is {ib}",
  ),
}

_SPLIT_SEEDS = {"train": 31070, "test": 31071}


def _name(scene: scenes.Scene, i: int) -> str:
  """'<colour> <shape>' of object `i`."""
  return f"{scenes.COLORS[scene.colors[i]]} {scenes.SHAPES[scene.shapes[i]]}"


def _indefinite(name: str) -> str:
  """'a red circle', 'an orange square'."""
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _number(n: int, noun: str) -> str:
  """'no squares', 'one square', 'two squares', ..."""
  return f"{NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def relation(scene: scenes.Scene, a: int, b: int) -> str:
  """Where object `a` lies relative to object `b` (see the module docstring)."""
  dx = int(scene.xs[a] - scene.xs[b])
  dy = int(scene.ys[a] - scene.ys[b])
  if abs(dx) >= abs(dy):
    return "to the left of" if dx < 0 else "to the right of"
  return "above" if dy < 0 else "below"


def make_captions(scene: scenes.Scene, rng: np.random.Generator) -> list[str]:
  """The `CAPTIONS_PER_IMAGE` captions of one scene."""
  n = len(scene.colors)
  half = scene.image_size / 2
  captions = []
  for kind in CAPTION_KINDS:
    choices = TEMPLATES[kind]
    template = choices[int(rng.integers(len(choices)))]
    if kind == "count":
      squares = int((scene.shapes == scenes.SQUARE).sum())
      fields = dict(squares=_number(squares, "square"), circles=_number(n - squares, "circle"),
                    total=NUMBER_WORDS[n])
    elif kind == "position":
      a = int(rng.integers(n))
      fields = dict(a=_name(scene, a),
                    vertical="top" if scene.ys[a] < half else "bottom",
                    horizontal="left" if scene.xs[a] < half else "right")
    elif kind == "relation":
      a, b = (int(i) for i in rng.choice(n, size=2, replace=False))
      fields = dict(a=_name(scene, a), b=_name(scene, b), relation=relation(scene, a, b))
    else:
      a = int(rng.integers(n))
      fields = dict(a=_name(scene, a), b=_name(scene, int(scene.closest()[a])))
    fields.update({f"i{k}": _indefinite(fields[k]) for k in ("a", "b") if k in fields})
    captions.append(template.format(**fields))
  return captions


def generate_example(split: str, index: int) -> dict[str, Any]:
  """Record `index` of `split`: PNG image, its captions and the scene metadata."""
  if split not in _SPLIT_SEEDS:
    raise ValueError(f"split must be one of {sorted(_SPLIT_SEEDS)}, got {split!r}")
  rng = scenes.scene_rng(_SPLIT_SEEDS[split], index)
  scene = scenes.sample_scene(rng)
  return dict(
    index=index,
    image=scenes.encode_png(scenes.render(scene)),
    captions=make_captions(scene, rng),
    colors=scene.colors.astype(np.int32),
    shapes=scene.shapes.astype(np.int32),
    xs=scene.xs.astype(np.int32),
    ys=scene.ys.astype(np.int32),
  )


@dataclasses.dataclass
class ShapesCaptionsConfig(tfds.core.BuilderConfig):
  """Builder config; `num_images` sets the images per split (smaller ones for tests).

  Attributes:
    num_images: (split, count) pairs.
  """

  num_images: tuple[tuple[str, int], ...] = (("train", 9800), ("test", 200))


def sized_config(num_images) -> ShapesCaptionsConfig | None:
  """The config of a data set with `num_images` (train, test) images, as a task's
  `data.num_images` gives them; None (the default sizes) when `num_images` is empty."""
  return datasets.sized_config(ShapesCaptionsConfig, ("train", "test"), num_images)


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of shapes captions; one record per image with its reference captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ShapesCaptionsConfig(name="default", description="9,800/200 images.")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file (TFDS's own lookup needs the `importlib_resources` backport)."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    """Feature spec."""
    size = scenes.IMAGE_SIZE
    n = len(scenes.COLORS)

    def ints(doc: str) -> tfds.features.Tensor:
      return tfds.features.Tensor(shape=(n,), dtype=np.int32, doc=doc)

    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(np.int32, doc="Image index within its split."),
        "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
        "captions": tfds.features.Sequence(tfds.features.Text(), length=CAPTIONS_PER_IMAGE),
        "colors": ints(f"Object colours, index into {scenes.COLORS}."),
        "shapes": ints(f"Object shapes, index into {scenes.SHAPES}."),
        "xs": ints("Object centre columns (pixels)."),
        "ys": ints("Object centre rows (pixels, 0 at the top)."),
      }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """One generator per configured split."""
    del dl_manager  # Nothing to download.
    self.train_text = []
    return {split: self._generate_examples(split, n) for split, n in self.builder_config.num_images}

  def _generate_examples(self, split: str, num_images: int) -> Iterator[tuple[int, dict]]:
    """Yields (key, record) for the images of `split`, keeping the train captions."""
    for index in range(num_images):
      record = generate_example(split, index)
      if split == "train":
        self.train_text.extend(record["captions"])
      yield index, record


def builder(
  data_dir: str | os.PathLike | None = None, config: ShapesCaptionsConfig | str | None = None
) -> ShapesCaptions:
  """The builder under `data_dir` (default: `default_data_dir()`), array_record format."""
  return ShapesCaptions(
    data_dir=str(datasets.default_data_dir(data_dir)), config=config, file_format="array_record"
  )


def prepare(
  data_dir: str | os.PathLike | None = None, config: ShapesCaptionsConfig | str | None = None
) -> ShapesCaptions:
  """The builder, with the data set and its tokenizer generated if missing (progress bars)."""
  return datasets.prepare(builder(data_dir, config), text_key="captions")


def load(
  split: str,
  data_dir: str | os.PathLike | None = None,
  *,
  config: ShapesCaptionsConfig | str | None = None,
):
  """Random-access source (TFDS `ArrayRecordDataSource`) of `split`, building it on first use.

  Records decode to: index () int, image (75, 75, 3) uint8, captions list of 5 bytes,
  colors/shapes/xs/ys (6,) int32.
  """
  return prepare(data_dir, config).as_data_source(split)


def load_tokenizer(
  data_dir: str | os.PathLike | None = None, *, config: ShapesCaptionsConfig | str | None = None
) -> PreTrainedTokenizerFast:
  """The WordPiece tokenizer trained on the train captions (`tokenizer.json` beside the data)."""
  path = prepare(data_dir, config).data_path / tokenizer_lib.TOKENIZER_FILE
  return tokenizer_lib.load_tokenizer(path)
