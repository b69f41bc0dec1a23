"""The Relation Networks table (Santoro et al. 2017) on the embedded Sort-of-CLEVR, English questions.

Each model is the project's config (`configs/vqa.py`) with its `fusion` set, trained by the trainer
(`mmjax.train.trainer.train`) in a fresh workdir under a wall-clock budget (`train.max_minutes`:
training stops at the first logging step past `--minutes`, compiles included, then evaluates and
saves), with the test set evaluated every `train.eval_every` steps. The learning-rate schedule
runs over the config's `train.steps` (or `--steps`): a run cut by the budget stops before its
schedule ends.

  python -m mmjax.projects.sort_of_clevr.bench.relation_networks --minutes 30   # the five models
  python -m mmjax.projects.sort_of_clevr.bench.relation_networks --models relation,film --size small
  python -m mmjax.projects.sort_of_clevr.bench.relation_networks --set optim.lr=3e-4  # overrides

Prints three markdown tables (relational / non-relational / paraphrase test accuracy with steps,
time, throughput and the paper's figures; accuracy per question subtype; non-relational accuracy
per colour the question names) and writes to `--out`: `results.json`, `table.md`, `curves.png`
(test accuracy per kind against minutes), `colours.png` (non-relational accuracy per named colour
against minutes, one panel per model: which colours a model has learned to find), and one
workdir per model under `runs/` (metrics.jsonl, TensorBoard events, the final checkpoint). Each
model's workdir is emptied before its run.

The models (Santoro et al.'s names in brackets), each a `fusion` argument of the config:
- flat_concat: late fusion [CNN+MLP]: as in the paper, the CNN's 5x5 feature map flattened and
  concatenated with the question vector into an MLP (no Transformer over the grid: one more
  stride-2 conv, `model.encoders.image.depth=0`, the project's flattened concat; `MODEL_OVERRIDES`);
- relation: a relation network over the CNN's cells conditioned on the question [CNN+RN], on a
  5x5 grid (one more stride-2 conv, as in the paper; `MODEL_OVERRIDES`);
- film: the question FiLM-modulates the image cells;
- cross_attention: two streams joined by cross-attention layers (LXMERT-style);
- single_stream: one Transformer over image and question tokens together.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from typing import Any

import numpy as np

from mmjax.data.datasets.sort_of_clevr import KINDS, SUBTYPES
from mmjax.data.scenes import COLORS
from mmjax.fusion import FUSIONS
from mmjax.train import trainer
from mmjax.train.config import load_config

MODELS = ("flat_concat", "relation", "film", "cross_attention", "single_stream")
LABELS = {"flat_concat": "late fusion (CNN+MLP)", "concat": "late fusion, mean-pooled",
          "relation": "relation network (CNN+RN)",
          "film": "FiLM", "cross_attention": "two-stream cross-attention",
          "single_stream": "single-stream"}
# Santoro et al. 2017, Sort-of-CLEVR: CNN+RN above 94% on both kinds; CNN+MLP 63% on relational
# questions while reaching the RN's level on non-relational ones.
PAPER = {"flat_concat": {"relational": "63%", "non_relational": "> 94%"},
         "relation": {"relational": "> 94%", "non_relational": "> 94%"}}
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "vqa.py"
# Per-model overrides, applied before --set. A relation network's cost grows with the square of
# its objects: on the default 10x10 grid (101 objects with the "missing" one, 10,201 pairs per
# question) a step took 64x the late-fusion step; a fourth stride-2 conv gives the paper's 5x5
# grid (676 pairs), 6.5x. The paper's CNN+MLP sees the flattened feature map of the same 5x5
# grid, without the config's Transformer layers over it (see the project README).
MODEL_OVERRIDES = {"relation": ["model.encoders.image.channels=(32,32,32,32)"],
                   "flat_concat": ["model.encoders.image.channels=(32,32,32,32)", "model.encoders.image.depth=0",
                                   'model.fusion_kwargs={"flatten": {"image": 25}}']}


def make_config(config_file: pathlib.Path, arg: str, *, minutes: float | None, steps: int | None,
                eval_every: int | None, overrides: list[str]):
  """The config `config_file:arg` with overrides, a time budget, and a single final save."""
  cfg = load_config(f"{config_file}:{arg}", overrides)
  if steps:
    cfg.train.steps = int(steps)
  if eval_every:
    cfg.train.eval_every = int(eval_every)
  cfg.train.checkpoint_every = int(cfg.train.steps)  # the budget's last step saves too
  cfg.train.max_minutes = minutes
  return cfg


def model_config(name: str, args: argparse.Namespace):
  """The config of model `name`: its `MODEL_OVERRIDES`, then the command line's --set."""
  return make_config(CONFIG, f"size={args.size},fusion={name}", minutes=args.minutes,
                     steps=args.steps, eval_every=args.eval_every,
                     overrides=MODEL_OVERRIDES.get(name, []) + args.set)


