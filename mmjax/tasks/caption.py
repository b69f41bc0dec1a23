"""Task glue for captioning shapes_captions: data pipeline, captioner, loss, BLEU/ROUGE-L/CIDEr-D.

Training reads one of each image's five reference captions at random (teacher forcing, token
cross-entropy). Evaluation decodes every test image greedily or with beam search inside the
compiled eval step, returns the generated tokens and the reference token ids as per-example rows,
and scores the detokenised captions with `mmjax.metrics.CaptionMetrics` (pycocoevalcap's BLEU,
ROUGE-L and CIDEr-D, document frequencies over the whole split) in `summarize`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import losses
from mmjax.data import pipeline, scenes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.datasets import shapes_captions
from mmjax.metrics.caption import CaptionMetrics, simple_tokenize
from mmjax.models import decoding
from mmjax.models.captioner import ShowAndTell, TransformerCaptioner
from mmjax.train.tasks import TASKS

CAPTIONERS = {"show_and_tell": ShowAndTell, "transformer": TransformerCaptioner}
IMAGE_SHAPE = (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)


class CaptionPreprocess:
  """shapes_captions record -> image (75, 75, 3) float32 in [0, 1] and caption token ids.

  Training picks one reference at random: caption_ids / caption_mask (L,). Evaluation keeps all
  of them: (K, L) with K = `shapes_captions.CAPTIONS_PER_IMAGE`. Ids are `[CLS] ... [SEP]`, padded.

  Attributes:
    tokenizer: the captions' WordPiece tokenizer.
    max_len: L.
    training: pick one caption (True) or keep all (False).
  """

  def __init__(self, tokenizer, max_len: int, training: bool):
    self.tokenizer, self.max_len, self.training = tokenizer, max_len, training

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    image = np.asarray(example["image"])
    if image.shape != IMAGE_SHAPE or image.dtype != np.uint8:
      raise ValueError(f"field 'image' must be {IMAGE_SHAPE} uint8, got {image.shape} {image.dtype}")
    captions = list(example["captions"])
    if self.training:
      captions = [captions[int(rng.integers(len(captions)))]]
    ids, mask = tokenizer_lib.encode(self.tokenizer, captions, self.max_len)  # (K, L)
    if self.training:
      ids, mask = ids[0], mask[0]
    return {"image": image.astype(np.float32) / 255.0, "caption_ids": ids, "caption_mask": mask}


@TASKS.register("caption_shapes")
class ShapesCaptioning:
  """Image captioning on shapes_captions; model "show_and_tell" or "transformer" by config."""

  best_metric = "test/cider"
  image_shape = IMAGE_SHAPE

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.eval_splits = tuple(config.data.eval_splits)
    if config.model.name not in CAPTIONERS:
      raise ValueError(f"model.name: expected one of {sorted(CAPTIONERS)}, got {config.model.name!r}")
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
    m = self.config.model
    encoder = dict(m.encoder)
    name = encoder.pop("name")
    return CAPTIONERS[m.name](self.tokenizer.vocab_size, encoder=name, encoder_kwargs=encoder,
                              encoder_features=encoder["features"], **dict(m.decoder), rngs=rngs)

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

  def dataset(self, split, *, train, batch_size, shard_index, shard_count):
    d = self.config.data
    source = self.source(split)
    mode = (dict(shuffle=True, num_epochs=None, drop_remainder=True) if train else
            dict(shuffle=False, num_epochs=1, drop_remainder=False, pad_remainder=True))
    return pipeline.make_pipeline(
        source, batch_size=batch_size, preprocess=CaptionPreprocess(self.tokenizer, int(d.max_len), train),
        seed=int(self.config.seed), shard_index=shard_index, shard_count=shard_count,
        worker_count=d.worker_count if train else 0, **mode)

