"""Figures: attention over images, VQA attention, training curves, confusion matrices, captions, bars.

Every function builds a `matplotlib.figure.Figure` on an Agg canvas (no pyplot, no display, no
global figure registry), returns it, and writes it as a PNG when given `path`.
`figure_to_array(fig)` renders a figure to an (H, W, 3) uint8 array.

VQA attention (`question_image_attention`) is asked of the fusion block: a block with an
`attention_maps` flag (cross_attention, single_stream and their variants) is run with it on and
returns its maps in aux:
- cross_attention (LXMERT): aux["cross_attention"]["text"]["image"] (depth, B, H, N_text,
  N_image), the text stream's cross-attention over the image tokens;
- single_stream (VisualBERT/UNITER): aux["self_attention"]["cls"]["image"], the [CLS] token's
  self-attention over the image tokens.
Both are averaged over heads (and over the real question tokens) and normalised to sum to 1
over the image tokens.
"""

from __future__ import annotations

import contextlib
import math
import os
import textwrap
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmjax import io_paths

DPI = 100


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------
def new_figure(size_px: tuple[int, int], **kwargs: Any) -> Figure:
  """A figure of exactly `size_px` = (height, width) pixels on an Agg canvas."""
  h, w = (int(s) for s in size_px)
  if h < 1 or w < 1:
    raise ValueError(f"size_px: expected positive (height, width), got {size_px}")
  fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, **kwargs)
  FigureCanvasAgg(fig)
  return fig


def figure_to_array(fig: Figure) -> np.ndarray:
  """Renders `fig` to an (H, W, 3) uint8 RGB array."""
  canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
  """Writes `fig` at `path` (a local path or a bucket URL; folders created; the format from its
  suffix, PNG without one) when given; returns it."""
  if path is not None:
    path = io_paths.as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: matplotlib would take a URL for a local name
      fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", dpi=DPI)
  return fig


def _as_image(image: Any, field: str = "image") -> np.ndarray:
  """(H, W, 3) uint8, or float in [0, 1], as an array matplotlib shows as RGB."""
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"{field}: expected an (H, W, 3) RGB image, got shape {array.shape}")
  if array.dtype != np.uint8:
    array = np.clip(array.astype(np.float32), 0.0, 1.0)
  return array


def infer_grid(n: int, image_hw: tuple[int, int]) -> tuple[int, int]:
  """The (h, w) with h * w = n whose aspect ratio is closest to the image's (tokens row-major)."""
  if n < 1:
    raise ValueError(f"n: expected a positive number of image tokens, got {n}")
  target = math.log(image_hw[0] / image_hw[1])
  pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
  return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - target))


