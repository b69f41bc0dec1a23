"""Task glue for CLIP on shapes_captions: image/caption pairs, contrastive loss, retrieval recall@K.

The input pipeline is the config's pp strings (`input.pp_train`, `input.pp_eval`, tokenised with
the task's tokenizer): training pairs each image with one of its five captions at random; the loss
is the dual encoder's (CLIP softmax or SigLIP sigmoid, by config) over the global batch.
Evaluation embeds every test image and all five of its captions, returns the embeddings as
per-example rows, and `summarize` ranks the whole split: image->text (an image's best-ranked own
caption) and text->image recall@K (`mmjax.metrics.recall_at_k`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import predict
from mmjax.data import pipeline
from mmjax.data.datasets import shapes_captions
from mmjax.metrics.retrieval import recall_at_k
from mmjax.models.dual_encoder import DualEncoder
from mmjax.tasks.caption import IMAGE_SHAPE
from mmjax.train.tasks import TASKS

RECALL_KS = (1, 5)


class ClipPredictor(predict.Predictor):
  """Embeds images and texts into the shared space (L2-normalised: dot products are cosines)."""

  def image_inputs(self, images: Sequence[predict.ImageInput], *, resize: bool = False) -> np.ndarray:
    """Raw images -> (N, H, W, C) float32, by the config's eval pp string."""
    images = predict.check_batch(images, "images", "embed_images")
    names = predict.request_names("image", len(images))
    records = [{"image": predict.read_image(im, field=n)} for im, n in zip(images, names)]
    return self.preprocess(records, resize=resize, image_names=names)["image"]

  def text_inputs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> token ids and mask (N, L), tokenised by the config's eval pp string as captions."""
    texts = predict.check_batch(texts, "texts", "embed_texts")
    records = [{"captions": predict.check_text(t, n)}
               for t, n in zip(texts, predict.request_names("text", len(texts)))]
    out = self.preprocess(records)
    return out["caption_ids"], out["caption_mask"]

  def embed_images(self, images: Sequence[predict.ImageInput], *, resize: bool = False) -> np.ndarray:
    """Image embeddings (N, E)."""
    fn = lambda model, x: model.embed("image", x)[0]
    return self.run_batches("embed_images", fn, self.image_inputs(images, resize=resize))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Text embeddings (N, E)."""
    fn = lambda model, ids, mask: model.embed("text", (ids, mask))[0]
    return self.run_batches("embed_texts", fn, *self.text_inputs(texts))

@TASKS.register("clip_shapes")
class ShapesCLIP(pipeline.ConfigInput):
  """Image-text contrastive learning on shapes_captions with towers "image" and "text"."""

  best_metric = "test/rsum"
  image_shape = IMAGE_SHAPE
  predictor = ClipPredictor

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    self.tokenizer = shapes_captions.load_tokenizer(
        config.data.data_dir, config=shapes_captions.sized_config(config.data.num_images))

  # -- model -----------------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> DualEncoder:
    m, length = self.config.model, int(self.config.data.max_len)
    text = dict(m.text)
    if "vocab_size" in text and not text["vocab_size"]:
      text["vocab_size"] = self.tokenizer.vocab_size
    examples = {"image": jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32),
                "text": (jax.ShapeDtypeStruct((1, length), jnp.int32),
                         jax.ShapeDtypeStruct((1, length), jnp.bool_))}
    return DualEncoder(towers={"image": dict(m.image), "text": text}, input_examples=examples,
                       embed_dim=int(m.embed_dim), loss_type=m.loss_type, rngs=rngs)

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
    images, texts = sums["image_emb"][valid], sums["text_emb"][valid]  # (N, E), (N, K, E)
    n, k, _ = texts.shape
    similarity = images @ texts.reshape(n * k, -1).T  # (N, N*K); embeddings are L2-normalised
    out = recall_at_k(similarity, np.repeat(np.arange(n), k), RECALL_KS)
    out["loss"] = sums["loss"] / max(sums["count"], 1.0)
    return out

  # -- data ------------------------------------------------------------------------------------
  def source(self, split: str):
    """The raw records of `split` (random access; see `shapes_captions.load`)."""
    d = self.config.data
    return shapes_captions.load(split, d.data_dir, config=shapes_captions.sized_config(d.num_images))
