"""XLA profiles by HLO instruction: the compiled module's ops classed, trace events mapped to them.

Shared by `bench/profile_step.py` (XLA:CPU vs HF PyTorch) and `bench/gpu_mfu.py --profile`
(one accelerator). Imports only jax's profiler output formats and the standard library.

- `hlo_ops(compiled.as_text())`: every instruction of the compiled module with its class
  (dense matmul, attention matmul, convolution, layout copy, other) and its dot FLOPs;
- `trace_events(logdir)`: the complete events of the perfetto trace that
  `jax.profiler.trace(logdir, create_perfetto_trace=True)` wrote, each with its process and thread;
- `op_times(events, ops, steps, top)`: per-class and top-op time per step. XLA:CPU's thunk events
  are named after their HLO instruction; on a GPU the kernels run on the device's "Stream"
  threads and carry their instruction in `args["hlo_op"]` (kernels named in no instruction are
  classed by their kernel name: cuBLAS/CUTLASS GEMMs as dense matmuls, fused attention kernels
  as attention matmuls).
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import pathlib
import re
from typing import Any

CLASSES = ("dense matmul", "attention matmul", "convolution", "layout copy", "other")

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
# name = shape opcode(operands)rest; the shape may be a tuple, "(f32[8]{0}, s8[64]{0})"
# (multi-output fusions, cuBLAS custom calls).
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+?(?:\{[^}]*\})?) ([\w\-]+)\((.*?)\)(.*)$")
# Ops that only move data: a fusion of these alone (e.g. XLA's "copy_bitcast_fusion") is a copy.
_LAYOUT_OPCODES = frozenset({"parameter", "copy", "transpose", "bitcast", "reshape", "slice",
                             "concatenate", "pad", "dynamic-slice", "dynamic-update-slice",
                             "get-tuple-element", "tuple", "constant"})
_SHAPE = re.compile(r"^\(?\w+\[([\d,]*)\]")  # a tuple's first element
# Kernels that map to no HLO instruction, classed by name (GPU: cuBLAS / cuBLASLt / CUTLASS
# GEMMs, cuDNN fused attention).
_KERNEL_CLASSES = (("attention matmul", re.compile(r"fmha|flash|attention", re.I)),
                   ("dense matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|matmul", re.I)),
                   ("convolution", re.compile(r"conv", re.I)))


def _dims(shape: str) -> list[int]:
  m = _SHAPE.match(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _attr_dims(rest: str, key: str) -> list[int]:
  m = re.search(key + r"=\{([\d,]*)\}", rest)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(shapes: dict[str, str], shape: str, operands: str, contracting: list[int]) -> float:
  """2 x output elements x contracted size of one dot (or GEMM custom call: its first output)."""
  lhs = _dims(shapes.get(operands.split(",")[0].strip().lstrip("%"), ""))
  contracted = math.prod(lhs[d] for d in contracting if d < len(lhs))
  return 2.0 * math.prod(_dims(shape)) * contracted


def _gemm_dims(rest: str, key: str) -> list[int]:
  """A GEMM custom call's dot dimensions from its backend config ("lhs_contracting_dimensions":["1"])."""
  m = re.search(r'\\?"' + key + r'\\?":\[([^\]]*)\]', rest)
  return [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Every instruction of a compiled HLO module: {name: {"class", "flops", "op_name", "shape"}}.

  A fusion is classed by what the computation it calls holds (recursively): a batched dot makes
  it an attention matmul, any other dot a dense matmul, a convolution a convolution, nothing but
  data movement (copies, transposes, slices, reshapes) a layout copy.
  """
  computations: dict[str, list[tuple]] = collections.defaultdict(list)
  current = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
    elif current is not None and (m := _INSTRUCTION.match(line)):
      computations[current].append(m.groups())
  shapes = {comp: {i[0]: i[1] for i in ins} for comp, ins in computations.items()}
  cache: dict[str, dict[str, Any]] = {}

  def contents(comp: str) -> dict[str, Any]:
    if comp not in cache:
      cache[comp] = {"dot": 0, "batched": 0, "conv": 0, "flops": 0.0, "layout_only": True}
      out = dict(cache[comp])
      for name, shape, opcode, operands, rest in computations[comp]:
        sub = own(comp, name, shape, opcode, operands, rest)
        for k in ("dot", "batched", "conv", "flops"):
          out[k] += sub[k]
        out["layout_only"] &= sub["layout_only"]
      cache[comp] = out
    return cache[comp]

  def own(comp, name, shape, opcode, operands, rest) -> dict[str, Any]:
    info = {"dot": 0, "batched": 0, "conv": 0, "flops": 0.0,
            "layout_only": opcode in _LAYOUT_OPCODES}
    if opcode == "dot":
      info.update(dot=1, batched=int(bool(_attr_dims(rest, "lhs_batch_dims"))),
                  flops=_dot_flops(shapes[comp], shape, operands, _attr_dims(rest, "lhs_contracting_dims")))
    elif opcode == "convolution":
      info["conv"] = 1
    elif opcode == "custom-call":  # GPU: cuBLAS GEMMs, cuDNN attention and convolutions
      target = re.search(r'custom_call_target="([^"]*)"', rest)
      target = target.group(1).lower() if target else ""
      if "fmha" in target or "attention" in target:
        info.update(dot=1, batched=1)
      elif "gemm" in target or "matmul" in target:
        info.update(dot=1, batched=int(bool(_gemm_dims(rest, "lhs_batch_dimensions"))),
                    flops=_dot_flops(shapes[comp], shape, operands,
                                     _gemm_dims(rest, "lhs_contracting_dimensions")))
      elif "conv" in target:
        info["conv"] = 1
    for called in re.findall(r"calls=%?([\w.\-]+)", rest):
      if called in computations:
        sub = contents(called)
        for k in ("dot", "batched", "conv", "flops"):
          info[k] += sub[k]
        info["layout_only"] = sub["layout_only"]
    return info

  ops = {}
  for comp, instructions in computations.items():
    for name, shape, opcode, operands, rest in instructions:
      info = own(comp, name, shape, opcode, operands, rest)
      if info["batched"]:
        cls = "attention matmul"
      elif info["dot"]:
        cls = "dense matmul"
      elif info["conv"]:
        cls = "convolution"
      elif info["layout_only"] and opcode not in ("parameter", "bitcast", "get-tuple-element",
                                                  "tuple", "constant"):
        cls = "layout copy"
      else:
        cls = "other"
      op_name = re.search(r'op_name="([^"]*)"', rest)
      ops[name] = {"class": cls, "flops": info["flops"], "shape": shape,
                   "op_name": op_name.group(1) if op_name else ""}
  return ops


def trace_events(logdir: str) -> list[dict[str, Any]]:
  """The complete ("X") events of the perfetto trace `jax.profiler.trace` wrote under logdir,
  each with "process" and "thread" (their names in the trace's metadata, "" if unnamed)."""
  paths = sorted(pathlib.Path(logdir).rglob("perfetto_trace.json.gz"))
  if not paths:
    raise RuntimeError(f"jax.profiler.trace wrote no perfetto_trace.json.gz under {logdir}")
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {(e["name"], e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None): e["args"]["name"]
           for e in events if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
  return [dict(e, process=names.get(("process_name", e.get("pid"), None), ""),
               thread=names.get(("thread_name", e.get("pid"), e.get("tid")), ""))
          for e in events if e.get("ph") == "X"]


def split_overlaps(events: list[dict[str, Any]]) -> list[float]:
  """Each event's share of the wall time: a stretch where k events run at once counts 1/k each.

  XLA:CPU runs independent thunks side by side, each then getting part of the cores; their raw
  durations would count those stretches twice. The shares sum to the time any event ran.
  """
  edges = sorted([(e["ts"], 1, i) for i, e in enumerate(events)]
                 + [(e["ts"] + e.get("dur", 0), -1, i) for i, e in enumerate(events)],
                 key=lambda x: (x[0], x[1]))
  share = [0.0] * len(events)
  active: set[int] = set()
  last = None
  for t, kind, i in edges:
    if active and last is not None and t > last:
      part = (t - last) / len(active)
      for j in active:
        share[j] += part
    if kind == 1:
      active.add(i)
    else:
      active.discard(i)
    last = t
  return share


def class_table(rows: dict[str, dict[str, float]], steps: int) -> dict[str, dict[str, float]]:
  """Per-class totals -> per-step ms, count and GFLOP/s."""
  out = {}
  for cls in CLASSES:
    r = rows.get(cls, {"us": 0.0, "n": 0, "flops": 0.0})
    ms = r["us"] / 1e3 / steps
    out[cls] = {"ms": ms, "count": r["n"] / steps, "gflop": r["flops"] / 1e9 / steps,
                "gflops": (r["flops"] / 1e9 / steps) / (ms / 1e3) if ms and r["flops"] else math.nan}
  return out




def op_events(events: list[dict[str, Any]], ops: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """The events that are the module's work, each with "op" (its HLO instruction or kernel name).

  With an accelerator in the trace (a "/device:..." process): the kernels on its "Stream"
  threads (all of its events if it has none), named by `args["hlo_op"]`. Else (XLA:CPU): the
  thunk events named after an instruction of `ops`.
  """
  device = [e for e in events if e["process"].startswith("/device:")]
  if device:
    streams = [e for e in device if e["thread"].startswith("Stream")]
    return [dict(e, op=e.get("args", {}).get("hlo_op") or e["name"]) for e in streams or device]
  return [dict(e, op=e["name"]) for e in events if e["name"] in ops]


def op_class(op: str, kernel: str, ops: dict[str, dict[str, Any]]) -> str:
  """The class of an event: its instruction's, or by its kernel name if it maps to none."""
  if op in ops:
    return ops[op]["class"]
  return next((cls for cls, pattern in _KERNEL_CLASSES if pattern.search(kernel)), "other")


def launch_starts(events: list[dict[str, Any]]) -> list[bool]:
  """Per event: whether it starts a launch of its instruction, i.e. the event before it on its
  thread (by start time) is not of the same instruction."""
  first = [True] * len(events)
  last: dict[tuple, str] = {}
  order = sorted(range(len(events)), key=lambda i: events[i]["ts"])
  for i in order:
    e = events[i]
    where = (e.get("process"), e.get("thread"))
    first[i] = last.get(where) != e["op"]
    last[where] = e["op"]
  return first


def op_times(events: list[dict[str, Any]], ops: dict[str, dict[str, Any]], steps: int,
             top: int) -> dict[str, Any]:
  """Per-class time per step (`class_table`, overlaps split by `split_overlaps`) and the `top`
  slowest ops of `steps` profiled steps. FLOPs are counted once per launch of an instruction:
  kernels of the same instruction back to back on one thread (a cuBLAS GEMM can run as several
  kernels) are one launch; counted per kernel, the H200 profile's GEMMs came to ~1.7x the step's
  FLOPs."""
  work = op_events(events, ops)
  rows: dict[str, dict[str, float]] = {}
  per_op: dict[str, float] = collections.Counter()
  classes: dict[str, str] = {}
  launches = launch_starts(work)
  for e, us, first in zip(work, split_overlaps(work), launches):
    op = e["op"]
    cls = classes.setdefault(op, op_class(op, e["name"], ops))
    r = rows.setdefault(cls, {"us": 0.0, "n": 0, "flops": 0.0})
    r["us"] += us
    r["n"] += 1
    r["flops"] += ops.get(op, {}).get("flops", 0.0) if first else 0.0
    per_op[op] += us
  top_ops = []
  for n, us in per_op.most_common(top):
    op = ops.get(n, {"flops": 0.0, "shape": "", "op_name": ""})
    top_ops.append({"name": n, "ms": us / 1e3 / steps, "class": classes[n], "shape": op["shape"],
                    "gflops": op["flops"] / 1e9 / (us / 1e6 / steps) if op["flops"] and us else math.nan,
                    "op_name": op["op_name"]})
  return {"classes": class_table(rows, steps), "top": top_ops, "events": len(work)}
