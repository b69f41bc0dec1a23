"""Input-pipeline throughput of the tasks' training pipelines, with 0, 1 and 2 worker processes.

  python bench/pipeline.py [--batches 30] [--batch-size 64] [--workers 0,1,2] [--config C ...]

Each config's task builds the training pipeline the trainer iterates (`task.dataset("train",
train=True, ...)`) with `data.worker_count` set to each count: Sort-of-CLEVR VQA (PNG decode + 20
tokenized questions per image), shapes captioning (PNG decode + 5 tokenized captions), AV digits
(8x8 image + 1 s waveform -> log-mel). Prints examples/s (median of 3 runs of `--batches` batches
after one warm-up batch) as a markdown table, one row per config.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time

from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = (str(ROOT / "mmjax" / "projects" / "sort_of_clevr" / "configs" / "vqa.py"),
           str(ROOT / "configs" / "caption_shapes.py"), str(ROOT / "configs" / "av_digits.py"))


def measure(config: str, workers: int, batches: int, batch_size: int, overrides: list[str]) -> float:
  """Median examples/s of 3 runs of the config's training pipeline with `workers` processes."""
  cfg = load_config(config, [f"data.worker_count={workers}", *overrides])
  task = TASKS.get(cfg.task)(cfg)
  rates = []
  for rep in range(3):
    cfg.seed = rep  # another shuffle each run
    it = iter(task.dataset("train", train=True, batch_size=batch_size, shard_index=0, shard_count=1))
    next(it)  # warm-up: worker start, first compile of any JAX op
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    rates.append(batches * batch_size / (time.perf_counter() - t0))
    del it
  return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", type=int, default=30)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--workers", default="0,1,2")
  ap.add_argument("--config", action="append", default=None,
                  help="config path[:args] (repeat; default: the three embedded data sets' configs)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="an override for every config, such as data.data_dir=/tmp/d (repeatable)")
  args = ap.parse_args(argv)
  workers = [int(w) for w in args.workers.split(",")]
  print(f"machine: {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, batch {args.batch_size}")
  print("| config | " + " | ".join(f"{w} workers ex/s" for w in workers) + " |")
  print("|---|" + "---|" * len(workers))
  rows = {}
  for config in args.config or CONFIGS:
    rows[config] = [measure(config, w, args.batches, args.batch_size, args.set) for w in workers]
    print(f"| {config.removeprefix(f'{ROOT}/')} | " + " | ".join(f"{r:,.0f}" for r in rows[config]) + " |", flush=True)
  return rows


if __name__ == "__main__":
  main()
