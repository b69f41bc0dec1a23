"""Plan a run without training: compile a config's train and eval steps for its mesh, on this
machine's devices or on a TPU pod slice that is not there, and report per chip the parameter,
optimizer-state, activation and total bytes (against the chip's HBM), the FLOPs and HBM bytes of a
step, its collectives, and a roofline estimate of the step time and MFU.

  python -m mmjax.train.plan --config mmjax/projects/sort_of_clevr/configs/vqa.py:size=small [--config.mesh.data=8]
  python -m mmjax.train.plan --config bench/tpu_plan.py:model=vit_b16 --topology v5e:4x4 \
      [--num_slices 2] [--json]

A TPU topology needs libtpu (`pip install "jax[tpu]==<jax version>"`), not a TPU; run with
JAX_PLATFORMS=cpu so that JAX does not look for a local TPU first. Batches are abstract where the
task says their shapes (`abstract_batch(split, batch_size)`, e.g. the shape-only tasks of
`mmjax.train.plan_tasks`, which configs name as "mmjax.train.plan_tasks:plan_vqa");
otherwise one real batch is drawn from its data.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any

import jax
import numpy as np

from mmjax.train import topology as topo
from mmjax.train.config import CommandLineConfig
from mmjax.train.trainer import Setup, _pad


def _bytes_per_device(tree: Any) -> int:
  """Bytes of the largest per-device shard summed over leaves of an abstract sharded tree."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def _bytes(tree: Any) -> int:
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def abstract_batch(setup: Setup, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """One global batch's shapes, sharded as the trainer shards it; eval batches carry `valid`."""
  cfg, task = setup.config, setup.task
  bs = int(cfg.data.batch_size if train else cfg.data.get("eval_batch_size", cfg.data.batch_size))
  shards = setup.batch_shards()
  if train and bs % shards:
    raise ValueError(f"data.batch_size={bs} must divide by {shards}, the number of shards of the "
                     f"batch axis on the mesh {dict(setup.mesh.shape)}")
  if not train:  # the trainer pads eval batches to a size the batch's mesh axes divide
    bs = -(-bs // shards) * shards
  split = "train" if train else task.eval_splits[0]
  if hasattr(task, "abstract_batch"):
    batch = dict(task.abstract_batch(split, bs))
    if not train and "valid" not in batch:
      batch["valid"] = jax.ShapeDtypeStruct((bs,), np.bool_)
  else:  # one real batch, as the trainer would draw it
    local = next(iter(task.dataset(split, train=train, batch_size=bs, shard_index=0, shard_count=1)))
    local = local if train else _pad(local, bs)
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in local.items()}
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding(v)) for k, v in batch.items()}


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _out_of_memory(message: str) -> dict[str, Any]:
  """What XLA's out-of-memory error says: {fits: False, required_bytes, hbm_bytes, over_bytes, error}."""
  size = r"([\d.]+)([KMGT]?)i?B?"
  m = (re.search(rf"\({size}\) exceeds available HBM \({size}\)", message)
       or re.search(rf"Used {size} of {size} hbm", message))
  out: dict[str, Any] = {"fits": False, "error": message.strip().splitlines()[0][:300]}
  if m:
    need, have = (float(m.group(i)) * _UNITS[m.group(i + 1)] for i in (1, 3))
    out.update(required_bytes=int(need), hbm_bytes_available=int(have), over_bytes=int(need - have))
  return out