def train_run(cfg, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains `cfg` in an emptied `workdir`; the final metrics, wall time and the eval curve rows."""
  if workdir.exists():
    shutil.rmtree(workdir)
  t0 = time.time()
  final = trainer.train(cfg, str(workdir), progress=False)
  wall = time.time() - t0
  rows = trainer.read_metrics(str(workdir))
  rates = [r["train/examples_per_s"] for r in rows if "train/examples_per_s" in r]
  evals = [{**r, "minutes": (r["time"] - t0) / 60} for r in rows if "test/accuracy" in r]
  return {"final": final, "steps": int(final["step"]), "minutes": wall / 60,
          "examples_per_s": float(np.median(rates)) if rates else float("nan"), "curve": evals}


def run(args: argparse.Namespace) -> dict[str, Any]:
  out = pathlib.Path(args.out)
  results: dict[str, Any] = {"size": args.size, "minutes_budget": args.minutes, "models": {}}
  for name in args.models:
    cfg = model_config(name, args)
    r = train_run(cfg, out / "runs" / name)
    r["params"] = int(r["final"]["num_params"])
    r["questions_per_step"] = int(cfg.data.batch_size) * 20
    results["models"][name] = r
    f = r["final"]
    print(f"{name}: {r['steps']} steps in {r['minutes']:.1f} min, relational "
          f"{f.get('test/accuracy_relational', float('nan')):.3f}, non-relational "
          f"{f.get('test/accuracy_non_relational', float('nan')):.3f}", file=sys.stderr, flush=True)
  return results


def _pct(x: float | None) -> str:
  return "" if x is None else f"{100 * x:.1f}"


def table(results: dict[str, Any]) -> str:
  """The accuracy table and the per-subtype table, in markdown."""
  lines = [
      f"Sort-of-CLEVR (English questions), size={results['size']}, budget "
      f"{results['minutes_budget']} min per model; test accuracy (%) at the last step",
      "",
      "| model | fusion | params | steps | minutes | questions/s | relational | non-relational | "
      "paraphrase | paper relational | paper non-relational |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in results["models"].items():
    f, paper = r["final"], PAPER.get(name, {})
    lines.append(
        f"| {LABELS.get(name, name)} | {name} | {r['params']:,} | {r['steps']} | {r['minutes']:.1f} | "
        f"{r['examples_per_s'] * 20:,.0f} | {_pct(f.get('test/accuracy_relational'))} | "
        f"{_pct(f.get('test/accuracy_non_relational'))} | {_pct(f.get('paraphrase/accuracy'))} | "
        f"{paper.get('relational', '')} | {paper.get('non_relational', '')} |")
  lines += ["", "| model | " + " | ".join(SUBTYPES) + " |", "|---|" + "---:|" * len(SUBTYPES)]
  for name, r in results["models"].items():
    f = r["final"]
    lines.append(f"| {name} | " + " | ".join(_pct(f.get(f"test/accuracy_{s}")) for s in SUBTYPES) + " |")
  lines += ["", "Non-relational accuracy (%) per colour the question names:", "",
            "| model | " + " | ".join(COLORS) + " |", "|---|" + "---:|" * len(COLORS)]
  for name, r in results["models"].items():
    f = r["final"]
    lines.append(f"| {name} | " + " | ".join(_pct(f.get(f"test/accuracy_non_relational_{c}"))
                                             for c in COLORS) + " |")
  return "\n".join(lines)


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
  """Test accuracy per question kind against wall-clock minutes, one line per model."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, len(KINDS), figsize=(6 * len(KINDS), 4), sharey=True)
  for ax, kind in zip(axes, KINDS):
    for name, r in results["models"].items():
      pts = [(row["minutes"], row[f"test/accuracy_{kind}"]) for row in r["curve"]
             if f"test/accuracy_{kind}" in row]
      if pts:
        ax.plot(*zip(*pts), marker=".", label=LABELS.get(name, name))
    ax.axhline(0.94, color="gray", ls="--", lw=0.8, label="paper CNN+RN (> 94%)")
    if kind == "relational":
      ax.axhline(0.63, color="gray", ls=":", lw=0.8, label="paper CNN+MLP (63%)")
    ax.set_title(f"{kind.replace('_', '-')} questions")
    ax.set_xlabel("wall-clock minutes")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy")
  axes[-1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_colours(results: dict[str, Any], path: pathlib.Path) -> bool:
  """Non-relational test accuracy per named colour against minutes, one panel per model (a model
  learns to find the named object one colour at a time). False (nothing written) if no model's
  curve has the per-colour metrics."""
  models = [(name, r) for name, r in results["models"].items()
            if any(f"test/accuracy_non_relational_{COLORS[0]}" in row for row in r["curve"])]
  if not models:
    return False
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True, squeeze=False)
  for ax, (name, r) in zip(axes[0], models):
    for c in COLORS:
      pts = [(row["minutes"], row[f"test/accuracy_non_relational_{c}"]) for row in r["curve"]
             if f"test/accuracy_non_relational_{c}" in row]
      ax.plot(*zip(*pts), marker=".", color="tab:" + c if c != "yellow" else "gold", label=c)
    ax.set_title(f"{LABELS.get(name, name)}: non-relational")
    ax.set_xlabel("wall-clock minutes")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test accuracy per named colour")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(MODELS),
                 help=f"comma-separated fusion arguments of the config (default: {','.join(MODELS)})")
  p.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget per model")
  p.add_argument("--size", default="default", choices=("tiny", "small", "default"),
                 help="the config's size argument")
  p.add_argument("--steps", type=int, default=None,
                 help="train.steps (schedule length); default: the config's")
  p.add_argument("--eval-every", type=int, default=None, help="default: the config's")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override such as optim.lr=3e-4 (repeatable)")
  p.add_argument("--out", default="workdirs/relation_networks",
                 help="output folder; models already in its results.json at the same --size and "
                      "--minutes keep their rows unless rerun")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  if args.minutes <= 0:
    p.error(f"--minutes: expected > 0, got {args.minutes}")
  bad = [m for m in args.models if model_config(m, args).model.fusion not in FUSIONS]
  if bad or not args.models:
    p.error(f"--models: unknown {bad}; expected {', '.join(MODELS)} or names from {FUSIONS.names()}")
  return args


def kept_results(out: pathlib.Path, results: dict[str, Any]) -> dict[str, Any] | None:
  """The results.json already in `out` if it was written at the same size and budget as
  `results` (its rows then stay unless redone), else None."""
  path = out / "results.json"
  if not path.exists():
    return None
  kept = json.loads(path.read_text())
  same = (kept.get("size"), kept.get("minutes_budget")) == (results["size"], results["minutes_budget"])
  return kept if same else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = run(args)
  kept = kept_results(out, results)
  if kept:  # the rows of models not rerun stay
    results["models"] = {**{k: v for k, v in kept["models"].items() if k not in results["models"]},
                         **results["models"]}
  text = table(results)
  print(text, flush=True)
  (out / "table.md").write_text(text + "\n")
  plot(results, out / "curves.png")
  plot_colours(results, out / "colours.png")
  with open(out / "results.json", "w") as f:
    json.dump(results, f, indent=2, default=float)
  return results


if __name__ == "__main__":
  main()
