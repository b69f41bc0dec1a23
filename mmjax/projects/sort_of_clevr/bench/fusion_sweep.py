"""Fusion sweep: every fusion block on Sort-of-CLEVR (image + question) and AV digits (image + audio).

For each task, fusion block and modality-dropout rate, the task's config (the project's
`configs/vqa.py`, the zoo's `configs/av_digits.py`) with that `fusion` and
`model.modality_dropout` is trained by the trainer under a wall-clock budget
(`train.max_minutes`, as `relation_networks.py` does), then its final checkpoint is evaluated
on the test split three times: with every modality, and with each modality marked absent for
every example (the model's `presence=` masks, so the fusion block sees a missing modality, not a
blank one). Reported per run:

- parameters; FLOPs of one train step per training example, from XLA's cost analysis of the
  lowered train step (`lowered.cost_analysis()`, no compile); training examples/s (median of
  the trainer's logging windows). A Sort-of-CLEVR example is one image with its 20 questions; an
  AV-digits example is one image + utterance pair;
- test accuracy with both modalities and with each one absent.

  python -m mmjax.projects.sort_of_clevr.bench.fusion_sweep --minutes 5         # everything
  python -m mmjax.projects.sort_of_clevr.bench.fusion_sweep --tasks av_digits --fusions concat,film
  python -m mmjax.projects.sort_of_clevr.bench.fusion_sweep --set optim.lr=3e-4  # config overrides

Prints one markdown table and writes `results.json`, `table.md`, `sweep.png` (grouped bars of the
three accuracies per fusion block; one panel per task and dropout rate) and the runs' workdirs
(`runs/<task>/<fusion>_md<rate>/`, emptied before each run) to `--out`.

AV digits has no text: its "relation" block takes the audio as query and "film" conditions on
the audio (the configs' own `model.fusion_kwargs` are used wherever they are not empty).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from mmjax.fusion import FUSIONS
from mmjax.predict import restore_params
from mmjax.projects.sort_of_clevr.bench import relation_networks as rn
from mmjax.train.trainer import Setup, evaluate

ROOT = pathlib.Path(__file__).resolve().parents[4]  # the repository: the zoo's configs/
TASKS = {
    "sort_of_clevr": {"config": rn.CONFIG, "modalities": ("image", "text"), "fusion_kwargs": {}},
    "av_digits": {"config": ROOT / "configs" / "av_digits.py", "modalities": ("image", "audio"),
                  "fusion_kwargs": {"relation": {"query": "audio"}, "film": {"condition": "audio"}}},
}


class WithPresence:
  """A model called with `presence`: modality i is present for every example iff present[i].

  Attributes:
    model: the wrapped model (a `VQAModel` or `MultimodalClassifier`: both take `presence=`).
    names: every modality of the model, in the order of `present`.
    present: (M,) bool, traced, so that one compiled evaluation serves every combination.
  """

  def __init__(self, model, names: tuple[str, ...], present):
    self.model, self.names, self.present = model, names, present

  def __call__(self, *args, **kwargs):
    b = jax.tree.leaves(args[0])[0].shape[0]  # images (B, ...) or a dict of (B, ...) inputs
    presence = {m: jax.numpy.broadcast_to(self.present[i], (b,)) for i, m in enumerate(self.names)}
    return self.model(*args, presence=presence, **kwargs)


def train_flops_per_example(setup, cfg) -> float:
  """FLOPs of one train step / global batch size, from the lowered (not compiled) step."""
  bs = int(cfg.data.batch_size)
  local = next(iter(setup.task.dataset("train", train=True, batch_size=bs, shard_index=0, shard_count=1)))
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=setup.batch_sharding(v))
           for k, v in local.items()}
  with setup.context():
    cost = setup.make_train_step().lower(setup.abstract_state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / bs if cost else float("nan")


def absent_accuracies(cfg, workdir: pathlib.Path, step: int, names: tuple[str, ...]) -> dict[str, Any]:
  """Test accuracy of the checkpoint of `step` with all modalities and with each one absent."""
  setup = Setup(cfg)
  state, _ = restore_params(setup, workdir, step)
  eval_step = jax.jit(lambda st, b, present: setup.task.eval_fn(WithPresence(setup.model(st), names, present), b))
  acc = {}
  for absent in (None, *names):
    present = np.array([m != absent for m in names])
    acc["all" if absent is None else f"no_{absent}"] = evaluate(
        setup, state, lambda st, b: eval_step(st, b, present), "test")["test/accuracy"]
  return {"accuracy": acc, "train_flops_per_example": train_flops_per_example(setup, cfg)}


def run(args: argparse.Namespace) -> dict[str, Any]:
  out = pathlib.Path(args.out)
  results: dict[str, Any] = {"size": args.size, "minutes_budget": args.minutes, "runs": []}
  for task in args.tasks:
    spec = TASKS[task]
    for fusion in args.fusions:
      for rate in args.dropouts:
        cfg = rn.make_config(spec["config"], f"size={args.size},fusion={fusion}", minutes=args.minutes,
                              steps=args.steps, eval_every=args.eval_every, overrides=args.set)
        if not cfg.model.fusion_kwargs:
          cfg.model.fusion_kwargs = spec["fusion_kwargs"].get(fusion, {})
        cfg.model.modality_dropout = float(rate)
        workdir = out / "runs" / task / f"{fusion}_md{rate:g}"
        r = rn.train_run(cfg, workdir)
        r.update(absent_accuracies(cfg, workdir, r["steps"], spec["modalities"]))
        r.update(task=task, fusion=fusion, modality_dropout=float(rate), modalities=spec["modalities"],
                 params=int(r["final"]["num_params"]))
        del r["curve"]
        results["runs"].append(r)
        print(f"{task} {fusion} md={rate:g}: {r['steps']} steps, accuracy "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items()), file=sys.stderr, flush=True)
  return results


def table(results: dict[str, Any]) -> str:
  """One markdown table of every run."""
  lines = [f"Fusion sweep, size={results['size']}, budget {results['minutes_budget']} min per run; "
           "test accuracy (%) at the last step, with both modalities and with one absent",
           "",
           "| task | fusion | modality dropout | params | train GFLOP/example | examples/s | steps | "
           "accuracy | without image | without the other |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results["runs"]:
    acc, other = r["accuracy"], r["modalities"][1]
    lines.append(
        f"| {r['task']} | {r['fusion']} | {r['modality_dropout']:g} | {r['params']:,} | "
        f"{r['train_flops_per_example'] / 1e9:.3f} | {r['examples_per_s']:,.0f} | {r['steps']} | "
        f"{100 * acc['all']:.1f} | {100 * acc['no_image']:.1f} | {100 * acc[f'no_{other}']:.1f} ({other}) |")
  return "\n".join(lines)


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
  """Grouped bars: accuracy with all modalities and with each absent, per fusion block."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  panels = sorted({(r["task"], r["modality_dropout"]) for r in results["runs"]})
  fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
  for ax, (task, rate) in zip(axes[:, 0], panels):
    runs = [r for r in results["runs"] if r["task"] == task and r["modality_dropout"] == rate]
    keys = list(runs[0]["accuracy"])
    x = np.arange(len(runs))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
      label = "all modalities" if key == "all" else f"without {key[3:]}"
      ax.bar(x + (i - (len(keys) - 1) / 2) * width, [r["accuracy"][key] for r in runs], width, label=label)
    ax.set_xticks(x, [r["fusion"] for r in runs], fontsize=8)
    ax.set_ylim(0, 1.15)  # the legend sits above the 1.0 line, clear of the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{task}, modality dropout {rate:g}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(keys), loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
  p.add_argument("--fusions", default=",".join(FUSIONS.names()), help="comma-separated fusion names")
  p.add_argument("--dropouts", default="0,0.3", help="comma-separated model.modality_dropout rates")
  p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget per run")
  p.add_argument("--size", default="small", choices=("tiny", "small", "default"),
                 help="the configs' size argument")
  p.add_argument("--steps", type=int, default=None, help="train.steps; default: the config's")
  p.add_argument("--eval-every", type=int, default=None, help="default: the config's")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override for every run, such as optim.lr=3e-4 (repeatable)")
  p.add_argument("--out", default="workdirs/fusion_sweep",
                 help="output folder; runs already in its results.json at the same --size and "
                      "--minutes keep their rows unless redone")
  args = p.parse_args(argv)
  args.tasks = [t for t in args.tasks.split(",") if t]
  args.fusions = [f for f in args.fusions.split(",") if f]
  bad = [t for t in args.tasks if t not in TASKS] + [f for f in args.fusions if f not in FUSIONS]
  if bad or not args.tasks or not args.fusions:
    p.error(f"unknown task or fusion {bad}; tasks: {list(TASKS)}, fusions: {FUSIONS.names()}")
  try:
    args.dropouts = [float(x) for x in args.dropouts.split(",") if x]
  except ValueError:
    p.error(f"--dropouts: expected comma-separated numbers, got {args.dropouts!r}")
  if not args.dropouts or any(not 0 <= x < 1 for x in args.dropouts):
    p.error(f"--dropouts: expected rates in [0, 1), got {args.dropouts}")
  if args.minutes <= 0:
    p.error(f"--minutes: expected > 0, got {args.minutes}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = run(args)
  kept = rn.kept_results(out, results)
  key = lambda r: (r["task"], r["fusion"], r["modality_dropout"])  # noqa: E731
  if kept:  # the runs not redone stay
    redone = {key(r) for r in results["runs"]}
    results["runs"] = [r for r in kept["runs"] if key(r) not in redone] + results["runs"]
  results["runs"].sort(key=key)
  text = table(results)
  print(text, flush=True)
  (out / "table.md").write_text(text + "\n")
  plot(results, out / "sweep.png")
  with open(out / "results.json", "w") as f:
    json.dump(results, f, indent=2, default=float)
  return results


if __name__ == "__main__":
  main()
