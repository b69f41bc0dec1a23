"""Train-step time of config variants, side by side in one process.

Each variant is a config with some `key=value` overrides (as on train.py's command line, without
`--config.`); with several `--config`s, every config runs with every `--variant`. Each variant is
the trainer's own step (`mmjax.train.trainer.Setup`); all are built and compiled first, then
timed in alternating rounds (variant A, B, ..., A, B, ...) on the same few batches, so that
machine-speed drift hits them alike. Prints the median step time per variant and its ratio to
the first.

  python bench/step_time.py --config configs/av_digits.py:size=small \\
      --variant "" --variant "data.batch_size=16"
  python bench/step_time.py --rounds 3 --steps 2 \\
      --config configs/av_digits.py:fusion=concat --config configs/av_digits.py:fusion=film

The Sort-of-CLEVR project's step-time tables are in mmjax/projects/sort_of_clevr/README.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from mmjax.train.config import load_config  # noqa: E402
from mmjax.train.trainer import Setup  # noqa: E402


def build(config_arg: str, overrides: list[str], num_batches: int):
  setup = Setup(load_config(config_arg, overrides))
  c = setup.config
  state = setup.init_state()
  step = setup.make_train_step()
  it = iter(setup.task.dataset("train", train=True, batch_size=c.data.batch_size, shard_index=0,
                               shard_count=1))
  batches = [setup.global_batch(next(it)) for _ in range(num_batches)]
  t = time.perf_counter()
  with setup.context():
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
  return {"setup": setup, "step": step, "state": state, "batches": batches,
          "compile_s": time.perf_counter() - t}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", action="append", required=True,
                 help="config path[:args], as train.py takes it (repeat: each is a variant)")
  p.add_argument("--variant", action="append", default=None,
                 help="space-separated key=value overrides of one variant (repeat; '' = as is)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
  args = p.parse_args(argv)
  variants = [(c, v) for c in args.config for v in args.variant or [""]]
  runs = [build(c, v.split(), num_batches=3) for c, v in variants]
  times = [[] for _ in runs]
  for _ in range(args.rounds):
    for run, ts in zip(runs, times):
      setup = run["setup"]
      for i in range(args.steps):
        t = time.perf_counter()
        with setup.context():
          run["state"], metrics = run["step"](run["state"], run["batches"][i % len(run["batches"])])
          jax.block_until_ready(metrics)
        ts.append(time.perf_counter() - t)
  base = float(np.median(times[0]))
  label = lambda c, v: " ".join(x for x in (c if len(args.config) > 1 else "", v) if x) or "(as is)"
  print(f"{' / '.join(args.config)}: {args.rounds} rounds x {args.steps} steps, medians")
  print("| variant | step s | ratio to first | compile+first step s |")
  print("|---|---:|---:|---:|")
  rows = []
  for (c, v), run, ts in zip(variants, runs, times):
    med = float(np.median(ts))
    rows.append({"config": c, "variant": v, "step_s": med, "ratio": med / base,
                 "compile_s": run["compile_s"], "num_params": run["setup"].num_params})
    print(f"| {label(c, v)} | {med:.3f} | {med / base:.2f} | {run['compile_s']:.1f} |")
  return rows


if __name__ == "__main__":
  main()
