"""A minimal reference model on Sort-of-CLEVR, outside the library's VQA model: recipe or plumbing?

The smallest model found that leaves the answer prior quickly on this data: 3 stride-2 convs (a
10x10 grid) with coordinates, 2 pre-LN Transformer layers over the grid, the question as a bag of
its WordPiece embeddings in one query that attends over the grid once, and an MLP on
[read-out, query]. It trains through the trainer (`mmjax.train.trainer.train`) on the project's
config with the task `reference_vqa`: the project's Sort-of-CLEVR task with this model in place
of the library's, so data, loss, schedule and evaluation are the config's. Library parts swap in
one at a time (`--vision library`, `--fusion NAME`) to find which of them stalls learning.

  python -m mmjax.projects.sort_of_clevr.bench.reference --steps 5000 --norm batch   # ~17 min
  python -m mmjax.projects.sort_of_clevr.bench.reference --steps 1000 --vision library \\
      --fusion cross_attention --fusion-kwargs '{"norm": "pre"}'

Writes the run to `--workdir` (metrics.jsonl: test accuracy per kind and subtype every
`--steps / --evals` steps) and prints the final evaluation. What it found: the project README.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.data.datasets.sort_of_clevr import SUBTYPES
from mmjax.encoders.vision import SmallCNN, grid_coords
from mmjax.fusion import build_fusion
from mmjax.models.vqa import AnswerHead
from mmjax.projects.sort_of_clevr import task as soc_task
from mmjax.train import trainer
from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "vqa.py"
NORMS = ("batch", "group", "none")
# The library fusion blocks' settings for a question of one token reading the grid.
FUSION_KWARGS = {"cross_attention": {"update": ("text",), "depth": 1}, "film": {"condition": "text"}}


class Block(nnx.Module):
  """A pre-LN Transformer layer."""

  def __init__(self, d: int, rngs: nnx.Rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
    self.att = nnx.MultiHeadAttention(4, d, decode=False, rngs=rngs)
    self.fc1, self.fc2 = nnx.Linear(d, 2 * d, rngs=rngs), nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.att(self.ln1(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class Reference(nnx.Module):
  """Grid encoder + one read-out per question; (images, ids, mask) -> (logits (B, Q, A), {}).

  Attributes:
    convs, norms, proj, blocks, ln: the grid encoder (`vision="reference"`).
    library: the library's `SmallCNN` of the same shape instead (`vision="library"`), else None.
    embed, q_in: the question: mean of its token embeddings -> GELU -> dense.
    wq, wk, wv, h1, h2: one 4-head attention read-out and the answer MLP (`fusion="reference"`).
    fusion, head: a library fusion block (the question as one token) and `AnswerHead` instead.
  """

  def __init__(self, *, vocab_size: int, num_answers: int, d: int = 64,
               convs: tuple[int, ...] = (32, 32, 32), depth: int = 2, norm: str = "batch",
               vision: str = "reference", fusion: str = "reference",
               fusion_kwargs: dict | None = None, rngs: nnx.Rngs):
    if norm not in NORMS:
      raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    self.d, self.use_fusion = d, fusion != "reference"
    self.convs, self.norms = nnx.List(), nnx.List()
    cin = 3
    for c in convs:
      self.convs.append(nnx.Conv(cin, c, (3, 3), strides=2, padding=1, rngs=rngs))
      self.norms.append({"batch": lambda: nnx.BatchNorm(c, rngs=rngs),
                         "group": lambda: nnx.GroupNorm(c, num_groups=8, rngs=rngs),
                         "none": lambda: None}[norm]())
      cin = c
    self.proj = nnx.Linear(cin + 2, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.library = (SmallCNN(d, channels=tuple(convs), norm=norm, coords=True, depth=depth, rngs=rngs)
                    if vision == "library" else None)
    self.embed = nnx.Embed(vocab_size, d, rngs=rngs)
    self.q_in = nnx.Linear(d, d, rngs=rngs)
    self.wq, self.wk, self.wv = (nnx.Linear(d, d, rngs=rngs) for _ in range(3))
    self.h1, self.h2 = nnx.Linear(2 * d, 2 * d, rngs=rngs), nnx.Linear(2 * d, num_answers, rngs=rngs)
    if self.use_fusion:
      kwargs = {**FUSION_KWARGS.get(fusion, {}), **(fusion_kwargs or {})}
      self.fusion = build_fusion(fusion, modalities={"image": d, "text": d}, features=d, rngs=rngs,
                                 **kwargs)
      self.head = AnswerHead(d, 2 * d, num_answers, rngs=rngs)

  def __call__(self, images, ids, mask, *, deterministic: bool = True):
    """images (B, H, W, 3); ids, mask (B, Q, L) -> logits (B, Q, A), {}."""
    if self.library is not None:
      t = self.library(images, deterministic=deterministic).tokens
    else:
      t = self.encode_image(images, deterministic)
    m = mask.astype(t.dtype)[..., None]
    q = self.q_in(jax.nn.gelu((self.embed(ids) * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)))  # (B, Q, d)
    return self.answer(t, q), {}

  def encode_image(self, images, deterministic):
    x = images
    for conv, norm in zip(self.convs, self.norms):
      x = conv(x)
      if isinstance(norm, nnx.BatchNorm):
        x = norm(x, use_running_average=deterministic)
      elif norm is not None:
        x = norm(x)
      x = jax.nn.relu(x)
    b, h, w, c = x.shape
    x = jnp.concatenate([x, jnp.broadcast_to(grid_coords(h, w), (b, h, w, 2))], -1)
    t = self.proj(x.reshape(b, h * w, c + 2))
    for blk in self.blocks:
      t = blk(t)
    return self.ln(t)  # (B, N, d)

  def answer(self, t, q):
    """Grid tokens t (B, N, d), questions q (B, Q, d) -> logits (B, Q, A)."""
    b, nq, d = q.shape
    if self.use_fusion:
      img = jnp.repeat(t, nq, axis=0)
      fused = self.fusion({"image": (img, jnp.ones(img.shape[:2], bool)),
                           "text": (q.reshape(b * nq, 1, d), jnp.ones((b * nq, 1), bool))})
      return self.head(fused.pooled).reshape(b, nq, -1)
    heads = 4
    split = lambda z: z.reshape(*z.shape[:2], heads, d // heads)  # noqa: E731
    att = jax.nn.softmax(jnp.einsum("bqhd,bnhd->bhqn", split(self.wq(q)), split(self.wk(t)))
                         / np.sqrt(d // heads))
    r = jnp.einsum("bhqn,bnhd->bqhd", att, split(self.wv(t))).reshape(*q.shape)
    return self.h2(jax.nn.relu(self.h1(jnp.concatenate([r, q], -1))))


class ReferenceVQA(soc_task.SortOfClevrVQA):
  """The project's Sort-of-CLEVR task with `Reference(**config.reference)` as its model."""

  def build_model(self, rngs: nnx.Rngs) -> Reference:
    return Reference(vocab_size=self.tokenizer.vocab_size, num_answers=len(self.answers), rngs=rngs,
                     **self.config.reference.to_dict())


