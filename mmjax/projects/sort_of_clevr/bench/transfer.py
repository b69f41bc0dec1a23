"""Cross-modal transfer: does pretrained language knowledge carry over to unseen wordings?

  python -m mmjax.projects.sort_of_clevr.bench.transfer [--steps 2000] [--size default]
  python -m mmjax.projects.sort_of_clevr.bench.transfer --steps 3 --size tiny   # smoke run, seconds

VQA on Sort-of-CLEVR (the project's configs/transfer.py over configs/vqa.py), one training run
(`mmjax.train.trainer.train`) per question encoder:
  finetune     pretrained all-MiniLM-L6-v2 trained at a small learning rate (the seed's recipe)
  frozen       pretrained MiniLM fixed
  lora         pretrained MiniLM fixed, LoRA adapters trained
  scratch_rnn  a (bi)LSTM from scratch on the data set's own tokenizer
  scratch_bert a bert-tiny from scratch on the data set's own tokenizer
Each is scored on the `test` split (the training templates, new images) and on the held-out
`paraphrase` split (wordings no training question uses, new images), per question kind
and subtype. Prints markdown tables and writes them with the raw numbers (JSON) and a bar chart
(PNG) to --out-dir. "time (s)" is the wall time of this call (compilation and the final
evaluation included): a variant resumed from a checkpoint counts only its resumed part, and
variants run side by side share the cores, so compare step costs with bench/step_time.py:

  C=mmjax/projects/sort_of_clevr/configs/transfer.py
  python bench/step_time.py --rounds 3 --steps 2 --config $C:transfer=scratch \\
      --config $C:transfer=frozen --config $C:transfer=lora --config $C:transfer=finetune
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax

from mmjax.data.datasets.sort_of_clevr import SUBTYPES
from mmjax.train import trainer
from mmjax.train.config import load_config

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "transfer.py"
VARIANTS = {  # name -> configs/transfer.py arguments
    "finetune": "transfer=finetune",
    "frozen": "transfer=frozen",
    "lora": "transfer=lora",
    "scratch_rnn": "transfer=scratch,scratch=rnn",
    "scratch_bert": "transfer=scratch,scratch=bert",
}
SPLITS = ("test", "paraphrase")
KINDS = (("non_relational", "non-rel"), ("relational", "rel"), ("", "all"))


def variant_config(variant: str, size: str, steps: int | None, fusion: str, max_minutes: float = 0.0):
  """The variant's config (`mmjax.train.config.load_config` of the project's configs/transfer.py);
  with `steps`, a run of that many steps evaluated once at its end.

  `max_minutes` replaces the base config's wall-clock cap (30 minutes at size=default): 0, the
  default here, runs every variant to its last step, so that all are compared at equal steps."""
  arg = f"{VARIANTS[variant]},size={size}" + (f",fusion={fusion}" if fusion else "")
  c = load_config(f"{CONFIG}:{arg}")
  if steps is not None:
    c.train.steps = steps
    c.optim.warmup_steps = max(steps // 20, 1)
    c.train.log_every = max(steps // 20, 1)
  c.train.eval_every = c.train.steps
  c.train.checkpoint_every = max(c.train.steps // 8, 1)  # a killed MiniLM run loses <= 1/8 of it
  c.train.max_minutes = float(max_minutes)
  return c


def run_variant(variant: str, workdir: str, *, size: str, steps: int | None, fusion: str,
                max_minutes: float = 0.0) -> dict:
  """Trains one variant in `workdir` (resuming if it holds checkpoints) and returns its scores."""
  config = variant_config(variant, size, steps, fusion, max_minutes)
  t0 = time.perf_counter()
  final = trainer.train(config, workdir, progress=False)
  seconds = time.perf_counter() - t0
  if final.get("preempted"):
    raise SystemExit(f"{variant}: stopped at step {final['step']} (SIGTERM) before its last step; "
                     f"the same command resumes it from {workdir}")
  if "test/accuracy" not in final:
    raise SystemExit(f"{variant}: {workdir} holds step {final['step']} but no evaluation of it")
  row = {"variant": variant, "steps": int(final["step"]), "seconds": seconds,
         "num_params": int(final["num_params"]), "text": config.model.encoders.text.name}
  for split in SPLITS:
    for kind in [k for k, _ in KINDS] + list(SUBTYPES):
      key = f"{split}/accuracy" + (f"_{kind}" if kind else "")
      row[key] = float(final[key])
  return row


def markdown(rows: list[dict]) -> str:
  head = ["variant", "text encoder"] + [f"{s} {short}" for s in SPLITS for _, short in KINDS]
  head += ["steps", "time (s)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    accs = [r[f"{s}/accuracy" + (f"_{k}" if k else "")] for s in SPLITS for k, _ in KINDS]
    cells = [r["variant"], r["text"]] + [f"{100 * a:.1f}" for a in accs]
    cells += [str(r["steps"]), f"{r['seconds']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def subtype_markdown(rows: list[dict]) -> str:
  """Accuracy (%) per question subtype, "test / paraphrase" in each cell."""
  lines = ["| variant | " + " | ".join(SUBTYPES) + " |", "|" + "---|" * (len(SUBTYPES) + 1)]
  for r in rows:
    cells = [f"{100 * r[f'test/accuracy_{s}']:.1f} / {100 * r[f'paraphrase/accuracy_{s}']:.1f}"
             for s in SUBTYPES]
    lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  """Grouped bars: accuracy per variant, test vs paraphrase, per question kind."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, len(KINDS), figsize=(4 * len(KINDS), 3.6), sharey=True)
  width = 0.8 / len(SPLITS)
  for ax, (kind, short) in zip(axes, KINDS):
    for i, split in enumerate(SPLITS):
      key = f"{split}/accuracy" + (f"_{kind}" if kind else "")
      xs = [j + (i - (len(SPLITS) - 1) / 2) * width for j in range(len(rows))]
      ax.bar(xs, [100 * r[key] for r in rows], width, label=split)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right")
    ax.set_title(f"{short} questions")
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("accuracy (%)")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="finetune,frozen,lora,scratch_rnn",
                 help=f"comma-separated, from {list(VARIANTS)}")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
  p.add_argument("--size", default="default", help="tiny | small | default (as the VQA config)")
  p.add_argument("--fusion", default="", help="fusion block (default: the VQA config's)")
  p.add_argument("--max-minutes", type=float, default=0.0,
                 help="wall-clock cap per variant (0: none, every variant runs all its steps)")
  p.add_argument("--workdir", default=None,
                 help="one folder per variant below it (a folder with checkpoints resumes); "
                      "default a fresh temporary folder")
  p.add_argument("--out-dir", default="workdirs/transfer",
                 help="where transfer.md, transfer.json and transfer.png go")
  args = p.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    p.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
  if args.steps is not None and args.steps < 1:
    p.error(f"--steps: expected a positive int, got {args.steps}")
  root = args.workdir or tempfile.mkdtemp(prefix="mmjax_transfer_")
  rows = []
  for v in variants:
    print(f"== {v}", file=sys.stderr, flush=True)
    rows.append(run_variant(v, os.path.join(root, v), size=args.size, steps=args.steps,
                            fusion=args.fusion, max_minutes=args.max_minutes))
  table = markdown(rows) + "\n\nPer subtype, test / paraphrase (%):\n\n" + subtype_markdown(rows)
  print(table)
  os.makedirs(args.out_dir, exist_ok=True)
  machine = f"{platform.processor() or platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}"
  header = (f"VQA on Sort-of-CLEVR, size={args.size}, accuracy (%) per question kind on the test "
            f"and paraphrase splits; {machine}.\n\n")
  with open(os.path.join(args.out_dir, "transfer.md"), "w") as f:
    f.write(header + table + "\n")
  results = {"size": args.size, "fusion": args.fusion or None, "machine": machine, "rows": rows}
  with open(os.path.join(args.out_dir, "transfer.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot(rows, os.path.join(args.out_dir, "transfer.png"))
  return results


if __name__ == "__main__":
  main()
