"""Training MFU of ViT-B/16 and CLIP B/16 in bfloat16 on one accelerator, with the matmul limit.

For each model, the trainer's train step (`mmjax.train.trainer.Setup.make_train_step` through
`bench/library_step.py`: forward + backward, global norm, the non-finite guard, AdamW; bfloat16
compute, float32 parameters and optimizer state; dropout 0; synthetic inputs made on the device)
is compiled once (its state donated) and timed: the median of `--steps` steps after `--warmup`.
Reported per model:

- FLOPs of one step from XLA's cost analysis of the step lowered for the CPU
  (`lowered.cost_analysis()`: the HLO before optimisation, which GPU backends do not analyse),
  the analytic matmul FLOPs (3 x the forward
  pass's matmuls: patchify, projections, MLPs, QK^T and AV, heads) as a check, and the count of
  the compiled step (`compiled.cost_analysis()`). On GPU the compiled count leaves out the
  matmuls that XLA hands to cuBLAS (it came out 20x too low on an H200), so it is not used;
- achieved TFLOP/s (the HLO count / median step time), MFU = that / `--peak-tflops` (the chip's
  dense bf16 spec; H200 SXM: 989), and the fraction of the measured limit: the median rate of a
  jitted bf16 (n, n) @ (n, n) matmul in the same run.

  python bench/gpu_mfu.py --batch 256                     # ViT-B/16 and CLIP B/16 (bench/gpu.sh)
  python bench/gpu_mfu.py --tiny                          # seconds on a CPU; the smoke test
  python bench/gpu_mfu.py --profile bench/gpu_out/profile # also: where each step's time goes

`--profile DIR` then runs `--profile-steps` more steps of each model under `jax.profiler.trace`
and writes, per model, the trace (`DIR/<model>/`: open it in Perfetto or TensorBoard) and the
compiled HLO (`DIR/<model>.hlo.txt`), and prints each op class's time per step (dense matmul,
attention matmul, convolution, layout copy, other: `bench/xla_trace.py`, which maps the GPU
kernels to their HLO instructions) and the slowest ops.

The models:

- vit: `mmjax.encoders.vision.ViT("B/16")`, 224 px, 1000 classes, softmax cross-entropy.
- clip: `mmjax.models.dual_encoder.DualEncoder` of a ViT-B/16 image tower (quick-GELU) and a
  12-layer text tower (`BertEncoder`: D 512, 8 heads, MLP 2048, vocab 49408, length 77, CLS-pooled),
  512-wide projections, CLIP loss over the batch.

`--tiny` shrinks both to ViT-Ti widths, depth 2, 32 px images, batch 2, 2 steps.

Beyond jax, flax, optax and numpy it needs what `mmjax.train.trainer` imports (ml_collections,
orbax-checkpoint); `bench/gpu.sh` says how to bring what the accelerator machine lacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmjax.encoders.text import BertEncoder
from mmjax.encoders.vision import ViT, decode_variant
from mmjax.models.dual_encoder import DualEncoder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import library_step  # noqa: E402  (bench/library_step.py: the trainer's step around a model)
import xla_trace  # noqa: E402  (bench/xla_trace.py: HLO op classes, trace events)

MODELS = ("vit", "clip")
LR, WEIGHT_DECAY = 1e-4, 0.01  # AdamW
H200_BF16_TFLOPS = 989.0  # NVIDIA H200 SXM, dense bf16 tensor-core peak (spec sheet)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# XLA compiler options of --tiny (LLVM optimisation off): fast CPU compiles for the smoke test.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Size:
  """Shapes of one run.

  Attributes:
    vit: `ViT` constructor keywords (width, depth, heads, mlp_dim, patch, image_size).
    text: text tower widths (hidden, depth, heads, mlp_dim, vocab_size, max_len).
    classes: ViT classification head outputs.
    embed: CLIP projection width.
  """

  vit: dict[str, int]
  text: dict[str, int]
  classes: int = 1000
  embed: int = 512


FULL = Size(vit={**decode_variant("B/16"), "image_size": 224},
            text=dict(hidden=512, depth=12, heads=8, mlp_dim=2048, vocab_size=49408, max_len=77))
TINY = Size(vit={**decode_variant("Ti/16"), "depth": 2, "image_size": 32},
            text=dict(hidden=32, depth=2, heads=2, mlp_dim=64, vocab_size=500, max_len=8),
            classes=10, embed=16)


def _layers_flops(b: int, t: int, d: int, m: int, depth: int) -> float:
  """Matmul FLOPs of `depth` transformer blocks on (b, t, d) tokens with MLP width m."""
  return depth * (2 * b * t * (4 * d * d + 2 * d * m) + 4 * b * t * t * d)


def vit_forward_flops(v: dict[str, int], b: int) -> float:
  """Matmul FLOPs of one ViT forward pass (patchify, blocks), without the head."""
  p = v["patch"] if isinstance(v["patch"], int) else v["patch"][0]
  n = (v["image_size"] // p) ** 2
  return 2 * b * n * (p * p * 3) * v["width"] + _layers_flops(b, n + 1, v["width"], v["mlp_dim"], v["depth"])


def analytic_flops(name: str, size: Size, b: int) -> float:
  """Matmul FLOPs of one train step: 3 x the forward pass (forward + two backward matmuls)."""
  fwd = vit_forward_flops(size.vit, b)
  if name == "vit":
    fwd += 2 * b * size.vit["width"] * size.classes
  else:
    t = size.text
    fwd += _layers_flops(b, t["max_len"], t["hidden"], t["mlp_dim"], t["depth"])
    fwd += 2 * b * (size.vit["width"] + t["hidden"]) * size.embed + 2 * b * b * size.embed
  return 3.0 * fwd


def build(name: str, size: Size, dtype) -> tuple[Callable[[nnx.Rngs], nnx.Module], Callable[..., jax.Array]]:
  """The model's constructor (bf16 compute, f32 parameters) and its loss on a batch dict."""
  if name == "vit":
    def model(rngs):
      return ViT(None, **size.vit, num_classes=size.classes, dtype=dtype, rngs=rngs)

    def loss(m, b, deterministic):
      logits = m.classify(b["images"], deterministic=deterministic).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    return model, loss
  t = size.text
  hw = size.vit["image_size"]
  examples = {"image": jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32),
              "text": (jax.ShapeDtypeStruct((1, t["max_len"]), jnp.int32),
                       jax.ShapeDtypeStruct((1, t["max_len"]), jnp.bool_))}

  def model(rngs):
    image = ViT(None, **size.vit, act="quick_gelu", ln_eps=1e-5, dtype=dtype, rngs=rngs)
    text = BertEncoder("bert-base", **t, act="quick_gelu", ln_eps=1e-5, pooler=False, pool="cls",
                       dropout=0.0, attn_dropout=0.0, dtype=dtype, rngs=rngs)
    return DualEncoder(encoders={"image": image, "text": text}, input_examples=examples,
                       embed_dim=size.embed, loss_type="clip", dtype=dtype, rngs=rngs)

  def loss(m, b, deterministic):
    emb, _ = m({"image": b["images"], "text": (b["ids"], b["mask"])}, deterministic=deterministic)
    return m.loss(emb)[0]

  return model, loss


