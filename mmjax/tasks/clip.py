"""Task glue for CLIP on shapes_captions: image/caption pairs, contrastive loss, retrieval recall@K.

The input pipeline is the config's pp strings (`input.pp_train`, `input.pp_eval`, tokenised with
the task's tokenizer): training pairs each image with one of its five captions at random; the loss
is the dual encoder's (CLIP softmax or SigLIP sigmoid, by config) over the global batch.
Evaluation embeds every test image and all five of its captions, returns the embeddings as
per-example rows, and `summarize` ranks the whole split: image->text (an image's best-ranked own
caption) and text->image recall@K (`mmjax.metrics.recall_at_k`). `ContrastiveTask` holds the
model, loss and evaluation; `ShapesCLIP` feeds it shapes_captions, and `mmjax.tasks.user_data`'s
"clip" task the user's own image-caption pairs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import predict
from mmjax.data import pipeline
from mmjax.data.datasets import shapes_captions
from mmjax.metrics.retrieval import recall_at_k
from mmjax.models import build_model
from mmjax.models.dual_encoder import DualEncoder
from mmjax.tasks.caption import IMAGE_SHAPE
from mmjax.train.tasks import TASKS

RECALL_KS = (1, 5)


class ClipPredictor(predict.Predictor):
  """Serves a dual encoder: embeddings, zero-shot classification from label prompts, retrieval.

  Embeddings are L2-normalised (dot products are cosines). Images are read as `predict.read_image`
  reads them and texts tokenised as captions, both by the config's eval pp string.
  """

  request_options = ("image", "text", "labels", "template", "gallery", "top_k", "resize")

  _SINGULAR = {"images": "image", "texts": "text", "queries": "query", "prompts": "prompt"}

  def _names(self, arg: str, n: int) -> list[str]:
    """How errors name the items of a method's argument `arg`: "images[0]", ...; one request's
    only item by the singular ("image")."""
    if n == 1 and arg in self._SINGULAR:
      return [self._SINGULAR[arg]]
    return [f"{arg}[{i}]" for i in range(n)]

  def image_inputs(self, images: Sequence[predict.ImageInput], *, resize: bool = False,
                   method: str = "embed_images", arg: str = "images") -> np.ndarray:
    """Raw images -> (N, H, W, C) float32, by the config's eval pp string; errors name
    `arg`[i] (`method`'s argument)."""
    images = predict.check_batch(images, arg, method)
    names = self._names(arg, len(images))
    channels = self.image_shape[-1]
    records = [{"image": predict.read_image(im, field=n, channels=channels)}
               for im, n in zip(images, names)]
    return self.preprocess(records, resize=resize, image_names=names)["image"]

  def text_inputs(self, texts: Sequence[str], *, method: str = "embed_texts",
                  arg: str = "texts") -> tuple[np.ndarray, np.ndarray]:
    """Texts -> token ids and mask (N, L), tokenised by the config's eval pp string as captions;
    errors name `arg`[i]."""
    texts = predict.check_batch(texts, arg, method)
    records = [{"captions": predict.check_text(t, n)} for t, n in zip(texts, self._names(arg, len(texts)))]
    out = self.preprocess(records)
    return out["caption_ids"], out["caption_mask"]

  def _embed_images(self, pixels: np.ndarray) -> np.ndarray:
    fn = lambda model, x: model.embed("image", x)[0]
    return self.run_batches("embed_images", fn, pixels)

  def _embed_texts(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    fn = lambda model, ids, mask: model.embed("text", (ids, mask))[0]
    return self.run_batches("embed_texts", fn, ids, mask)

  def embed_images(self, images: Sequence[predict.ImageInput], *, resize: bool = False) -> np.ndarray:
    """Image embeddings (N, E) of file paths, PIL images or (H, W, C) uint8 arrays."""
    return self._embed_images(self.image_inputs(images, resize=resize))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Text embeddings (N, E)."""
    return self._embed_texts(*self.text_inputs(texts))

  @property
  def logit_scale(self) -> float:
    """exp(t), capped as in training: logits = logit_scale * cosine (+ SigLIP's bias)."""
    return float(np.exp(np.asarray(self.model.effective_log_scale())))

  @property
  def logit_bias(self) -> float:
    """SigLIP's logit bias (0 for CLIP)."""
    return float(np.asarray(self.model.logit_bias()))

  def zero_shot(self, images: Sequence[predict.ImageInput], labels: Sequence[str],
                template: str = "a photo of {}", *, resize: bool = False) -> list[dict[str, Any]]:
    """Classifies each image over `labels` by the similarity of its embedding to the prompts.

    Args:
      images: file paths, PIL images or (H, W, C) uint8 arrays.
      labels: two or more distinct class names.
      template: the prompt each label is put into, at its "{}" (as CLIP's "a photo of a {}.").
      resize: resize images of another size instead of raising.

    Returns:
      One {'label': the most probable label, 'probabilities': {label: p}, most probable first}
      per image: the softmax over labels of the model's logits, logit_scale * cosine (SigLIP's
      bias is the same for every label, so it cancels).
    """
    if not isinstance(template, str) or template.count("{}") != 1:
      raise ValueError(f"template: expected a text with one {{}} where the label goes, got {template!r}")
    labels = predict.check_batch(labels, "labels", "zero_shot")
    for i, label in enumerate(labels):
      predict.check_text(label, f"labels[{i}]")
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
      raise ValueError(f"labels: expected distinct labels, {repeated} repeated")
    if len(labels) < 2:
      raise ValueError(f"labels: expected two or more labels to choose from, got {labels}")
    pixels = self.image_inputs(images, resize=resize, method="zero_shot")
    prompts = self._embed_texts(*self.text_inputs([template.format(x) for x in labels],
                                                  method="zero_shot", arg="prompts"))
    logits = self.logit_scale * (self._embed_images(pixels) @ prompts.T)  # (N, K)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return predict.top_classes(probs, labels, "label")

  def retrieve(self, queries: Sequence[Any], gallery: Sequence[Any] | np.ndarray, k: int = 5, *,
               query: str = "text", resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k gallery items most similar to each query (cosine similarity of the embeddings).

    Args:
      queries: texts (query="text": text -> image) or images (query="image": image -> text).
      gallery: the other kind: images for text queries, texts for image queries; or their
        embeddings (M, E) from `embed_images` / `embed_texts` (to embed a large gallery once).
      k: results per query (at most the gallery's size).
      query: "text" or "image", the kind of the queries.
      resize: resize images of another size instead of raising.

    Returns:
      indices (Q, k) int into `gallery` and scores (Q, k) float32 cosines, best first.
    """
    if query not in ("text", "image"):
      raise ValueError(f"query: expected 'text' (text -> image) or 'image' (image -> text), got {query!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k: expected a positive int, got {k!r}")
    other = "image" if query == "text" else "text"
    if query == "text":
      q = self._embed_texts(*self.text_inputs(queries, method="retrieve", arg="queries"))
    else:
      q = self._embed_images(self.image_inputs(queries, resize=resize, method="retrieve", arg="queries"))
    if isinstance(gallery, np.ndarray) and gallery.ndim == 2 and gallery.dtype.kind == "f":
      if gallery.shape[1] != q.shape[1] or not len(gallery):
        raise ValueError(f"gallery: expected {other} embeddings (M, {q.shape[1]}), got {gallery.shape}")
      g = gallery.astype(np.float32)
    elif other == "image":
      g = self._embed_images(self.image_inputs(gallery, resize=resize, method="retrieve", arg="gallery"))
    else:
      g = self._embed_texts(*self.text_inputs(gallery, method="retrieve", arg="gallery"))
    scores = q @ g.T  # (Q, M)
    k = min(int(k), scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)

  def predict(self, *, image=None, text=None, labels=None, template=None, gallery=None,
              top_k=None, resize: bool = False) -> dict[str, Any]:
    """The command line's requests: --image with --labels (zero-shot), --text or --image with
    --gallery (retrieval, `top_k` results), --image and --text (their cosine), or one of them
    alone (its embedding)."""
    resize = bool(resize)
    if labels is not None:
      if image is None or text is not None or gallery is not None:
        raise ValueError("--labels: zero-shot classification takes one --image and no --text or --gallery")
      return self.zero_shot([image], labels, template or "a photo of {}", resize=resize)[0]
    if template is not None:
      raise ValueError("--template: goes with --labels (zero-shot classification)")
    if gallery is not None:
      if (image is None) == (text is None):
        raise ValueError("--gallery: retrieval takes one query, --text (a gallery of image files) "
                         "or --image (a gallery of texts)")
      kind = "text" if text is not None else "image"
      indices, scores = self.retrieve([text if kind == "text" else image], list(gallery),
                                      5 if top_k is None else top_k, query=kind, resize=resize)
      return {"query": kind, "results": [
          {"rank": r + 1, "index": int(i), "score": float(s), "item": str(gallery[i])}
          for r, (i, s) in enumerate(zip(indices[0], scores[0]))]}
    if top_k is not None:
      raise ValueError("--top_k: goes with --gallery (retrieval)")
    if image is not None and text is not None:
      cosine = self.embed_images([image], resize=resize)[0] @ self.embed_texts([text])[0]
      return {"cosine": float(cosine), "logit": float(self.logit_scale * cosine + self.logit_bias)}
    if image is not None:
      return {"embedding": self.embed_images([image], resize=resize)[0].tolist()}
    if text is not None:
      return {"embedding": self.embed_texts([text])[0].tolist()}
    raise ValueError("a dual encoder's request needs --image or --text (with --labels or --gallery)")


class ContrastiveTask(pipeline.ConfigInput):
  """Image-text contrastive learning with towers "image" and "text": a `DualEncoder` from
  `config.model`, its loss, and retrieval recall@K over an evaluation split.

  A subclass gives `self.config`, `self.tokenizer`, `self.image_shape`, `self.eval_splits` and
  `source(split)`, whose pp strings make image (B, H, W, C) and caption_ids / caption_mask:
  (B, L) for training (one caption each), (B, K, L) for evaluation (every record's K captions).
  """

  best_metric = "test/rsum"
  predictor = ClipPredictor

  # -- model -----------------------------------------------------------------------------------
  def fill(self) -> dict:
    """Encoder spec values taken from the data (`build_model`'s `fill`): the vocabulary size."""
    return {"vocab_size": self.tokenizer.vocab_size}

  def build_model(self, rngs: nnx.Rngs) -> DualEncoder:
    """`config.model` as is (`mmjax.models.build_model`); the towers' example inputs from the data."""
    length = int(self.config.data.max_len)
    examples = {"image": jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32),
                "text": (jax.ShapeDtypeStruct((1, length), jnp.int32),
                         jax.ShapeDtypeStruct((1, length), jnp.bool_))}
    return build_model(self.config.model, rngs=rngs, base=DualEncoder, fill=self.fill(),
                       input_examples=examples)

  # -- loss and metrics ------------------------------------------------------------------------
  def loss_fn(self, model, batch, train):
    emb, _ = model({"image": batch["image"], "text": (batch["caption_ids"], batch["caption_mask"])},
                   deterministic=not train)
    loss, metrics = model.loss(emb)
    metrics.pop("loss")
    return loss, metrics

  def eval_fn(self, model, batch):
    ids, mask, valid = batch["caption_ids"], batch["caption_mask"], batch["valid"]  # (B, K, L), (B,)
    b, k, length = ids.shape
    emb, _ = model({"image": batch["image"],
                    "text": (ids.reshape(b * k, length), mask.reshape(b * k, length))})
    text = emb["text"].reshape(b, k, -1)  # (B, K, E)
    loss, _ = model.loss({"image": emb["image"], "text": text[:, 0]}, mask=valid)
    count = valid.sum()
    return {"loss": loss * count, "count": count, "image_emb": emb["image"], "text_emb": text,
            "valid": valid}

  def summarize(self, sums):
    valid = np.asarray(sums["valid"], bool)
    if not valid.any():  # an empty split: nothing retrieved, as the other tasks' zeros
      return {**{f"{d}_r@{k}": 0.0 for d in ("i2t", "t2i") for k in RECALL_KS}, "rsum": 0.0, "loss": 0.0}
    images, texts = sums["image_emb"][valid], sums["text_emb"][valid]  # (N, E), (N, K, E)
    n, k, _ = texts.shape
    similarity = images @ texts.reshape(n * k, -1).T  # (N, N*K); embeddings are L2-normalised
    out = recall_at_k(similarity, np.repeat(np.arange(n), k), RECALL_KS)
    out["loss"] = sums["loss"] / max(sums["count"], 1.0)
    return out


@TASKS.register("clip_shapes")
class ShapesCLIP(ContrastiveTask):
  """Image-text contrastive learning on shapes_captions."""

  image_shape = IMAGE_SHAPE

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    self.tokenizer = shapes_captions.load_tokenizer(
        config.data.data_dir, config=shapes_captions.sized_config(config.data.num_images))

  # -- data ------------------------------------------------------------------------------------
  def source(self, split: str):
    """The raw records of `split` (random access; see `shapes_captions.load`)."""
    d = self.config.data
    return shapes_captions.load(split, d.data_dir, config=shapes_captions.sized_config(d.num_images))