# ---------------------------------------------------------------------------------------------
# Attention over an image.
# ---------------------------------------------------------------------------------------------
def attention_over_image(image: Any, attn: Any, grid_hw: tuple[int, int] | None = None, *,
                         alpha: float = 0.5, cmap: str = "jet", size_px: int = 320,
                         title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
  """Overlays attention over an h×w grid of image cells as a heat map on the image.

  Args:
    image: (H, W, 3) uint8, or float in [0, 1].
    attn: (N,) = (h * w,) weights over the grid cells, row-major (as vision encoders order tokens),
      or (K, N): K maps (e.g. one per attention head) drawn side by side, labelled 0..K-1, each
      scaled to its own maximum.
    grid_hw: (h, w); default inferred from N and the image's aspect ratio.
    alpha: opacity of the heat map.
    cmap: matplotlib colour map of the heat map (scaled from 0 to the maximum weight).
    size_px: the longer side of one panel in pixels; a panel has the image's aspect ratio
      and the image fills it (the title, if any, is drawn over the top of the first).
    title: text drawn at the top.
    path: PNG to write.

  Returns:
    The figure.
  """
  image = _as_image(image)
  attn = np.asarray(attn, np.float32)
  H, W = image.shape[:2]
  if attn.ndim not in (1, 2):
    raise ValueError(f"attn: expected shape (N,) or (K, N) over the grid cells, got {attn.shape}")
  maps = attn.reshape(-1, attn.shape[-1])
  n = maps.shape[1]
  h, w = infer_grid(n, (H, W)) if grid_hw is None else (int(grid_hw[0]), int(grid_hw[1]))
  if h * w != n:
    raise ValueError(f"attn: expected {h}×{w} = {h * w} weights for grid_hw={(h, w)}, got {n}")
  scale = size_px / max(H, W)
  k = maps.shape[0]
  fig = new_figure((round(H * scale), round(W * scale) * k))
  extent = (0, W, H, 0)
  for i, m in enumerate(maps):
    ax = fig.add_axes((i / k, 0.0, 1.0 / k, 1.0))
    ax.imshow(image, extent=extent, interpolation="nearest")
    top = float(m.max()) if m.max() > 0 else 1.0
    ax.imshow(m.reshape(h, w), cmap=cmap, alpha=alpha, vmin=0.0, vmax=top, extent=extent,
              interpolation="bilinear")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_axis_off()
    if attn.ndim == 2:
      ax.text(0.02, 0.02, str(i), transform=ax.transAxes, ha="left", va="bottom", fontsize=9,
              bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    if title and i == 0:
      ax.text(0.5 * k, 0.99, title, transform=ax.transAxes, ha="center",
              va="top", fontsize=8, wrap=True, bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
  return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# VQA attention.
# ---------------------------------------------------------------------------------------------
def question_image_attention(model, images: jax.Array, ids: jax.Array, mask: jax.Array, *,
                             layer: int = -1, head: int | str | None = None) -> tuple[jax.Array, jax.Array]:
  """Question-to-image attention of a `VQAModel` whose fusion block has attention maps.

  Traceable (runs under `jax.jit`). The fusion block runs with `attention_maps` on, so its
  attention takes the reference kernel: the logits equal the model's to float32 rounding.

  Args:
    model: a live `mmjax.models.vqa.VQAModel`.
    images: (B, H, W, C) preprocessed images.
    ids, mask: (B, L) question tokens and mask.
    layer: which fusion layer's attention (negative counts from the last).
    head: one attention head's map (negative counts from the last), "all" for every head's, or
      None for the mean over heads. Heads specialise: in a trained colour-question model one
      head of four put most of its attention on the named object while the others looked
      elsewhere, so the mean can miss what one head finds.

  Returns:
    attention (B, N_image), or (B, H, N_image) for head="all", normalised to sum 1 over the image
    tokens, and logits (B, A).
  """
  fusion = model.fusion
  if not hasattr(fusion, "attention_maps"):
    raise ValueError(f"model.fusion: {type(fusion).__name__} has no attention maps over image tokens; "
                     "attention figures support fusion blocks with `attention_maps` "
                     "(cross_attention, single_stream)")
  with _attention_maps(fusion):
    logits, aux = model(images, ids, mask)
  out = aux["fusion"]
  maps = out["cross_attention"] if "cross_attention" in out else out["self_attention"]
  query = "cls" if "cls" in maps else "text"  # the pooled [CLS] row, else the question's tokens
  maps = maps[query]["image"]  # (depth, B, H, N_query, N_image)
  per_token = _heads(maps[_layer_index(layer, maps.shape[0])], head)  # (B, [H,] N_query, N_image)
  if query == "cls":
    query_mask = jnp.ones(per_token.shape[:1] + per_token.shape[-2:-1], per_token.dtype)
  else:
    query_mask = out["masks"]["text"].astype(per_token.dtype)  # (B, N_text)
  query_mask = query_mask.reshape(query_mask.shape[:1] + (1,) * (per_token.ndim - 3) + query_mask.shape[1:])
  attn = ((per_token * query_mask[..., None]).sum(-2)
          / jnp.maximum(query_mask.sum(-1, keepdims=True), 1.0))
  attn = attn / jnp.maximum(attn.sum(-1, keepdims=True), 1e-12)
  return attn, logits


@contextlib.contextmanager
def _attention_maps(fusion):
  """Within the block, `fusion` returns its attention maps; restores its flag on exit."""
  before = fusion.attention_maps
  fusion.attention_maps = True
  try:
    yield
  finally:
    fusion.attention_maps = before


def _heads(weights: jax.Array, head: int | str | None) -> jax.Array:
  """(B, H, ...) attention weights -> (B, ...): head `head`, or the mean over heads when None;
  unchanged for "all"."""
  if head is None:
    return weights.mean(axis=1)
  if isinstance(head, str) and head == "all":
    return weights
  n = weights.shape[1]
  if not isinstance(head, (int, np.integer)) or not -n <= head < n:
    raise ValueError(f"head: expected None, 'all' or an index into {n} attention heads, got {head!r}")
  return weights[:, head % n]


def _layer_index(layer: int, depth: int) -> int:
  if not -depth <= layer < depth:
    raise ValueError(f"layer: expected an index into {depth} fusion layers, got {layer}")
  return layer % depth


def vqa_attention_figure(source, image: Any, question: Any, *, tokenizer=None,
                         preprocess: str = "image.value_range(0, 1)",
                         grid_hw: tuple[int, int] | None = None, layer: int = -1,
                         head: int | str | None = None, resize: bool = False, alpha: float = 0.5, size_px: int = 320,
                         path: str | os.PathLike | None = None) -> Figure:
  """Where the question looks in the image: the fusion block's attention as a heat map.

  Args:
    source: a `mmjax.predict.Predictor` of a VQA workdir (preprocesses like training and titles
      the figure with the predicted answer), or a live `VQAModel`.
    image: with a Predictor, anything `Predictor.answer` takes (preprocessed by its config's eval
      pp string); with a model, an (H, W, 3) uint8 image (preprocessed by `preprocess`) or a float
      image already in the model's input range.
    question: a string (with a model, `tokenizer` is needed), or with a model a pair
      (ids (L,), mask (L,)).
    tokenizer: the question tokenizer, when `source` is a model and `question` a string.
    preprocess: with a model, the pp string of its uint8 image (`mmjax.data.pp`), e.g. its training
      config's `input.pp_eval` (ops on fields other than "image" are skipped).
    grid_hw: the image token grid (h, w); default inferred from the token count.
    layer: fusion layer whose attention is shown.
    head: one attention head (see `question_image_attention`); "all" draws every head's map side
      by side; None shows the mean over heads.
    resize: (Predictor) resize an image of another size.
    alpha, size_px, path: see `attention_over_image`. The image is shown as the model sees it
      (pixel values clipped to [0, 1]).

  Returns:
    The figure.
  """
  from mmjax.data import pp  # pylint: disable=g-import-not-at-top
  from mmjax.predict import Predictor, check_text  # pylint: disable=g-import-not-at-top

  fn = lambda model, im, i, m: question_image_attention(model, im, i, m, layer=layer, head=head)
  if isinstance(source, Predictor):
    images, ids, mask = source.vqa_inputs([image], [question], resize=resize)
    attn, logits = source.run(f"vqa_attention_{layer}_{head}", fn, images, ids, mask)
    probs = np.asarray(jax.nn.softmax(np.asarray(logits[0], np.float32)))
    k = int(np.argmax(probs))
    title = f"Q: {question.strip()}\nA: {source.answers[k]} ({float(probs[k]):.2f})"
  else:
    model = source
    array = np.asarray(image)
    if array.dtype == np.uint8:
      prepare = pp.parse(preprocess, tokenizer=tokenizer)
      array = prepare.partial({"image": array}, np.random.default_rng(0))["image"]
    images = array[None].astype(np.float32)
    if isinstance(question, str):
      if tokenizer is None:
        raise ValueError("tokenizer: needed to encode a string question for a model source")
      encode = pp.parse(f"text.tokenize({model.question_len}, key='question')", tokenizer=tokenizer)
      out = encode({"question": check_text(question)}, np.random.default_rng(0))
      ids, mask = out["question_ids"][None], out["question_mask"][None]
      title = f"Q: {question.strip()}"
    else:
      ids, mask = (np.asarray(a)[None] for a in question)
      title = None
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, *x: fn(nnx.merge(graphdef, st), *x))
    attn, _ = jax.device_get(run(state, images, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)))
  return attention_over_image(images[0], attn[0], grid_hw, alpha=alpha, size_px=size_px, title=title,
                              path=path)


# ---------------------------------------------------------------------------------------------
# Training, classification and captioning figures.
# ---------------------------------------------------------------------------------------------
def training_curves(workdir: str | os.PathLike) -> str:
  """Writes `workdir/curves.png` (training loss and eval metrics) with the trainer's plot; returns its path."""
  from mmjax.train.trainer import plot_curves  # pylint: disable=g-import-not-at-top

  path = plot_curves(os.fspath(workdir))
  if path is None:
    raise FileNotFoundError(f"workdir {os.fspath(workdir)!r}: no metrics to plot "
                            f"(looked for {os.path.join(os.fspath(workdir), 'metrics.jsonl')!r})")
  return path


def confusion_matrix_figure(cm: Any, labels: Sequence[str], *, normalize: bool = False,
                            size_px: tuple[int, int] = (480, 560), title: str | None = None,
                            path: str | os.PathLike | None = None) -> Figure:
  """A confusion matrix with its counts written in the cells.

  Args:
    cm: (K, K) counts, rows = true class, columns = predicted class.
    labels: the K class names.
    normalize: colour (and write) each row as fractions of its total instead of counts.
    size_px: (height, width) of the figure.
    title: axes title.
    path: PNG to write.

  Returns:
    The figure.
  """
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"cm: expected a square (K, K) matrix, got shape {cm.shape}")
  if len(labels) != cm.shape[0]:
    raise ValueError(f"labels: expected {cm.shape[0]} names (one per row of cm), got {len(labels)}")
  if normalize:
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    text = lambda v: f"{v:.2f}"
  else:
    shown = cm
    integral = np.issubdtype(cm.dtype, np.integer) or np.all(np.mod(cm, 1) == 0)
    text = (lambda v: f"{int(v)}") if integral else (lambda v: f"{v:.2f}")
  fig = new_figure(size_px, layout="constrained")
  ax = fig.add_subplot()
  im = ax.imshow(shown, cmap="Blues", vmin=0)
  fig.colorbar(im, ax=ax, fraction=0.046)
  k = cm.shape[0]
  ax.set_xticks(range(k), labels=list(labels), rotation=45, ha="right")
  ax.set_yticks(range(k), labels=list(labels))
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title:
    ax.set_title(title)
  threshold = shown.max() / 2 if shown.size else 0
  for i in range(k):
    for j in range(k):
      ax.text(j, i, text(shown[i, j]), ha="center", va="center", fontsize=8,
              color="white" if shown[i, j] > threshold else "black")
  return _finish(fig, path)