def make_batch(name: str, size: Size, b: int, dtype) -> dict[str, jax.Array]:
  """Synthetic inputs on the default device (images in the compute dtype)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  hw = size.vit["image_size"]
  batch = {"images": jax.random.normal(k1, (b, hw, hw, 3), dtype)}  # (B, H, W, 3)
  if name == "vit":
    batch["labels"] = jax.random.randint(k2, (b,), 0, size.classes, jnp.int32)
  else:
    t = size.text
    batch["ids"] = jax.random.randint(k2, (b, t["max_len"]), 1, t["vocab_size"], jnp.int32)
    batch["mask"] = jnp.ones((b, t["max_len"]), bool)
  return batch


def cpu_hlo_flops(model, loss, batch: dict[str, jax.Array]) -> float:
  """FLOPs of the train step from XLA's cost analysis of its HLO lowered for the CPU."""
  cpu = library_step.make_setup(model, loss, lr=LR, weight_decay=WEIGHT_DECAY,
                                devices=jax.devices("cpu"))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  with cpu.context():
    return library_step.flops(cpu.make_train_step().lower(cpu.abstract_state, abstract))


def matmul_limit(n: int, dtype, reps: int, inner: int = 10) -> dict[str, float]:
  """Median TFLOP/s of a jitted (n, n) @ (n, n) matmul; each sample times `inner` calls."""
  k1, k2 = jax.random.split(jax.random.key(1))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [f(a, b) for _ in range(inner)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / inner)
  med = statistics.median(times)
  return {"n": n, "median_ms": med * 1e3, "tflops": 2 * n ** 3 / med / 1e12}