if "reference_vqa" not in TASKS:  # once, also when this file runs as __main__ and is then imported
  TASKS.register("reference_vqa")(ReferenceVQA)


def make_config(args: argparse.Namespace):
  """The project's config at `--size` with this task, the model's arguments and the schedule."""
  c = load_config(f"{CONFIG}:size={args.size}", args.set)
  c.task = "mmjax.projects.sort_of_clevr.bench.reference:reference_vqa"
  c.seed = args.seed
  c.reference = {"d": args.d, "convs": tuple(int(x) for x in args.convs.split(",")),
                 "depth": args.depth, "norm": args.norm, "vision": args.vision,
                 "fusion": args.fusion, "fusion_kwargs": json.loads(args.fusion_kwargs)}
  c.data.batch_size = args.batch_size
  c.optim.lr = args.lr
  c.optim.warmup_steps = max(args.steps // 20, 1)
  c.train.steps = args.steps
  c.train.eval_every = max(args.steps // args.evals, 1)
  c.train.checkpoint_every = args.steps
  c.train.max_minutes = 0.0
  return c


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--batch-size", type=int, default=32, help="images per step (20 questions each)")
  p.add_argument("--d", type=int, default=64)
  p.add_argument("--convs", default="32,32,32", help="channels of the stride-2 convs")
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--norm", choices=NORMS, default="batch")
  p.add_argument("--vision", choices=("reference", "library"), default="reference")
  p.add_argument("--fusion", default="reference", help="'reference' or a library fusion name")
  p.add_argument("--fusion-kwargs", default="{}", help='JSON, e.g. \'{"norm": "pre"}\'')
  p.add_argument("--evals", type=int, default=6)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--size", default="default", choices=("tiny", "small", "default"),
                 help="the project config's size (its data; the model is this script's)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override such as data.data_dir=/tmp/d (repeatable)")
  p.add_argument("--workdir", default="workdirs/reference", help="emptied before the run")
  args = p.parse_args(argv)
  if args.steps < 1 or args.evals < 1:
    p.error(f"--steps and --evals: expected >= 1, got {args.steps} and {args.evals}")
  return args


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if pathlib.Path(args.workdir).exists():
    shutil.rmtree(args.workdir)
  final = trainer.train(make_config(args), args.workdir, progress=False)
  print(f"step {final['step']}: non-relational {final['test/accuracy_non_relational']:.3f} "
        f"relational {final['test/accuracy_relational']:.3f} "
        + " ".join(f"{s}={final[f'test/accuracy_{s}']:.3f}" for s in SUBTYPES),
        flush=True)
  return final


if __name__ == "__main__":
  main()