def caption_samples_figure(images: Sequence[Any], captions: Sequence[str], *, cols: int = 4,
                           panel_px: int = 200, path: str | os.PathLike | None = None) -> Figure:
  """A grid of images, each with its caption beneath.

  Args:
    images: N (H, W, 3) images, uint8 or float in [0, 1].
    captions: N strings (e.g. "pred: ... / ref: ...").
    cols: panels per row.
    panel_px: width (and image height) of each panel in pixels; captions get extra room below.
    path: PNG to write.

  Returns:
    The figure, of `ceil(N / cols)` rows.
  """
  if len(images) != len(captions):
    raise ValueError(f"images and captions: expected the same number, got {len(images)} and {len(captions)}")
  if not len(images):
    raise ValueError("images: expected at least one image")
  if cols < 1:
    raise ValueError(f"cols: expected >= 1, got {cols}")
  n = len(images)
  cols = min(cols, n)
  rows = math.ceil(n / cols)
  caption_px = 60
  fig = new_figure((rows * (panel_px + caption_px), cols * panel_px))
  width_chars = max(panel_px // 7, 10)
  for i, (image, caption) in enumerate(zip(images, captions)):
    r, c = divmod(i, cols)
    height = 1.0 / rows
    ax = fig.add_axes((c / cols, 1.0 - (r + 1) * height + caption_px / (panel_px + caption_px) * height,
                       1.0 / cols, panel_px / (panel_px + caption_px) * height))
    ax.imshow(_as_image(image, f"images[{i}]"))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, -0.02, textwrap.fill(str(caption), width_chars), transform=ax.transAxes,
            ha="center", va="top", fontsize=7)
  return _finish(fig, path)


