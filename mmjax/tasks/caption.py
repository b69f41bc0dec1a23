"""Task glue for captioning shapes_captions: data pipeline, captioner, loss, BLEU/ROUGE-L/CIDEr-D.

The input pipeline is the config's pp strings (`input.pp_train`, `input.pp_eval`, tokenised with
the task's tokenizer): training reads one of each image's five reference captions at random
(teacher forcing, token cross-entropy). Evaluation decodes every test image greedily or with beam
search inside the compiled eval step, returns the generated tokens and the reference token ids as
per-example rows, and scores the detokenised captions with `mmjax.metrics.CaptionMetrics`
(pycocoevalcap's BLEU, ROUGE-L and CIDEr-D, document frequencies over the whole split) in
`summarize`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import losses, predict
from mmjax.data import pipeline, scenes
from mmjax.data.datasets import shapes_captions
from mmjax.metrics.caption import CaptionMetrics, simple_tokenize
from mmjax.models import build_model, decoding
from mmjax.models.captioner import ShowAndTell, TransformerCaptioner
from mmjax.train.tasks import TASKS

IMAGE_SHAPE = (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)


class CaptionPredictor(predict.Predictor):
  """Captions images, decoding inside the compiled function (one compilation per search method)."""

  request_fields = ("image",)
  request_options = ("beam", "resize")

  def image_inputs(self, images: Sequence[predict.ImageInput], *, resize: bool = False,
                   method: str = "caption") -> np.ndarray:
    """Raw images -> (N, H, W, C) float32, by the config's eval pp string."""
    images = predict.check_batch(images, "images", method)
    names = predict.request_names("image", len(images))
    records = [{"image": predict.read_image(im, field=n, channels=self.image_shape[-1])}
               for im, n in zip(images, names)]
    return self.preprocess(records, resize=resize, image_names=names)["image"]

  def caption_batch(self, images: Sequence[predict.ImageInput], *, method: str | None = None,
                    resize: bool = False) -> list[dict[str, Any]]:
    """Captions images[i]; see `caption`."""
    method = method or self.config.eval.decode
    if method not in decoding.METHODS:
      raise ValueError(f"method: expected one of {decoding.METHODS}, got {method!r}")
    pixels = self.image_inputs(images, resize=resize)
    fn = lambda model, x: tuple(self.task.generate(model, x, method)[:3])  # tokens, scores, log_probs
    tokens, scores, log_probs = self.run_batches(f"caption_{method}", fn, pixels)
    return [{"caption": c, "score": float(s), "log_prob": float(lp)}
            for c, s, lp in zip(self.task.detokenize(tokens), scores, log_probs)]

  def caption(self, image: predict.ImageInput, *, method: str | None = None,
              resize: bool = False) -> dict[str, Any]:
    """Captions `image`.

    Args:
      image: a file path, a PIL image or an (H, W, 3) uint8 RGB array of the training size.
      method: "greedy" or "beam" (the config's `eval.beam_size` and `eval.length_penalty`);
        default the config's `eval.decode`.
      resize: resize an image of another size instead of raising.

    Returns:
      {'caption': the decoded caption, 'score': its length-normalised log-probability (the
      search's ranking score), 'log_prob': its summed token log-probability, EOS included}.
    """
    return self.caption_batch([image], method=method, resize=resize)[0]

  def predict(self, *, image, beam: bool = False, resize: bool = False) -> dict[str, Any]:
    """The command line's request: `caption` (beam search with `beam`, else the config's method)."""
    return self.caption(image, method="beam" if beam else None, resize=bool(resize))