def model_flops(step, *args) -> float:
  """FLOPs of the matmuls and convolutions of one call of `step` (all devices together), counted
  on its jaxpr: the model's, whatever XLA's partitioning makes of them (XLA:TPU's own count drops
  some of the matmuls it splits around FSDP's all-gathers) or adds (rematerialisation)."""
  return _jaxpr_flops(jax.make_jaxpr(step)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and conv_general_dilated, into sub-jaxprs (a scan's
  times its length, a cond's costliest branch, a while loop's body once)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name, params = eqn.primitive.name, eqn.params
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if name == "dot_general":
      (contract, _), _ = params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod([lhs[i] for i in contract])
    elif name == "conv_general_dilated":  # each output element: kernel window x input features
      rhs, spec = eqn.invars[1].aval.shape, params["dimension_numbers"].rhs_spec
      total += 2.0 * np.prod(out) * np.prod([rhs[i] for i in spec[1:]])
    subs = [_jaxpr_flops(getattr(v, "jaxpr", v)) for v in jax.tree.leaves(
        list(params.values()), is_leaf=lambda v: hasattr(v, "eqns") or hasattr(v, "jaxpr"))
            if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
    if subs:
      total += max(subs) * params.get("length", 1) if name in ("cond", "scan") else sum(subs)
  return total


def _analyse(compiled, chip: topo.Chip | None, devices, flops_model: float) -> dict[str, Any]:
  """Memory, FLOPs, HBM bytes, collectives and roofline of one compiled step, per device
  (`flops_model`: `model_flops` per device, for the MFU)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  out: dict[str, Any] = {"flops": float(cost.get("flops", float("nan"))),
                         "hbm_bytes": float(cost.get("bytes accessed", float("nan")))}
  mem = compiled.memory_analysis()
  if mem is not None:
    arg, res = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    out.update(argument_bytes=arg, output_bytes=res, alias_bytes=alias, temp_bytes=temp,
               total_bytes=arg + res - alias + temp)  # donated outputs reuse their inputs
  found = topo.collectives(compiled.as_text(), devices)
  out["collectives"] = topo.summarize_collectives(found)
  if chip is not None:
    if "total_bytes" in out:
      out["fits"] = out["total_bytes"] <= chip.hbm_bytes
      out["over_bytes"] = max(out["total_bytes"] - chip.hbm_bytes, 0)
    out["roofline"] = topo.roofline(chip, out["flops"], out["hbm_bytes"], found, flops_model)
  return out


def make_setup(config, topology: str | None = None, num_slices: int = 1) -> Setup:
  """The trainer's `Setup` of `config` over this machine's devices or `num_slices` slices of TPU
  `topology` (its mesh over their devices)."""
  if not topology:
    return Setup(config)
  devices = topo.topology_devices(topology, num_slices)
  return Setup(config, mesh=topo.make_mesh(dict(config.mesh), devices))


def plan(config, topology: str | None = None, num_slices: int = 1, eval_step: bool = True,
         setup: Setup | None = None) -> dict[str, Any]:
  """Compiles (but does not run) the train (and eval) step of `config` for this machine's devices
  or for `num_slices` slices of TPU `topology`, and reports their per-device memory, FLOPs,
  collectives and, for a TPU, HBM fit and roofline. `setup`: `make_setup`'s, if already made."""
  chip = topo.parse_topology(topology)[0] if topology else None
  setup = setup or make_setup(config, topology, num_slices)
  devices = list(setup.mesh.devices.flat)
  st = setup.abstract_state
  out: dict[str, Any] = {
      "topology": topo.parse_topology(topology)[1] if topology else f"{len(devices)} x {devices[0].device_kind}",
      "chip": dataclasses.asdict(chip) if chip else None,
      "slices": int(num_slices),
      "devices": int(setup.mesh.size),
      "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
      "parameters": setup.num_params,
      "param_bytes": _bytes(st["params"]),
      "param_bytes_per_device": _bytes_per_device(st["params"]),
      "opt_state_bytes_per_device": _bytes_per_device(st["opt_state"]),
      "model_state_bytes_per_device": _bytes_per_device(st["model_state"]),
  }
  steps = {"train": (setup.make_train_step, True)}
  if eval_step:
    steps["eval"] = (setup.make_eval_step, False)
  for key, (make, train) in steps.items():
    batch = abstract_batch(setup, train)
    out[key] = {"global_batch": {k: list(v.shape) for k, v in batch.items()},
                "batch_bytes_per_device": _bytes_per_device(batch)}
    with setup.context():
      step = make()
      lowered = step.lower(st, batch)
      flops_model = model_flops(step, st, batch) / setup.mesh.size
    out[key]["model_flops"] = flops_model
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program larger than HBM
      if chip is None or "RESOURCE_EXHAUSTED" not in str(e):
        raise
      out[key].update(_out_of_memory(str(e)))
      continue
    out[key].update(_analyse(compiled, chip, devices, flops_model))
  # Earlier flat keys (README numbers were read from these).
  out["flops_per_step"] = out["train"].get("flops", float("nan"))
  out["global_batch"] = out["train"]["global_batch"]
  return out


def _size(b: float) -> str:
  return f"{b / topo.GiB:.2f} GiB" if b >= topo.GiB / 4 else f"{b / (1 << 20):.1f} MiB"


def format_plan(p: dict[str, Any]) -> str:
  """The plan as a short per-device report."""
  chip = p["chip"]
  lines = [f"{p['topology']}" + (f" x {p['slices']} slices" if p["slices"] > 1 else "")
           + f": {p['devices']} devices, mesh {p['mesh']}, {p['parameters']:,} parameters"]
  if chip:
    lines.append(f"chip {chip['name']}: {_size(chip['hbm_bytes'])} HBM, {chip['peak_flops'] / 1e12:.0f} "
                 f"TFLOP/s bf16, HBM {chip['hbm_bw'] / 1e9:.0f} GB/s, ICI {chip['ici_bw'] / 1e9:.0f} GB/s")
  for key in ("train", "eval"):
    if key not in p:
      continue
    s = p[key]
    lines.append(f"\n{key} step, global batch {s['global_batch']}")
    lines.append(f"  per device: parameters {_size(p['param_bytes_per_device'])}, optimizer state "
                 f"{_size(p['opt_state_bytes_per_device'])}, batch {_size(s['batch_bytes_per_device'])}")
    if "error" in s:
      over = (("at least " if "temporaries" in s["error"] else "") + f"{_size(s['over_bytes'])} over"
              if "over_bytes" in s else "over")
      lines.append(f"  does not fit: {over} (XLA: {s['error']})")
      continue
    if "total_bytes" in s:
      hbm = f" of {_size(chip['hbm_bytes'])}" if chip else ""
      lines.append(f"  per device: activations/temp {_size(s['temp_bytes'])}, arguments {_size(s['argument_bytes'])}, "
                   f"outputs {_size(s['output_bytes'])} (donated {_size(s['alias_bytes'])}), "
                   f"total {_size(s['total_bytes'])}{hbm}")
      if chip:
        lines.append("  fits" if s["fits"] else f"  does not fit: {_size(s['over_bytes'])} over")
    lines.append(f"  per device: {s['model_flops'] / 1e9:,.2f} GFLOP of the model's matmuls (XLA counts "
                 f"{s['flops'] / 1e9:,.2f}), {s['hbm_bytes'] / 1e9:,.2f} GB memory traffic")
    for kind, c in s["collectives"].items():
      lines.append(f"  {kind:>18}: {c['count']:4d} ops, {c['bytes'] / 1e6:10.2f} MB results, "
                   f"{c['traffic'] / 1e6:10.2f} MB sent per device")
    if not s["collectives"]:
      lines.append("  no collectives")
    if "roofline" in s:
      r = s["roofline"]
      lines.append(f"  roofline: compute {r['compute_s'] * 1e3:.2f} ms, HBM {r['hbm_s'] * 1e3:.2f} ms, "
                   f"ICI {r['ici_s'] * 1e3:.2f} ms" + (f", DCN {r['dcn_s'] * 1e3:.2f} ms" if r["dcn_s"] else "")
                   + f" -> step >= {r['step_s'] * 1e3:.2f} ms ({r['bound']}-bound), MFU <= {r['mfu']:.1%}")
  return "\n".join(lines)


CONFIG = CommandLineConfig("plan")


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  config = CONFIG.load()
  try:
    p = plan(config, f.topology, f.num_slices, eval_step=f.eval)
  except RuntimeError as e:  # no libtpu: say how to install it
    if f.topology and not topo.libtpu_available():
      sys.exit(str(e))
    raise
  print(json.dumps(p, indent=2) if f.json else format_plan(p))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("config", None, "Config file, optionally with ':args'; then --config.KEY=VALUE overrides.")
  flags.DEFINE_string("topology", None, "TPU slice to compile for, e.g. v5e:4x4, v5p:2x2x2, v5e-256 "
                      "(needs libtpu, not a TPU); default: this machine's devices.")
  flags.DEFINE_integer("num_slices", 1, "Slices of --topology (the mesh's first divisible axis spans them).")
  flags.DEFINE_bool("eval", True, "Also compile the eval step.")
  flags.DEFINE_bool("json", False, "Print the plan as JSON.")
  app.run(main, flags_parser=CONFIG.parse)
