"""Accuracy against training steps of VQA recipes on Sort-of-CLEVR, for choosing the default.

Two stages, so that the training stage needs only jax, flax, optax and numpy (it runs on an
accelerator machine that has no TFDS or Grain):

  python bench/vqa_recipe_sweep.py export --out .exp           # data + variant specs (full stack)
  python bench/vqa_recipe_sweep.py run --data .exp --out OUT   # trains every variant, in parallel
  python bench/vqa_recipe_sweep.py report OUT                  # table + accuracy-vs-steps PNG

`run` trains each variant in its own process (they share the device), evaluates on the test
and paraphrase splits every `--eval-every` steps and writes OUT/<variant>.jsonl. Steps, not
seconds, are the unit: a step is the same work on any device, and the CPU time a recipe needs
is its steps-to-target times its CPU step time (`python -m mmjax.train.plan`, or the trainer's
examples/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

KINDS = ("non_relational", "relational")
SUBTYPES = ("shape", "horizontal", "vertical", "closest", "furthest", "count")


def variant_configs():
  """name -> config: the default config and the recipes compared against it."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
  import vqa_sort_of_clevr as base  # pylint: disable=g-import-not-at-top

  def make(fusion="film", depth=None, fusion_kwargs=None, lr=None):
    c = base.get_config(f"fusion={fusion}")
    with c.unlocked():
      if depth is not None:
        c.model.vision = dict(c.model.vision, depth=depth)
      if fusion_kwargs is not None:
        c.model.fusion_kwargs = dict(fusion_kwargs)
      if lr is not None:
        c.optim.lr = lr
    return c

  one_way = {"update": ("text",), "depth": 2, "attention_maps": False}
  return {
      "film": make("film", depth=0),
      "film_vit2": make("film", depth=2),
      "film_vit2_lr2e-3": make("film", depth=2, lr=2e-3),
      "xattn_text_vit2": make("cross_attention", depth=2, fusion_kwargs=one_way),
      "xattn_text": make("cross_attention", depth=0, fusion_kwargs=one_way),
      "concat_vit2": make("concat", depth=2),
      "relation": make("relation", depth=0),
  }


def export(out: str) -> None:
  """Writes out/soc.npz (all three splits, questions at 32 tokens) and out/variants.json."""
  import mmjax.tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from mmjax.train.tasks import TASKS  # pylint: disable=g-import-not-at-top

  os.makedirs(out, exist_ok=True)
  variants = variant_configs()
  specs = {}
  for name, c in variants.items():
    task = TASKS.get(c.task)(c)
    kw = task.model_kwargs()
    kw.pop("dtype", None)
    specs[name] = {"model": kw, "optim": c.optim.to_dict(), "steps": int(c.train.steps),
                   "batch_size": int(c.data.batch_size), "max_len": int(c.data.max_len)}
  with open(os.path.join(out, "variants.json"), "w") as f:
    json.dump(specs, f, indent=1, default=list)
  c = next(iter(variants.values()))
  c.data.max_len = 32
  task = TASKS.get(c.task)(c)
  arrays = {}
  for split in ("train", "test", "paraphrase"):
    batches = list(task.dataset(split, train=False, batch_size=100, shard_index=0, shard_count=1))
    cat = lambda k: np.concatenate([b[k] for b in batches])  # noqa: E731
    valid = cat("valid")
    arrays[f"{split}_image"] = (cat("image")[valid] * 255).round().astype(np.uint8)
    arrays[f"{split}_ids"] = cat("question_ids")[valid].astype(np.int32)
    for k in ("answer", "kind", "subtype"):
      arrays[f"{split}_{k}"] = cat(k)[valid].astype(np.int32)
  np.savez_compressed(os.path.join(out, "soc.npz"), **arrays)
  print(f"wrote {out}/soc.npz and {out}/variants.json ({', '.join(specs)})")


