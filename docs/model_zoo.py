"""Prints the model-zoo table of docs/model_zoo.md: every config variant and its parameter count.

  python docs/model_zoo.py            # the table as Markdown
  python docs/model_zoo.py --size small

Parameters are counted on the abstract model (`nnx.eval_shape`: shapes only, no FLOPs, no
memory), built by the config's task exactly as the trainer builds it. Building a task reads its
data set's tokenizer, so the embedded data sets are generated on first use (`$MMJAX_DATA_DIR`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (config file, its argument without size, what it is).
VARIANTS = (
    *(("vqa_sort_of_clevr.py", f"fusion={f}", f"VQA, small CNN + LSTM, {f} fusion")
      for f in ("concat", "mean", "sum", "gated", "lmf", "tfn", "film", "cross_attention",
                "single_stream", "bottleneck", "relation")),
    ("vqa_sort_of_clevr.py", "fusion=cross_attention,text=bert", "VQA, small CNN + BERT-tiny, cross-attention"),
    ("vqa_sort_of_clevr.py", "fusion=cross_attention,text=minilm", "VQA, small CNN + MiniLM-L6, cross-attention"),
    ("caption_shapes.py", "model=transformer", "captioning, small CNN + Transformer decoder"),
    ("caption_shapes.py", "model=show_and_tell", "captioning, Show and Tell (CNN + LSTM)"),
    ("clip_shapes.py", "loss=clip", "CLIP dual encoder, small CNN + GRU"),
    ("av_digits.py", "fusion=concat", "audio-visual digits, CNN + audio CNN, concat"),
)


def count(config) -> int:
  """Parameters of the config's model, from abstract initialisation."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import mmjax.tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (registers tasks)
  from mmjax.train.tasks import TASKS  # pylint: disable=g-import-not-at-top

  task = TASKS.get(config.task)(config)
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(params=0, dropout=1)))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="default", choices=("tiny", "small", "default"))
  args = parser.parse_args(argv)
  sys.path.insert(0, ROOT)
  from mmjax.train.config import load_config  # pylint: disable=g-import-not-at-top

  print(f"| model | config (`configs/...:ARG`) | parameters ({args.size}) |")
  print("|---|---|---:|")
  for filename, arg, what in VARIANTS:
    path = os.path.join(ROOT, "configs", filename)
    if not os.path.exists(path):
      continue
    config = load_config(f"{path}:size={args.size},{arg}")
    print(f"| {what} | `{filename}:{arg}` | {count(config):,} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