def run_model(name: str, size: Size, b: int, dtype, steps: int, warmup: int,
              compiler_options: dict[str, Any] | None = None, profile: str | None = None,
              profile_steps: int = 3) -> dict[str, Any]:
  """Compiles (with `compiler_options`) and times the trainer's train step of one model; with
  `profile` (a folder), then profiles `profile_steps` more steps (`xla_trace.op_times`)."""
  model, loss = build(name, size, dtype)
  setup = library_step.make_setup(model, loss, lr=LR, weight_decay=WEIGHT_DECAY)
  state = setup.init_state()
  batch = make_batch(name, size, b, dtype)
  hlo_flops = cpu_hlo_flops(model, loss, batch)
  t0 = time.perf_counter()
  compiled = library_step.compile_step(setup, state, batch, compiler_options)
  compile_s = time.perf_counter() - t0
  losses, times = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  out = {}
  if profile:
    hlo = compiled.as_text()
    os.makedirs(profile, exist_ok=True)
    with open(os.path.join(profile, f"{name}.hlo.txt"), "w") as f:
      f.write(hlo)
    logdir = os.path.join(profile, name)
    try:  # a profiler failure (e.g. no CUPTI) must not cost the timings above
      with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(profile_steps):
          state, metrics = compiled(state, batch)
          jax.block_until_ready((state, metrics))
      out["profile"] = xla_trace.op_times(xla_trace.trace_events(logdir), xla_trace.hlo_ops(hlo),
                                          profile_steps, top=15)
    except Exception as e:  # noqa: BLE001  (reported in the table and on stderr)
      out["profile_error"] = f"{type(e).__name__}: {e}"
      print(f"{name}: --profile failed: {out['profile_error']}", file=sys.stderr, flush=True)
  return {**out, "params": setup.num_params, "compile_s": compile_s,
          "step_ms": [t * 1e3 for t in times], "median_ms": statistics.median(times) * 1e3,
          "hlo_flops": hlo_flops, "compiled_flops": library_step.flops(compiled),
          "analytic_flops": analytic_flops(name, size, b), "first_loss": losses[0],
          "last_loss": losses[-1]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype")
  p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                 help="the chip's dense peak in the compute dtype (MFU denominator)")
  p.add_argument("--matmul-n", type=int, default=8192, help="size of the matmul-limit probe")
  p.add_argument("--tiny", action="store_true", help="tiny models, batch 2, 2 steps (smoke test)")
  p.add_argument("--out", default=None, help="also write the results as JSON here")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="also profile each model's step: traces, HLO and op-class times to DIR")
  p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per model")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  bad = [m for m in args.models if m not in MODELS]
  if bad or not args.models:
    p.error(f"--models: unknown {bad}; expected a subset of {MODELS}")
  if args.profile_steps < 1:
    p.error(f"--profile-steps: expected >= 1, got {args.profile_steps}")
  if args.tiny:
    args.batch, args.steps, args.warmup, args.matmul_n = 2, 2, 1, 256
  return args