def train_one(name: str, spec: dict, data: str, out: str, steps: int, eval_every: int,
              minutes: float, seed: int) -> None:
  """Trains one variant and appends eval records to out/<name>.jsonl."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from mmjax import losses  # pylint: disable=g-import-not-at-top
  from mmjax.models.vqa import VQAModel  # pylint: disable=g-import-not-at-top
  from mmjax.train.optim import make_optimizer  # pylint: disable=g-import-not-at-top

  d = np.load(os.path.join(data, "soc.npz"))
  kw = dict(spec["model"])
  kw["image_shape"] = tuple(kw["image_shape"])
  model = VQAModel(**kw, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optim = dict(spec["optim"])
  optim["warmup_steps"] = max(steps // 20, 1)
  tx = make_optimizer(optim, params, steps)
  opt_state = tx.init(params)
  L = spec["max_len"]

  def forward(p, images, ids, train):
    m = nnx.merge(graphdef, p, rest)
    logits, _ = m(images, ids, ids != 0, deterministic=not train)
    return logits

  @jax.jit
  def step(p, opt_state, images, ids, answer):
    def loss_fn(p):
      return losses.softmax_cross_entropy(forward(p, images, ids, True), answer)[0]
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  @jax.jit
  def predict(p, images, ids):
    return forward(p, images, ids, False).argmax(-1)

  def evaluate(p, split, length):
    imgs, ids = d[f"{split}_image"], d[f"{split}_ids"][..., :length]
    preds = [np.asarray(predict(p, jnp.asarray(imgs[i:i + 50] / 255.0, jnp.float32),
                                jnp.asarray(ids[i:i + 50])))
             for i in range(0, len(imgs), 50)]
    ok = np.concatenate(preds) == d[f"{split}_answer"]
    kind, sub = d[f"{split}_kind"], d[f"{split}_subtype"]
    r = {f"{split}/accuracy": float(ok.mean())}
    r.update({f"{split}/{k}": float(ok[kind == i].mean()) for i, k in enumerate(KINDS)})
    r.update({f"{split}/{s}": float(ok[sub == i].mean()) for i, s in enumerate(SUBTYPES)})
    return r

  rng = np.random.default_rng(seed)
  n, bs = len(d["train_image"]), spec["batch_size"]
  train_images, train_ids, train_answer = d["train_image"], d["train_ids"][..., :L], d["train_answer"]
  order, pos = rng.permutation(n), 0
  t0, losses_seen = time.perf_counter(), []
  path = os.path.join(out, f"{name}.jsonl")
  with open(path, "w") as f:
    for s in range(1, steps + 1):
      if pos + bs > n:
        order, pos = rng.permutation(n), 0
      idx = np.sort(order[pos:pos + bs])
      pos += bs
      params, opt_state, loss = step(params, opt_state, jnp.asarray(train_images[idx] / 255.0, jnp.float32),
                                     jnp.asarray(train_ids[idx]), jnp.asarray(train_answer[idx]))
      losses_seen.append(loss)
      over = time.perf_counter() - t0 > minutes * 60
      if s % eval_every == 0 or s == steps or over:
        rec = {"variant": name, "step": s, "seconds": time.perf_counter() - t0,
               "train/loss": float(np.mean(jax.device_get(losses_seen)))}
        losses_seen = []
        rec.update(evaluate(params, "test", L))
        rec.update(evaluate(params, "paraphrase", 32))
        f.write(json.dumps(rec) + "\n")
        f.flush()
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                          if "/" not in k or k.endswith(("relational", "loss"))}), flush=True)
      if over:
        break


def run(args) -> None:
  with open(os.path.join(args.data, "variants.json")) as f:
    specs = json.load(f)
  names = args.variants or list(specs)
  os.makedirs(args.out, exist_ok=True)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  procs = []
  for name in names:
    cmd = [sys.executable, __file__, "one", name, "--data", args.data, "--out", args.out,
           "--steps", str(args.steps), "--eval-every", str(args.eval_every),
           "--minutes", str(args.minutes), "--seed", str(args.seed)]
    log = open(os.path.join(args.out, f"{name}.log"), "w")
    procs.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  for name, p, log in procs:
    p.wait()
    log.close()
    print(f"{name}: exit {p.returncode}", flush=True)
  report(args.out)


def report(out: str) -> None:
  """Prints the last and best eval of every variant and writes out/recipes.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  runs = {}
  for fn in sorted(os.listdir(out)):
    if fn.endswith(".jsonl"):
      with open(os.path.join(out, fn)) as f:
        recs = [json.loads(line) for line in f if line.strip()]
      if recs:
        runs[fn[:-6]] = recs
  print("| variant | steps | test non-rel | test rel | paraphrase acc | first step with non-rel>=.95 & rel>=.80 |")
  print("|---|---|---|---|---|---|")
  for name, recs in runs.items():
    last = recs[-1]
    hit = next((r["step"] for r in recs if r["test/non_relational"] >= 0.95 and r["test/relational"] >= 0.80), None)
    print(f"| {name} | {last['step']} | {last['test/non_relational']:.3f} | {last['test/relational']:.3f} "
          f"| {last['paraphrase/accuracy']:.3f} | {hit} |")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, recs in runs.items():
    steps = [r["step"] for r in recs]
    for ax, k in zip(axes, KINDS):
      ax.plot(steps, [r[f"test/{k}"] for r in recs], label=name)
  for ax, k in zip(axes, KINDS):
    ax.set(title=f"test {k.replace('_', '-')} accuracy", xlabel="step", ylim=(0, 1))
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "recipes.png"), dpi=100)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  e = sub.add_parser("export")
  e.add_argument("--out", default=".exp")
  for p in (sub.add_parser("run"), sub.add_parser("one")):
    if p.prog.endswith("one"):
      p.add_argument("name")
    else:
      p.add_argument("--variants", nargs="*")
    p.add_argument("--data", default=".exp")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
  r = sub.add_parser("report")
  r.add_argument("out")
  args = ap.parse_args()
  if args.cmd == "export":
    export(args.out)
  elif args.cmd == "run":
    run(args)
  elif args.cmd == "one":
    with open(os.path.join(args.data, "variants.json")) as f:
      spec = json.load(f)[args.name]
    train_one(args.name, spec, args.data, args.out, args.steps, args.eval_every, args.minutes, args.seed)
  else:
    report(args.out)


if __name__ == "__main__":
  main()
