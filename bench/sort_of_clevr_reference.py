"""A minimal reference model for Sort-of-CLEVR, outside the library, to tell recipe from plumbing.

The library's VQA models sit at the answer prior (test accuracy ~0.49) for the first ~1,500+
steps on 2 CPU cores (issue 5). This script trains the smallest model we found that leaves the
prior quickly on the same data: 3 stride-2 convs (a 10x10 grid) with coordinates, 2 pre-LN
Transformer layers over the grid, the question (the 11-dim one-hot, or a bag of its WordPiece
embeddings) as one query that attends over the grid once, and an MLP on [read-out, query].

  python bench/sort_of_clevr_reference.py --steps 5000 --norm batch             # ~17 min, 2 cores
  python bench/sort_of_clevr_reference.py --steps 1000 --norm group --question words

Measured (2 CPU cores, idle, lr 1e-3 cosine, 32 images x 20 questions per step):
  --norm batch, one-hot, 5000 steps: non-relational 0.58 / 0.79 / 0.995 / 0.997 and relational
    0.53 / 0.70 / 0.57 / 0.75 at steps 833 / 1666 / 2499 / 3332 (closest/furthest ~0.67/0.74,
    count ~0.85-0.99; test-time BatchNorm statistics make single evaluations jumpy).
  --norm group, one-hot, 1200 steps: non-rel 0.61, rel 0.67 at 1000 (off the prior at ~700).
  --norm group, words, 1000 steps: off the prior at ~800 (non-rel 0.58, rel 0.54 at 1000).
  --norm none (raw, inverted or standardised pixels): still near the prior at 400.
Swapping library parts in, one at a time (group norm, one-hot, 1000 steps, loss at 1000; measured
with the library's earlier ReLU answer head, now GELU + LayerNorm, see bench/colour_binding.py):
  --vision library (SmallCNN, same shape): off the prior at ~700, non-rel 0.63 (0.783).
  + --fusion cross_attention (LXMERT post-LN, question as one token, library AnswerHead):
    stays at the prior through 1000 (0.833): the post-LN fusion is what stalls learning.
  + --fusion_kwargs '{"norm": "pre"}': off the prior at ~700 again (0.798).
  + --convs 32,32,32,32 (a 5x5 grid): still at the prior at 1000 (0.818): the grid matters too.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmjax.data import scenes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.datasets import sort_of_clevr
from mmjax.encoders.vision import SmallCNN, grid_coords
from mmjax.fusion import build_fusion
from mmjax.models.vqa import AnswerHead


def load_split(split: str, tokenizer, max_len: int = 20) -> dict[str, np.ndarray]:
  """All records of `split` as arrays: images (N, 75, 75, 3) uint8, onehot (N, 20, 11), ids and
  mask (N, 20, L), answers and subtypes (N, 20)."""
  src = sort_of_clevr.load(split, None)
  cols = {k: [] for k in ("images", "onehot", "answers", "subtypes")}
  questions = []
  for i in range(len(src)):
    e = src[i]
    image = e["image"]
    cols["images"].append(np.asarray(scenes.decode_png(image) if isinstance(image, bytes) else image))
    cols["onehot"].append(e["question_onehot"])
    cols["answers"].append(e["answers"])
    cols["subtypes"].append(e["subtypes"])
    questions += [q.decode() if isinstance(q, bytes) else q for q in e["questions"]]
  out = {k: np.stack(v) for k, v in cols.items()}
  ids, mask = tokenizer_lib.encode(tokenizer, questions, max_len)
  n = len(out["images"])
  out["ids"] = np.asarray(ids).reshape(n, 20, max_len)
  out["mask"] = np.asarray(mask).reshape(n, 20, max_len).astype(np.float32)
  return out


class Block(nnx.Module):
  def __init__(self, d: int, rngs: nnx.Rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
    self.att = nnx.MultiHeadAttention(4, d, decode=False, rngs=rngs)
    self.fc1, self.fc2 = nnx.Linear(d, 2 * d, rngs=rngs), nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.att(self.ln1(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class Reference(nnx.Module):
  def __init__(self, args, vocab_size: int, rngs: nnx.Rngs):
    d, cin = args.d, 3
    self.args = args
    self.convs, self.norms = nnx.List(), nnx.List()
    for c in (int(c) for c in args.convs.split(",")):
      self.convs.append(nnx.Conv(cin, c, (3, 3), strides=2, padding=1, rngs=rngs))
      self.norms.append({"batch": lambda: nnx.BatchNorm(c, rngs=rngs),
                         "group": lambda: nnx.GroupNorm(c, num_groups=8, rngs=rngs),
                         "none": lambda: None}[args.norm]())
      cin = c
    self.proj = nnx.Linear(cin + 2, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, rngs) for _ in range(args.depth)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    # --vision library: the library's SmallCNN in place of the convs + Transformer above.
    self.library = (SmallCNN(d, channels=tuple(int(c) for c in args.convs.split(",")), norm=args.norm,
                             coords=True, depth=args.depth, rngs=rngs) if args.vision == "library" else None)
    if args.question == "onehot":
      self.q_in = nnx.Linear(sort_of_clevr.QUESTION_DIM, d, rngs=rngs)
    else:
      self.embed = nnx.Embed(vocab_size, d, rngs=rngs)
      self.q_in = nnx.Linear(d, d, rngs=rngs)
    self.wq, self.wk, self.wv = (nnx.Linear(d, d, rngs=rngs) for _ in range(3))
    self.h1, self.h2 = nnx.Linear(2 * d, 2 * d, rngs=rngs), nnx.Linear(2 * d, 10, rngs=rngs)
    # --fusion NAME: the library's fusion block (question as one token) and answer head instead.
    if args.fusion != "reference":
      kw = {"cross_attention": {"update": ("text",), "depth": 1}, "film": {"condition": "text"}}
      self.fusion = build_fusion(args.fusion, modalities={"image": d, "text": d}, features=d,
                                 rngs=rngs, **{**kw.get(args.fusion, {}), **json.loads(args.fusion_kwargs)})
      self.head = AnswerHead(d, 2 * d, 10, rngs=rngs)

  def __call__(self, images, question, train: bool):
    if self.library is not None:
      t = self.library(images, deterministic=not train).tokens
    else:
      t = self.encode_image(images, train)
    return self.answer(t, question)

  def encode_image(self, images, train):
    x = images
    for conv, norm in zip(self.convs, self.norms):
      x = conv(x)
      if isinstance(norm, nnx.BatchNorm):
        x = norm(x, use_running_average=not train)
      elif norm is not None:
        x = norm(x)
      x = jax.nn.relu(x)
    b, h, w, c = x.shape
    x = jnp.concatenate([x, jnp.broadcast_to(grid_coords(h, w), (b, h, w, 2))], -1)
    t = self.proj(x.reshape(b, h * w, c + 2))
    for blk in self.blocks:
      t = blk(t)
    return self.ln(t)  # (B, N, d)

  def answer(self, t, question):
    if self.args.question == "onehot":
      q = self.q_in(question)  # (B, Q, d)
    else:
      ids, mask = question
      q = self.q_in(jax.nn.gelu((self.embed(ids) * mask[..., None]).sum(-2) / mask.sum(-1, keepdims=True)))
    if self.args.fusion != "reference":
      b, nq, d = q.shape
      img = jnp.repeat(t, nq, axis=0)
      fused = self.fusion({"image": (img, jnp.ones(img.shape[:2], bool)),
                           "text": (q.reshape(b * nq, 1, d), jnp.ones((b * nq, 1), bool))})
      return self.head(fused.pooled).reshape(b, nq, -1)
    heads, d = 4, self.args.d
    split = lambda z: z.reshape(*z.shape[:2], heads, d // heads)
    att = jax.nn.softmax(jnp.einsum("bqhd,bnhd->bhqn", split(self.wq(q)), split(self.wk(t))) / np.sqrt(d // heads))
    r = jnp.einsum("bhqn,bnhd->bqhd", att, split(self.wv(t))).reshape(*q.shape)
    return self.h2(jax.nn.relu(self.h1(jnp.concatenate([r, q], -1))))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--batch_size", type=int, default=32, help="images per step (20 questions each)")
  p.add_argument("--d", type=int, default=64)
  p.add_argument("--convs", default="32,32,32", help="channels of the stride-2 convs")
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--norm", choices=("batch", "group", "none"), default="batch")
  p.add_argument("--question", choices=("onehot", "words"), default="onehot")
  p.add_argument("--vision", choices=("reference", "library"), default="reference")
  p.add_argument("--fusion", default="reference", help="'reference' or a library fusion name")
  p.add_argument("--fusion_kwargs", default="{}", help='JSON, e.g. \'{"norm": "pre"}\'')
  p.add_argument("--evals", type=int, default=6)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  tok = sort_of_clevr.load_tokenizer(None)
  train, test = load_split("train", tok), load_split("test", tok)
  model = Reference(args, tok.vocab_size, nnx.Rngs(args.seed))
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 20, 1), args.steps)
  opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                         optax.adamw(sched, weight_decay=1e-4)), wrt=nnx.Param)

  def question(d, idx):
    if args.question == "onehot":
      return jnp.asarray(d["onehot"][idx])
    return jnp.asarray(d["ids"][idx]), jnp.asarray(d["mask"][idx])

  @nnx.jit
  def step(model, opt, images, q, answers):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(images, q, True), answers).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  @nnx.jit
  def predict(model, images, q):
    return model(images, q, False).argmax(-1)

  def evaluate():
    pred = np.concatenate([np.asarray(predict(model, jnp.asarray(test["images"][i:i + 50] / 255.0, jnp.float32),
                                              question(test, slice(i, i + 50))))
                           for i in range(0, len(test["images"]), 50)])
    ok, sub = pred == test["answers"], test["subtypes"]
    per = {s: float(ok[sub == k].mean()) for k, s in enumerate(sort_of_clevr.SUBTYPES)}
    return float(ok[sub < 3].mean()), float(ok[sub >= 3].mean()), per

  rng, n, t0, losses = np.random.default_rng(args.seed), len(train["images"]), time.time(), []
  for it in range(1, args.steps + 1):
    idx = np.sort(rng.choice(n, args.batch_size, replace=False))
    losses.append(step(model, opt, jnp.asarray(train["images"][idx] / 255.0, jnp.float32),
                       question(train, idx), jnp.asarray(train["answers"][idx])))
    if it % max(args.steps // args.evals, 1) == 0 or it == args.steps:
      nonrel, rel, per = evaluate()
      print(f"step {it} {time.time() - t0:.0f}s loss {float(np.mean(losses[-50:])):.3f} "
            f"non-relational {nonrel:.3f} relational {rel:.3f} "
            + " ".join(f"{k}={v:.3f}" for k, v in per.items()), flush=True)


if __name__ == "__main__":
  main()