def table(results: dict[str, Any]) -> str:
  """The markdown table of a run."""
  peak, limit = results["peak_tflops"], results["matmul"]["tflops"]
  lines = [
      f"device: {results['device']} — compute {results['dtype']}, params float32 — batch "
      f"{results['batch']} — median of {results['steps']} steps after {results['warmup']}",
      f"matmul limit ({results['matmul']['n']}² {results['dtype']}): {limit:.1f} TFLOP/s "
      f"({limit / peak:.1%} of the {peak:g} TFLOP/s peak)",
      "",
      "| model | params | ms/step | HLO GFLOP/step | analytic GFLOP/step | compiled GFLOP/step "
      "| TFLOP/s | MFU | of matmul limit | compile s |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in results["models"].items():
    tflops = r["hlo_flops"] / (r["median_ms"] / 1e3) / 1e12
    lines.append(f"| {name} | {r['params']:,} | {r['median_ms']:.1f} | "
                 f"{r['hlo_flops'] / 1e9:,.1f} | {r['analytic_flops'] / 1e9:,.1f} | "
                 f"{r['compiled_flops'] / 1e9:,.1f} | {tflops:.1f} | {tflops / peak:.1%} | "
                 f"{tflops / limit:.1%} | {r['compile_s']:.1f} |")
  for name, r in results["models"].items():
    if "profile" in r:
      lines += ["", profile_table(name, r["median_ms"], r["profile"])]
    elif "profile_error" in r:
      lines += ["", f"{name}: profile failed: {r['profile_error']}"]
  return "\n".join(lines)


def profile_table(name: str, step_ms: float, prof: dict[str, Any]) -> str:
  """Markdown: each op class's ms/step, share of the timed step, GFLOP and TFLOP/s; the top ops."""
  lines = [f"{name}: where the step's time goes ({prof['events']} kernel/thunk events profiled)", "",
           "| class | ms/step | of the step | GFLOP/step | TFLOP/s |", "|---|---:|---:|---:|---:|"]
  for cls, c in prof["classes"].items():
    tflops = f"{c['gflops'] / 1e3:.1f}" if c["gflop"] and c["ms"] else "-"
    lines.append(f"| {cls} | {c['ms']:.2f} | {c['ms'] / step_ms:.1%} | {c['gflop']:,.1f} | {tflops} |")
  total = sum(c["ms"] for c in prof["classes"].values())
  lines += [f"| sum | {total:.2f} | {total / step_ms:.1%} | | |", "", "slowest ops (HLO instruction "
            "or kernel, class, output shape, ms/step, TFLOP/s, source op):", ""]
  lines += [f"- `{t['name']}` {t['class']} `{t['shape'].split('{')[0]}` {t['ms']:.2f} ms "
            + (f"{t['gflops'] / 1e3:.1f} TFLOP/s " if t["gflops"] == t["gflops"] else "")
            + f"({t['op_name'].split('/', 1)[-1]})" for t in prof["top"]]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  size = TINY if args.tiny else FULL
  dtype = DTYPES[args.dtype]
  dev = jax.devices()[0]
  results: dict[str, Any] = {
      "device": f"{dev.platform} {dev.device_kind}", "jax": jax.__version__, "dtype": args.dtype,
      "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
      "peak_tflops": args.peak_tflops, "matmul": matmul_limit(args.matmul_n, dtype, max(args.steps, 3)),
      "models": {}}
  for name in args.models:
    results["models"][name] = run_model(name, size, args.batch, dtype, args.steps, args.warmup,
                                        FAST_COMPILE if args.tiny else None, args.profile,
                                        args.profile_steps)
    print(f"{name}: {results['models'][name]['median_ms']:.1f} ms/step", file=sys.stderr, flush=True)
  print(table(results), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