@TASKS.register("caption_shapes")
class ShapesCaptioning(pipeline.ConfigInput):
  """Image captioning on shapes_captions; `model.name` "show_and_tell" or "transformer_captioner".

  Batches (the config's pp strings make them): image (B, 75, 75, 3) float32 in [0, 1];
  caption_ids and caption_mask `[CLS] ... [SEP]`, padded to L = data.max_len: (B, L) for training
  (one reference each), (B, K, L) for evaluation (all K = 5).
  """

  best_metric = "test/cider"
  image_shape = IMAGE_SHAPE
  predictor = CaptionPredictor

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    self.tokenizer = shapes_captions.load_tokenizer(
        config.data.data_dir, config=shapes_captions.sized_config(config.data.num_images))
    self.bos_id = int(self.tokenizer.cls_token_id)
    self.eos_id = int(self.tokenizer.sep_token_id)
    self.pad_id = int(self.tokenizer.pad_token_id)

  # -- model -----------------------------------------------------------------------------------
  @property
  def decode_len(self) -> int:
    """Generated tokens at most (EOS included): the training length without BOS."""
    return int(self.config.data.max_len) - 1

  def build_model(self, rngs: nnx.Rngs) -> ShowAndTell | TransformerCaptioner:
    """`config.model` as is (`mmjax.models.build_model`); vocabulary and image shape from the data."""
    return build_model(self.config.model, rngs=rngs, base=(ShowAndTell, TransformerCaptioner),
                       vocab_size=self.tokenizer.vocab_size, image_shape=IMAGE_SHAPE)

  def generate(self, model, images: jax.Array, method: str | None = None) -> decoding.DecodeResult:
    """Captions images (B, 75, 75, 3) with the configured search (a pure function to jit)."""
    e = self.config.eval
    graphdef, state = nnx.split(model)
    return decoding.decode(graphdef, state, images, method=method or e.decode, beam_size=int(e.beam_size),
                           max_len=self.decode_len, length_penalty=float(e.length_penalty),
                           bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id)

  def detokenize(self, ids: np.ndarray) -> list[str]:
    """Token rows (N, T) -> caption strings, each cut at its first EOS, special tokens dropped."""
    rows = []
    for row in np.asarray(ids):
      end = np.flatnonzero(row == self.eos_id)
      rows.append([int(t) for t in row[:end[0] if end.size else len(row)]])
    return [s.strip() for s in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

  # -- loss and metrics ------------------------------------------------------------------------
  def loss_fn(self, model, batch, train):
    ids, mask = batch["caption_ids"], batch["caption_mask"]  # (B, L)
    logits, _ = model(batch["image"], ids[:, :-1], mask[:, :-1], deterministic=not train)  # (B, L-1, V)
    loss, metrics = losses.softmax_cross_entropy(logits, ids[:, 1:], weights=mask[:, 1:])
    return loss, {"token_accuracy": metrics["accuracy"]}

  def eval_fn(self, model, batch):
    images, valid = batch["image"], batch["valid"]
    ids, mask = batch["caption_ids"], batch["caption_mask"]  # (B, K, L)
    b, k, length = ids.shape
    flat_ids, flat_mask = ids.reshape(b * k, length), mask.reshape(b * k, length)
    logits, _ = model(jnp.repeat(images, k, axis=0), flat_ids[:, :-1], flat_mask[:, :-1])
    weights = flat_mask[:, 1:] & jnp.repeat(valid, k)[:, None]  # (B*K, L-1)
    loss, metrics = losses.softmax_cross_entropy(logits, flat_ids[:, 1:], weights=weights)
    tokens = self.generate(model, images).tokens  # (B, T)
    return {"nll": loss * metrics["weight"], "target_tokens": metrics["weight"],
            "tokens": tokens, "references": ids, "valid": valid}

  def summarize(self, sums):
    valid = np.asarray(sums["valid"], bool)
    hyps = self.detokenize(sums["tokens"][valid])
    refs = [self.detokenize(r) for r in sums["references"][valid]]
    acc = CaptionMetrics()
    acc.update([simple_tokenize(h) for h in hyps], [[simple_tokenize(r) for r in rs] for rs in refs])
    m = acc.compute()
    return {"bleu_1": m["bleu_1"], "bleu_4": m["bleu_4"], "rouge_l": m["rouge_l"], "cider": m["cider_d"],
            "nll": sums["nll"] / max(sums["target_tokens"], 1.0),
            "empty": float(np.mean([not h for h in hyps])) if hyps else 0.0}

  # -- data ------------------------------------------------------------------------------------
  def source(self, split: str):
    """The raw records of `split` (random access; see `shapes_captions.load`)."""
    d = self.config.data
    return shapes_captions.load(split, d.data_dir, config=shapes_captions.sized_config(d.num_images))
