"""Sort-of-CLEVR (Santoro et al. 2017, arXiv 1706.01427, appendix D) with English questions.

Each image (see `mmjax.data.scenes`) comes with 10 non-relational and 10 relational questions,
drawn as in the public generator (kimhc6028/relational-networks): each question picks a colour
uniformly and a subtype uniformly within its kind, with replacement.

| subtype | kind | asks | answer |
|---|---|---|---|
| 0 shape      | non-relational | shape of the <colour> object | square / circle |
| 1 horizontal | non-relational | is the <colour> object on the left? | yes iff x < 75 / 2 |
| 2 vertical   | non-relational | is the <colour> object at the top?  | yes iff y < 75 / 2 |
| 3 closest    | relational | shape of the object closest to the <colour> one | square / circle |
| 4 furthest   | relational | shape of the object furthest from the <colour> one | square / circle |
| 5 count      | relational | number of objects with the <colour> one's shape, itself included | 1..6 |

The public code asks the position questions as yes/no ("left?", "up?"), so do we. Answers are
indices into `ANSWERS` (the paper's 10 answers, 'rectangle' called 'square'). The original
11-dim one-hot question (6 colours, 2 kinds, 3 subtypes within the kind) is kept as
`question_onehot`. Sentences come from several templates per subtype (`TEMPLATES`), used by
the train and test splits; the `paraphrase` test split uses `PARAPHRASE_TEMPLATES`, whose
wording no training template uses, on fresh images.

Splits: train 9,800, test 200, paraphrase 200 images, each with its own seed.
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

ANSWERS = ("yes", "no", "square", "circle", "1", "2", "3", "4", "5", "6")
YES, NO, SQUARE, CIRCLE = 0, 1, 2, 3
COUNT_OFFSET = 3  # answer index of count n is n + 3
KINDS = ("non_relational", "relational")
NON_RELATIONAL, RELATIONAL = 0, 1
SUBTYPES = ("shape", "horizontal", "vertical", "closest", "furthest", "count")
QUESTIONS_PER_KIND = 10
QUESTION_DIM = len(scenes.COLORS) + len(KINDS) + 3

TEMPLATES: dict[str, tuple[str, ...]] = {
  "shape": (
    "What shape is the {color} object?",
    "What is the shape of the {color} object?",
    "Is the {color} object a square or a circle?",
  ),
  "horizontal": (
    "Is the {color} object on the left?",
    "Is the {color} object on the left side of the image?",
    "Is the {color} object in the left half of the image?",
  ),
  "vertical": (
    "Is the {color} object at the top?",
    "Is the {color} object on the top side of the image?",
    "Is the {color} object in the top half of the image?",
  ),
  "closest": (
    "What shape is the object closest to the {color} object?",
    "What is the shape of the object that is closest to the {color} object?",
    "Is the object closest to the {color} object a square or a circle?",
  ),
  "furthest": (
    "What shape is the object furthest from the {color} object?",
    "What is the shape of the object that is furthest from the {color} object?",
    "Is the object furthest from the {color} object a square or a circle?",
  ),
  "count": (
    "How many objects have the same shape as the {color} object?",
    "What is the number of objects with the same shape as the {color} object?",
    "How many objects are the same shape as the {color} object?",
  ),
}

PARAPHRASE_TEMPLATES: dict[str, tuple[str, ...]] = {
  "shape": (
    "Which form does the {color} thing have?",
    "Is the {color} item shaped like a square or like a circle?",
  ),
  "horizontal": (
    "Does the {color} thing lie toward the left edge?",
    "Is the {color} item left of centre?",
  ),
  "vertical": (
    "Does the {color} thing lie near the upper edge?",
    "Is the {color} item above the middle?",
  ),
  "closest": (
    "Which shape is the thing nearest to the {color} one?",
    "Name the form of the item nearest the {color} one.",
  ),
  "furthest": (
    "Which shape is the thing farthest from the {color} one?",
    "Name the form of the item farthest from the {color} one.",
  ),
  "count": (
    "How many things match the {color} one in form?",
    "How many items are shaped like the {color} one, including it?",
  ),
}

_SPLIT_SEEDS = {"train": 17060, "test": 17061, "paraphrase": 17062}
_TEMPLATES_OF_SPLIT = {"train": TEMPLATES, "test": TEMPLATES, "paraphrase": PARAPHRASE_TEMPLATES}


def answer_table(scene: scenes.Scene) -> np.ndarray:
  """(N, 6) int: `[c, t]` is the index into `ANSWERS` of subtype `t` asked about colour `c`."""
  order = np.argsort(scene.colors)  # object of each colour
  shape_answer = np.where(scene.shapes == scenes.SQUARE, SQUARE, CIRCLE)
  half = scene.image_size / 2
  count = (scene.shapes[:, None] == scene.shapes[None, :]).sum(axis=1)
  table = np.stack(
    [
      shape_answer,
      np.where(scene.xs < half, YES, NO),
      np.where(scene.ys < half, YES, NO),
      shape_answer[scene.closest()],
      shape_answer[scene.furthest()],
      count + COUNT_OFFSET,
    ],
    axis=1,
  )
  return table[order]


def question_onehot(colors: np.ndarray, subtypes: np.ndarray) -> np.ndarray:
  """(Q, 11) float32 encoding of the public code: colour, kind and in-kind subtype one-hots."""
  n = len(scenes.COLORS)
  q = np.zeros((len(colors), QUESTION_DIM), np.float32)
  rows = np.arange(len(colors))
  q[rows, colors] = 1.0
  q[rows, n + subtypes // 3] = 1.0
  q[rows, n + len(KINDS) + subtypes % 3] = 1.0
  return q


def make_questions(
  scene: scenes.Scene, rng: np.random.Generator, templates: dict[str, tuple[str, ...]]
) -> dict[str, Any]:
  """The 20 questions of one image: 10 non-relational, then 10 relational."""
  shape = (len(KINDS), QUESTIONS_PER_KIND)
  colors = rng.integers(len(scenes.COLORS), size=shape).ravel()
  kinds = np.repeat(np.arange(len(KINDS)), QUESTIONS_PER_KIND)
  subtypes = 3 * kinds + rng.integers(3, size=shape).ravel()
  picks = rng.random(shape).ravel()
  questions = []
  for color, subtype, pick in zip(colors, subtypes, picks):
    choices = templates[SUBTYPES[subtype]]
    template = choices[int(pick * len(choices))]
    questions.append(template.format(color=scenes.COLORS[color]))
  return dict(
    questions=questions,
    question_onehot=question_onehot(colors, subtypes),
    answers=answer_table(scene)[colors, subtypes].astype(np.int32),
    kinds=kinds.astype(np.int32),
    subtypes=subtypes.astype(np.int32),
    question_colors=colors.astype(np.int32),
  )


def generate_example(split: str, index: int) -> dict[str, Any]:
  """Record `index` of `split`: PNG image, its 20 questions and the scene metadata."""
  if split not in _SPLIT_SEEDS:
    raise ValueError(f"split must be one of {sorted(_SPLIT_SEEDS)}, got {split!r}")
  rng = scenes.scene_rng(_SPLIT_SEEDS[split], index)
  scene = scenes.sample_scene(rng)
  record = dict(
    index=index,
    image=scenes.encode_png(scenes.render(scene)),
    colors=scene.colors.astype(np.int32),
    shapes=scene.shapes.astype(np.int32),
    xs=scene.xs.astype(np.int32),
    ys=scene.ys.astype(np.int32),
  )
  record.update(make_questions(scene, rng, _TEMPLATES_OF_SPLIT[split]))
  return record


@dataclasses.dataclass
class SortOfClevrConfig(tfds.core.BuilderConfig):
  """Builder config; `num_images` sets the images per split (smaller ones for tests).

  Attributes:
    num_images: (split, count) pairs.
  """

  num_images: tuple[tuple[str, int], ...] = (("train", 9800), ("test", 200), ("paraphrase", 200))


def sized_config(num_images) -> SortOfClevrConfig | None:
  """The config of a data set with `num_images` (train, test, paraphrase) images, as a task's
  `data.num_images` gives them; None (the default sizes) when `num_images` is empty."""
  return datasets.sized_config(SortOfClevrConfig, ("train", "test", "paraphrase"), num_images)


class SortOfClevr(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of Sort-of-CLEVR; one record per image with its 20 questions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [SortOfClevrConfig(name="default", description="9,800/200/200 images.")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file (TFDS's own lookup needs the `importlib_resources` backport)."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    """Feature spec."""
    size = scenes.IMAGE_SIZE
    q = 2 * QUESTIONS_PER_KIND
    n = len(scenes.COLORS)

    def ints(length: int, doc: str) -> tfds.features.Tensor:
      return tfds.features.Tensor(shape=(length,), dtype=np.int32, doc=doc)

    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(np.int32, doc="Image index within its split."),
        "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
        "questions": tfds.features.Sequence(tfds.features.Text(), length=q),
        "question_onehot": tfds.features.Tensor(
          shape=(q, QUESTION_DIM), dtype=np.float32, doc="Public code's 11-dim encoding."
        ),
        "answers": ints(q, f"Index into {ANSWERS}."),
        "kinds": ints(q, f"Index into {KINDS}."),
        "subtypes": ints(q, f"Index into {SUBTYPES}."),
        "question_colors": ints(q, f"Colour the question names, index into {scenes.COLORS}."),
        "colors": ints(n, f"Object colours, index into {scenes.COLORS}."),
        "shapes": ints(n, f"Object shapes, index into {scenes.SHAPES}."),
        "xs": ints(n, "Object centre columns (pixels)."),
        "ys": ints(n, "Object centre rows (pixels, 0 at the top)."),
      }),
      homepage="https://arxiv.org/abs/1706.01427",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """One generator per configured split."""
    del dl_manager  # Nothing to download.
    self.train_text = []
    return {split: self._generate_examples(split, n) for split, n in self.builder_config.num_images}

  def _generate_examples(self, split: str, num_images: int) -> Iterator[tuple[int, dict]]:
    """Yields (key, record) for the images of `split`, keeping the train questions."""
    for index in range(num_images):
      record = generate_example(split, index)
      if split == "train":
        self.train_text.extend(record["questions"])
      yield index, record


def builder(
  data_dir: str | os.PathLike | None = None, config: SortOfClevrConfig | str | None = None
) -> SortOfClevr:
  """The builder under `data_dir` (default: `default_data_dir()`), array_record format."""
  return SortOfClevr(
    data_dir=str(datasets.default_data_dir(data_dir)), config=config, file_format="array_record"
  )


def prepare(
  data_dir: str | os.PathLike | None = None, config: SortOfClevrConfig | str | None = None
) -> SortOfClevr:
  """The builder, with the data set and its tokenizer generated if missing (progress bars)."""
  return datasets.prepare(builder(data_dir, config), text_key="questions")


def load(
  split: str,
  data_dir: str | os.PathLike | None = None,
  *,
  config: SortOfClevrConfig | str | None = None,
):
  """Random-access source (TFDS `ArrayRecordDataSource`) of `split`, building it on first use.

  Records decode to: index () int, image (75, 75, 3) uint8, questions list of 20 bytes,
  question_onehot (20, 11) float32, answers/kinds/subtypes/question_colors (20,) int32,
  colors/shapes/xs/ys (6,) int32.
  """
  return prepare(data_dir, config).as_data_source(split)


def load_tokenizer(
  data_dir: str | os.PathLike | None = None, *, config: SortOfClevrConfig | str | None = None
) -> PreTrainedTokenizerFast:
  """The WordPiece tokenizer trained on the train questions (`tokenizer.json` beside the data)."""
  path = prepare(data_dir, config).data_path / tokenizer_lib.TOKENIZER_FILE
  return tokenizer_lib.load_tokenizer(path)
