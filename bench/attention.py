"""Train-step throughput of the cross-attention VQA model: fused attention (the default) against
the attention-map path (the cross-attention's reference kernel, what every call ran when
`attention_maps=True` was the default).

Both variants are the trainer's own step (`bench/library_step.py`) on the same model, with the
same parameters and batch: an LXMERT-style two-stream VQA model (small CNN image tokens, RNN
question tokens, two cross-modality layers updating both streams), images shared by several
questions each. Both are compiled first, then timed in alternating rounds so that machine-speed
drift hits them alike; prints each variant's median steps/s and the ratio.

  python bench/attention.py                 # ~1-2 minutes on 2 CPU cores
  python bench/attention.py --rounds 7 --steps 5 --images 16
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from bench.library_step import compile_step, make_setup  # noqa: E402
from mmjax.models.vqa import VQAModel  # noqa: E402

VARIANTS = {
    "fused (default)": {},
    "attention maps (reference cross-attention)": {"attention_maps": True},
}
VOCAB, ANSWERS, IMAGE = 64, 16, (64, 64, 3)


def model_fn(args, fusion_kwargs):
  def build(rngs):
    return VQAModel(
        encoders={"image": {"name": "small_cnn", "features": args.width, "channels": (32, 32, 32)},
                  "text": {"name": "rnn_text", "vocab_size": VOCAB, "features": args.width,
                           "hidden": args.width // 2}},
        fusion="cross_attention", features=args.width, num_answers=ANSWERS, image_shape=IMAGE,
        question_len=args.question_len, head_hidden=2 * args.width, question_tokens="all",
        fusion_kwargs={"depth": 2, "num_heads": 4, "mlp_dim": 2 * args.width, **fusion_kwargs},
        rngs=rngs)
  return build


def loss(model, batch, deterministic):
  logits, _ = model(batch["image"], batch["ids"], batch["mask"], deterministic=deterministic)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer"]).mean()


def make_batch(args):
  rng = np.random.default_rng(0)
  B, Q, L = args.images, args.questions, args.question_len
  lengths = rng.integers(4, L + 1, (B, Q, 1))
  return {"image": jnp.asarray(rng.uniform(size=(B, *IMAGE)), jnp.float32),
          "ids": jnp.asarray(rng.integers(1, VOCAB, (B, Q, L)) * (np.arange(L) < lengths), jnp.int32),
          "mask": jnp.asarray(np.arange(L) < lengths),
          "answer": jnp.asarray(rng.integers(0, ANSWERS, (B, Q)), jnp.int32)}


def main(argv=None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
  p.add_argument("--images", type=int, default=8, help="images per batch")
  p.add_argument("--questions", type=int, default=10, help="questions per image")
  p.add_argument("--question_len", type=int, default=12)
  p.add_argument("--width", type=int, default=64)
  args = p.parse_args(argv)
  batch = make_batch(args)
  runs = {}
  for name, kw in VARIANTS.items():
    setup = make_setup(model_fn(args, kw), loss, lr=1e-4, weight_decay=0.0)
    state = setup.init_state()
    t = time.perf_counter()
    step = compile_step(setup, state, batch)
    with setup.context():
      state, metrics = step(state, batch)  # warm-up
      jax.block_until_ready(metrics)
    runs[name] = {"setup": setup, "step": step, "state": state, "times": [],
                  "compile_s": time.perf_counter() - t, "loss": float(metrics["loss"])}
  losses = [r["loss"] for r in runs.values()]
  assert np.allclose(losses, losses[0], rtol=1e-4), losses  # the same model and batch
  for _ in range(args.rounds):
    for run in runs.values():
      for _ in range(args.steps):
        t = time.perf_counter()
        with run["setup"].context():
          run["state"], metrics = run["step"](run["state"], batch)
          jax.block_until_ready(metrics)
        run["times"].append(time.perf_counter() - t)
  rates = {name: 1.0 / float(np.median(run["times"])) for name, run in runs.items()}
  first = next(iter(rates.values()))
  print(f"cross-attention VQA train step, {jax.devices()[0].device_kind}, {args.images} images x "
        f"{args.questions} questions x {args.question_len} tokens, width {args.width}: "
        f"{args.rounds} rounds x {args.steps} steps, medians")
  print("| variant | steps/s | fused speed-up | compile+first step s |")
  print("|---|---:|---:|---:|")
  for name, rate in rates.items():
    print(f"| {name} | {rate:.2f} | {first / rate:.2f} | {runs[name]['compile_s']:.1f} |")
  return rates


if __name__ == "__main__":
  main()
