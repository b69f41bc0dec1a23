"""Input-pipeline throughput per embedded data set, with 0, 1 and 2 worker processes.

  python bench/pipeline.py [--batches 30] [--batch-size 64] [--workers 0,1,2]

Each pipeline decodes and preprocesses into training batches: Sort-of-CLEVR (PNG decode +
20 tokenized questions per image), shapes_captions (PNG decode + 5 tokenized captions),
av_digits (8x8 image + 1 s waveform -> log-mel via the pp ops). Prints examples/s (median of 3
runs of `--batches` batches after one warm-up batch) as a markdown table.
"""

import argparse
import platform
import statistics
import time

import numpy as np

from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import pp
from mmjax.data.datasets import av_digits, shapes_captions, sort_of_clevr


def _captions_preprocess():
  tok = shapes_captions.load_tokenizer()

  def fn(example, rng):
    del rng
    ids, mask = tokenizer_lib.encode(tok, list(example["captions"]), 24)
    return {"image": np.asarray(example["image"], np.float32) / 255.0, "caption_ids": ids, "caption_mask": mask}

  return fn


def _source_and_preprocess(name):
  if name == "sort_of_clevr":
    tok = sort_of_clevr.load_tokenizer()
    return sort_of_clevr.load("train"), pipeline.SortOfClevrPreprocess(tok, 32)
  if name == "shapes_captions":
    return shapes_captions.load("train"), _captions_preprocess()
  if name == "av_digits":
    return av_digits.load("train"), pp.parse("image.value_range(0, 1)|audio.log_mel(key='audio')|keep('image', 'mel', 'label')")
  raise ValueError(name)


def measure(name, workers, batches, batch_size):
  source, preprocess = _source_and_preprocess(name)
  rates = []
  for rep in range(3):
    ds = pipeline.make_pipeline(source, batch_size=batch_size, preprocess=preprocess, seed=rep,
                                worker_count=workers)
    it = iter(ds)
    next(it)  # warm-up: worker start, first compile of any JAX op
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    rates.append(batches * batch_size / (time.perf_counter() - t0))
    del it
  return statistics.median(rates)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--batches", type=int, default=30)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--workers", default="0,1,2")
  ap.add_argument("--datasets", default="sort_of_clevr,shapes_captions,av_digits")
  args = ap.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  print(f"machine: {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, batch {args.batch_size}")
  print("| data set | " + " | ".join(f"{w} workers ex/s" for w in workers) + " |")
  print("|---|" + "---|" * len(workers))
  for name in args.datasets.split(","):
    row = [f"{measure(name, w, args.batches, args.batch_size):,.0f}" for w in workers]
    print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
  main()