def grouped_bars_figure(values: Mapping[str, Mapping[str, float]], *, ylabel: str = "",
                        title: str | None = None, size_px: tuple[int, int] = (400, 720),
                        path: str | os.PathLike | None = None) -> Figure:
  """A grouped bar chart: one group per outer key, one bar (and legend entry) per inner key.

  Args:
    values: group -> {series: value}, e.g. fusion -> {"both": 0.91, "no image": 0.42}. Every
      group has the same series, in the same order.
    ylabel: the value axis label.
    title: axes title.
    size_px: (height, width) of the figure.
    path: PNG to write.

  Returns:
    The figure; each bar's height is its value, written above it.
  """
  if not values:
    raise ValueError("values: expected at least one group")
  groups = list(values)
  series = list(values[groups[0]])
  for g in groups:
    if list(values[g]) != series:
      raise ValueError(f"values[{g!r}]: expected the series {series} (as in {groups[0]!r}), got {list(values[g])}")
  fig = new_figure(size_px, layout="constrained")
  ax = fig.add_subplot()
  width = 0.8 / max(len(series), 1)
  x = np.arange(len(groups))
  for i, s in enumerate(series):
    heights = [float(values[g][s]) for g in groups]
    bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=s)
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
  ax.set_xticks(x, labels=groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
  ax.set_ylabel(ylabel)
  ax.margins(y=0.15)
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  if title:
    ax.set_title(title)
  return _finish(fig, path)
