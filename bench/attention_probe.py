"""Where each cross-attention head of a trained Sort-of-CLEVR VQA model looks, per question kind.

For every head of every layer: the mean share of its (question-to-image) attention that falls on
the grid cells covered by (a) the object the question names, (b) the object the answer is about
for closest / furthest questions, (c) any object. A head that "binds" puts most of its weight on
the named object; a second hop that works puts it on the target. Issue 5 used it to find that
binding was specific to the question template (a head on the named object for position questions
but not for shape questions) and that the second hop kept looking at the named object.

  python bench/attention_probe.py --workdir workdirs/vqa_sort_of_clevr --step 4200 --images 40
"""

from __future__ import annotations

import argparse
import math

import numpy as np

KINDS = ("shape", "horizontal", "vertical", "closest", "furthest", "count")


def covered_cells(mask: np.ndarray, grid: int) -> np.ndarray:
  """(grid * grid,) bool: the cells of a grid x grid split of the image that `mask` touches."""
  rows, cols = np.nonzero(mask)
  cells = np.zeros(grid * grid, bool)
  cells[rows * grid // mask.shape[0] * grid + cols * grid // mask.shape[1]] = True
  return cells


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the best)")
  p.add_argument("--images", type=int, default=40, help="test images (20 questions each)")
  args = p.parse_args(argv)

  from mmjax import viz
  from mmjax.data import scenes
  from mmjax.data import tokenizer as tokenizer_lib
  from mmjax.predict import Predictor

  pred = Predictor.from_workdir(args.workdir, args.step)
  c = pred.setup.config
  task = pred.setup.task  # its data folder and size, and the tokenizer the model was trained with
  src, tok = task.source("test"), task.tokenizer
  images, ids, masks, kinds, named, target = [], [], [], [], [], []
  scene_masks, image_of = [], []  # per image: the (6, H, W) object masks; per question: its image
  for i in range(min(args.images, len(src))):
    r = src[i]
    scene = scenes.Scene(colors=np.asarray(r["colors"]), shapes=np.asarray(r["shapes"]),
                         xs=np.asarray(r["xs"]), ys=np.asarray(r["ys"]))
    scene_masks.append(scenes.object_masks(scene))
    closest, furthest = scene.closest(), scene.furthest()  # the data set's own answers
    q_ids, q_mask = tokenizer_lib.encode(tok, [q.decode() if isinstance(q, bytes) else q
                                              for q in r["questions"]], int(c.data.max_len))
    for q in range(len(r["questions"])):
      me = list(r["colors"]).index(int(r["question_colors"][q]))
      kind = int(r["subtypes"][q])
      images.append(np.asarray(r["image"], np.float32) / 255.0)
      ids.append(q_ids[q]), masks.append(q_mask[q].astype(bool)), kinds.append(kind)
      named.append(me), target.append({3: int(closest[me]), 4: int(furthest[me])}.get(kind, me))
      image_of.append(i)
  images, ids, masks, kinds = map(np.asarray, (images, ids, masks, kinds))
  n, bs = len(kinds), pred.batch_size
  print(f"{args.workdir} step {pred.step}: mean attention share per head "
        f"({n} questions of {min(args.images, len(src))} test images)\n")
  for layer in range(len(pred.model.fusion.layers)):
    fn = lambda m, a, b, k, layer=layer: viz.question_image_attention(m, a, b, k, layer=layer, head="all")[0]
    maps = np.concatenate([np.asarray(pred.run(f"attention_{layer}", fn, images[i:i + bs], ids[i:i + bs],
                                               masks[i:i + bs])) for i in range(0, n, bs)])
    heads, grid = maps.shape[1], math.isqrt(maps.shape[-1])
    if grid * grid != maps.shape[-1]:
      raise ValueError(f"expected a square grid of image tokens, got {maps.shape[-1]}")
    if layer == 0:
      print("| layer | on | question | " + " | ".join(f"h{h}" for h in range(heads)) + " |")
      print("|---|---|---|" + "---|" * heads)
      per_image = [np.stack([covered_cells(m, grid) for m in sm]) for sm in scene_masks]  # (6, N)
      cells = [per_image[i] for i in image_of]  # per question: (objects, N)
      covers = {"named": np.array([cl[k] for cl, k in zip(cells, named)]),
                "target": np.array([cl[k] for cl, k in zip(cells, target)]),
                "any object": np.array([np.any(cl, axis=0) for cl in cells])}
    for label, which in (("named", (0, 1, 3, 4)), ("target", (3, 4)), ("any object", (3, 4))):
      share = (maps * covers[label][:, None, :]).sum(-1)  # (questions, heads)
      for k in which:
        if np.any(kinds == k):
          row = " | ".join(f"{v:.2f}" for v in share[kinds == k].mean(0))
          print(f"| {layer} | {label} | {KINDS[k]} | {row} |")


if __name__ == "__main__":
  main()
