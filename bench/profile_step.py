"""Where the time of a train step goes: mmjax per compiled HLO op vs HF PyTorch per aten op.

The steps are `bench/throughput.py`'s (same models, inputs and optimizer). The mmjax step runs
under `jax.profiler.trace`; XLA:CPU records one trace event per executed thunk, named after its
HLO instruction, so each event is mapped back to the compiled HLO (`compiled.as_text()`) and
classed by what the instruction computes. The HF step runs under `torch.profiler` and each aten
op's self time is classed the same way. Both sides' matmul FLOPs are counted from shapes (XLA:
the dot's operand and contracting dimensions; torch: the profiler's `with_flops`).

Classes: "dense matmul" (dots without batch dimensions: the linear layers, forward and
backward), "attention matmul" (batched dots: q.k and weights.v and their gradients; on the HF
side the fused SDPA kernels, whose FLOPs torch does not count), "convolution", "layout copy"
(copies and transposes, fused or not), "other" (elementwise ops, reductions, the optimizer).

Also, per model, the MLP up-projection's three matmuls (forward, weight and input gradient) are
timed alone in both frameworks: the GEMM kernels' own speed, to set against what the step gets.

  python bench/profile_step.py                       # vit, bert, lxmert; 3 profiled steps each
  python bench/profile_step.py --models vit --top 15 --out bench/profile_out
  python bench/profile_step.py --mlp-grad            # a two-layer MLP's gradient, per thunk

Run it on an idle machine; the profilers add a few percent per op. XLA:CPU runs independent
thunks side by side on its threads; a stretch where k of them run at once is split evenly among
them (`split_overlaps`), so the mmjax classes sum to the time the step's thunks ran, about its
wall time, and their GFLOP/s are what the step got out of that class. One blind spot: plain
`dot` thunks (Eigen, e.g. the weight gradients) may finish asynchronously; their events cover
only the launch and their work lands inside whatever thunks overlap them (usually other dots),
so class totals hold but per-op rates of those neighbours read low.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import torch
import torch.profiler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (bench/throughput.py: the models, inputs and steps)
import xla_trace  # noqa: E402  (bench/xla_trace.py: HLO op classes, trace events)
from xla_trace import CLASSES, class_table, hlo_ops, split_overlaps  # noqa: E402

def profile_mmjax(case: throughput.Case, batch_np: throughput.Batch, steps: int,
                  top: int) -> dict[str, Any]:
  """Per-class and top-op thunk times of the compiled mmjax train step."""
  s = throughput.mmjax_step(case, batch_np, {})
  ops = hlo_ops(s["compiled"].as_text())
  for _ in range(2):
    s["one"]()
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(steps):
        s["one"]()
      wall = (time.perf_counter() - t0) / steps
    events = xla_trace.trace_events(logdir)
  return {"wall_ms": 1e3 * wall, **xla_trace.op_times(events, ops, steps, top), "xla_flops": s["flops"]}


_TORCH_MATMUL = {"aten::mm": "dense matmul", "aten::addmm": "dense matmul",
                 "aten::bmm": "attention matmul", "aten::baddbmm": "attention matmul"}


def _torch_class(name: str) -> str:
  if name in _TORCH_MATMUL:
    return _TORCH_MATMUL[name]
  if "scaled_dot_product" in name:
    return "attention matmul"
  if "convolution" in name or name.startswith("aten::conv"):
    return "convolution"
  if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"):
    return "layout copy"
  return "other"


def profile_hf(case: throughput.Case, batch_np: throughput.Batch, steps: int,
               top: int) -> dict[str, Any]:
  """Per-class and top-op self times of the HF PyTorch eager train step."""
  s = throughput.hf_step(case, batch_np, "default")
  for _ in range(2):
    s["one"]()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              with_flops=True) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      s["one"]()
    wall = (time.perf_counter() - t0) / steps
  rows: dict[str, dict[str, float]] = {}
  per_op = []
  for a in prof.key_averages():
    if a.self_cpu_time_total <= 0 or a.key.startswith(("ProfilerStep", "Optimizer.")):
      continue
    cls = _torch_class(a.key)
    r = rows.setdefault(cls, {"us": 0.0, "n": 0, "flops": 0.0})
    r["us"] += a.self_cpu_time_total
    r["n"] += a.count
    r["flops"] += a.flops or 0
    per_op.append((a.self_cpu_time_total, a.key, cls, a.count, a.flops or 0))
  per_op.sort(reverse=True)
  top_ops = [{"name": k, "ms": us / 1e3 / steps, "class": cls, "count": n / steps,
              "gflops": fl / 1e9 / (us / 1e6) if fl else math.nan}
             for us, k, cls, n, fl in per_op[:top]]
  return {"wall_ms": 1e3 * wall, "classes": class_table(rows, steps), "top": top_ops}


def mlp_gemms(size: dict[str, int]) -> tuple[int, int, int]:
  """(tokens, width, mlp) of a model's MLP up-projection in the profiled step (the text tower's
  for CLIP): the largest dense matmuls of every case."""
  width, mlp = size.get("width", size.get("t_width")), size.get("mlp", size.get("t_mlp"))
  seq = size["seq"] if "seq" in size else (size["image"] // size["patch"]) ** 2 + 1
  return size["batch"] * seq, width, mlp


def isolated_gemms(tokens: int, width: int, mlp: int, reps: int = 10) -> dict[str, dict[str, float]]:
  """GFLOP/s of the MLP up-projection's three matmuls run alone, jitted XLA vs torch: forward
  x @ W, weight gradient x.T @ dy, input gradient dy @ W.T (medians of `reps`)."""
  import statistics  # noqa: PLC0415

  rng = np.random.default_rng(0)
  x, w, dy = (rng.standard_normal(s, dtype=np.float32)
              for s in ((tokens, width), (width, mlp), (tokens, mlp)))
  flops = 2.0 * tokens * width * mlp
  forms = {"forward x @ W": (lambda a, b, c: a @ b, (x, w, dy)),
           "weight grad x.T @ dy": (lambda a, b, c: a.T @ c, (x, w, dy)),
           "input grad dy @ W.T": (lambda a, b, c: c @ b.T, (x, w, dy))}

  def rate(fn) -> float:
    times, _ = throughput._timed(fn, reps, 2)
    return flops / statistics.median(times) / 1e9

  out = {}
  for name, (f, args) in forms.items():
    jf, jargs = jax.jit(f), [jax.numpy.asarray(a) for a in args]
    targs = [torch.from_numpy(a) for a in args]
    out[name] = {"xla": rate(lambda: jf(*jargs).block_until_ready()),
                 "torch": rate(lambda: f(*targs))}
  return out


def mlp_grad_thunks(tokens: int, width: int, mlp: int, steps: int = 10) -> list[dict[str, Any]]:
  """Per-thunk times of the gradient of a two-layer GELU MLP, sum(gelu(x @ W1) @ W2), w.r.t.
  W1, W2 and x: the smallest program that shows how XLA:CPU schedules backward dots.

  Returns one row per HLO instruction, slowest first: name, class, shape, raw ms (event
  duration), split ms (`split_overlaps`) and GFLOP/s over the raw time.
  """
  rng = np.random.default_rng(0)
  x, w1, w2 = (jax.numpy.asarray(rng.standard_normal(sh, dtype=np.float32) * 0.05)
               for sh in ((tokens, width), (width, mlp), (mlp, width)))

  def loss(w1, w2, x):
    return jax.numpy.sum(jax.nn.gelu(x @ w1, approximate=False) @ w2)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(w1, w2, x).compile()
  ops = hlo_ops(compiled.as_text())
  for _ in range(3):
    jax.block_until_ready(compiled(w1, w2, x))
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(compiled(w1, w2, x))
    events = xla_trace.op_events(xla_trace.trace_events(logdir), ops)  # the thunks of `ops`
  totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  for e, share in zip(events, split_overlaps(events)):
    totals[e["name"]][0] += e.get("dur", 0)
    totals[e["name"]][1] += share
  rows = [{"name": n, "class": ops[n]["class"], "shape": ops[n]["shape"].split("{")[0],
           "raw_ms": raw / 1e3 / steps, "split_ms": split / 1e3 / steps,
           "gflops": ops[n]["flops"] / 1e9 / (raw / 1e6 / steps) if ops[n]["flops"] and raw else math.nan,
           "op_name": ops[n]["op_name"]} for n, (raw, split) in totals.items()]
  return sorted(rows, key=lambda r: -r["split_ms"])


def _fmt(x: float, digits: int = 1) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def markdown(name: str, r: dict[str, Any]) -> str:
  mm, hf = r["mmjax"], r["hf"]
  lines = [f"### {name}: step {mm['wall_ms']:.0f} ms mmjax, {hf['wall_ms']:.0f} ms HF (profiled)",
           "",
           "| class | mmjax ms/step | mmjax GFLOP | mmjax GFLOP/s | HF ms/step | HF GFLOP | HF GFLOP/s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for cls in CLASSES:
    a, b = mm["classes"][cls], hf["classes"][cls]
    lines.append(f"| {cls} | {_fmt(a['ms'])} | {_fmt(a['gflop'])} | {_fmt(a['gflops'])} | "
                 f"{_fmt(b['ms'])} | {_fmt(b['gflop'])} | {_fmt(b['gflops'])} |")
  a = sum(mm["classes"][c]["ms"] for c in CLASSES)
  b = sum(hf["classes"][c]["ms"] for c in CLASSES)
  lines += [f"| sum | {_fmt(a)} | | | {_fmt(b)} | | |", "",
            "mmjax top ops (HLO instruction, class, output shape, ms/step, GFLOP/s, source op):", ""]
  lines += [f"- `{t['name']}` {t['class']} `{t['shape'].split('{')[0]}` {t['ms']:.1f} ms "
            f"{_fmt(t['gflops'])} GFLOP/s ({t['op_name'].removeprefix('jit(train_step)/')})"
            for t in mm["top"]]
  lines += ["", "HF top ops (aten op, class, calls/step, ms/step, GFLOP/s):", ""]
  lines += [f"- `{t['name']}` {t['class']} x{t['count']:.0f} {t['ms']:.1f} ms {_fmt(t['gflops'])} GFLOP/s"
            for t in hf["top"]]
  if "isolated" in r:
    t, d, m = r["isolated"]["shape"]
    lines += ["", f"The MLP up-projection's matmuls alone (tokens {t}, width {d}, MLP {m}), GFLOP/s:", "",
              "| matmul | XLA (jit) | torch |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['xla']:.0f} | {v['torch']:.0f} |" for k, v in r["isolated"]["gflops"].items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vit,bert,lxmert",
                 help=f"comma-separated subset of {','.join(throughput.CASES)}")
  p.add_argument("--steps", type=int, default=3, help="profiled steps per side (after 2 warm-up)")
  p.add_argument("--top", type=int, default=10, help="how many of the slowest ops to list")
  p.add_argument("--tiny", action="store_true", help="the smoke-test sizes")
  p.add_argument("--no-isolated", dest="isolated", action="store_false",
                 help="skip timing the MLP matmuls alone")
  p.add_argument("--mlp-grad", action="store_true",
                 help="instead: per-thunk times of a two-layer MLP's gradient at ViT-S/16's MLP "
                      "shapes (1576 tokens, 384 -> 1536), the backward-dot schedule alone")
  p.add_argument("--out", help="folder for profile.json and profile.md")
  args = p.parse_args(argv)
  if args.mlp_grad:
    shape = (24, 16, 32) if args.tiny else (1576, 384, 1536)
    rows = mlp_grad_thunks(*shape)
    print(f"gradient of sum(gelu(x @ W1) @ W2), x {shape[:2]}, W1 {shape[1:]}; ms per call:\n")
    print("| HLO instruction | class | shape | raw ms | split ms | GFLOP/s (raw) | source op |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
      print(f"| `{r['name']}` | {r['class']} | `{r['shape']}` | {r['raw_ms']:.2f} | {r['split_ms']:.2f} | "
            f"{_fmt(r['gflops'], 0)} | {r['op_name'].split('/', 1)[-1]} |")
    return {"mlp_grad": rows}
  models = [m for m in args.models.split(",") if m]
  unknown = [m for m in models if m not in throughput.CASES]
  if unknown or args.steps < 1:
    p.error(f"--models: unknown {unknown}, expected names from {list(throughput.CASES)}"
            if unknown else f"--steps: expected >= 1, got {args.steps}")
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  size = "tiny" if args.tiny else "full"
  results, text = {}, []
  for name in models:
    case = throughput.CASES[name](throughput.SIZES[name][size], None)
    batch_np = case.make_batch(np.random.default_rng(0))
    results[name] = {"mmjax": profile_mmjax(case, batch_np, args.steps, args.top),
                     "hf": profile_hf(case, batch_np, args.steps, args.top)}
    if args.isolated:
      shape = mlp_gemms(case.size)
      results[name]["isolated"] = {"shape": shape, "gflops": isolated_gemms(*shape)}
    text.append(markdown(name, results[name]))
    print(text[-1] + "\n", flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
      f.write("\n\n".join(text) + "\n")
  return results


if __name__ == "__main__":
  main()
