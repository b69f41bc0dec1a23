"""TPU pod slices without a TPU: their devices (libtpu's ahead-of-time topologies), per-chip
specifications, the collectives of a compiled program, and a roofline estimate of its step time.

  devices = topology_devices("v5e:4x4")          # 16 abstract TPU v5e devices (needs libtpu)
  mesh = make_mesh({"data": 4, "fsdp": -1}, devices)
  compiled = jax.jit(step).lower(...).compile()  # compiles for that chip, runs nothing
  collectives(compiled.as_text()); roofline(...)

Topology names: libtpu's "<chip>:<shape>" ("v5e:4x4", "v5p:2x2x2", "v4:2x2x4") or Cloud TPU's
accelerator types "<chip>-<n>" ("v5e-256", "v5p-128"), where n counts chips for v5e and v6e and
TensorCores (two per chip) for v4 and v5p.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from typing import Any, Sequence

import jax
import numpy as np

from mmjax import sharding

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: peak bf16 FLOP/s, HBM bytes and bytes/s, bidirectional ICI bytes/s summed over
  its ports, its share of its host's data-centre network bytes/s (between slices; None: not
  published), torus dimensions."""

  name: str
  peak_flops: float
  hbm_bytes: int
  hbm_bw: float
  ici_bw: float
  ici_ports: int
  dcn_bw: float | None
  torus_dims: int
  cores: int  # TensorCores per chip: v4 and v5p accelerator types count cores


# Cloud TPU docs (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}); v4's ICI, which they omit: 45 GB/s per link and direction (jax-ml.github.io/scaling-book).
CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 6 * 90e9, 6, None, 3, 2),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 400e9, 4, 25e9 / 8, 2, 1),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 1200e9, 6, 50e9 / 8, 3, 2),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1600e9, 800e9, 4, 100e9 / 8, 2, 1),
}

# Cloud TPU's slice shapes by chip count (2-D for v5e/v6e, 3-D for v4/v5p).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


def install_hint() -> str:
  return (f'compiling for TPU topologies needs libtpu: pip install "jax[tpu]=={jax.__version__}" '
          f"(or the mmjax `tpu` extra); it runs on a machine without a TPU")


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def parse_topology(name: str) -> tuple[Chip, str]:
  """"v5e:4x4" or "v5e-16" -> (its Chip, libtpu's topology name "v5e:4x4")."""
  m = re.fullmatch(r"(v\d+[a-z]*)([:-])(.+)", name.strip().lower())
  if m is None or m.group(1) not in CHIPS:
    raise ValueError(f"topology {name!r}: expected '<chip>:<shape>' or '<chip>-<n>' with chip in "
                     f"{sorted(CHIPS)}, e.g. 'v5e:4x4', 'v5p:2x2x2', 'v5e-256'")
  chip = CHIPS[m.group(1)]
  shapes = _SHAPES_3D if chip.torus_dims == 3 else _SHAPES_2D
  if m.group(2) == ":":
    shape = m.group(3)
    dims = shape.split("x")
    if len(dims) != chip.torus_dims or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise ValueError(f"topology {name!r}: {chip.name} takes a {chip.torus_dims}-D shape like "
                       f"{next(iter(shapes.values()))!r}")
  else:
    if not m.group(3).isdigit() or int(m.group(3)) % chip.cores:
      raise ValueError(f"topology {name!r}: expected a count of {'TensorCores' if chip.cores > 1 else 'chips'}")
    chips = int(m.group(3)) // chip.cores
    if chips not in shapes:
      raise ValueError(f"topology {name!r}: no standard {chip.name} slice of {chips} chips; "
                       f"name its shape instead, e.g. '{chip.name}:{next(iter(shapes.values()))}'")
    shape = shapes[chips]
  return chip, f"{chip.name}:{shape}"


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
  """The devices of `num_slices` slices of topology `name`, for compiling (not running) programs."""
  chip, topo = parse_topology(name)
  if not libtpu_available():
    raise RuntimeError(install_hint())
  from jax.experimental import topologies  # noqa: PLC0415 (probes libtpu)
  # "megacore": one device per chip where a chip has two TensorCores (v4; v5p's default already).
  config = "megacore" if chip.cores > 1 else "default"
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topo, chip_config_name=config,
                                      chips_per_host_bounds=(2, 2, 1), num_slices=int(num_slices))
  return list(desc.devices)


def make_mesh(shape: dict[str, int], devices: Sequence[Any]) -> jax.sharding.Mesh:
  """A mesh {axis: size} (one size may be -1) over `devices`, as the trainer builds it
  (`mmjax.sharding.make_mesh`: with several slices, the first axis whose size the slice count
  divides spans the slices, data parallelism over the slower network)."""
  return sharding.make_mesh(shape, devices)


# ---------------------------------------------------------------------------------------------
# Collectives of a compiled program (its HLO text after SPMD partitioning: shapes are per device).
# ---------------------------------------------------------------------------------------------
KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<shape>.*?) (?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)(?P<attrs>.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+) .*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: kind, bytes of its (per-device) result, devices per group,
  bytes each device sends (ring algorithms), whether a group spans slices."""

  kind: str
  name: str
  bytes: int
  group_size: int
  traffic: float
  cross_slice: bool = False


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. 'f32[16,1024]{1,0}' or a tuple '(bf16[8], f32[])'."""
  total = 0.0
  for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]", shape):
    size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      continue
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _iota(dims: list[int], reshape: list[int], perm: list[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  return (ids.transpose(perm) if perm else ids).reshape(dims)


def _ints(text: str) -> list[int]:
  return [int(t) for t in text.split(",") if t.strip()]


def replica_groups(attrs: str, num_devices: int) -> np.ndarray:
  """(G, S) device ids of an instruction's replica groups, in any of HLO's three spellings."""
  m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})?\}", attrs)
  if m:  # explicit: {{0,1},{2,3}}; {} = every device in one group
    groups = [_ints(g) for g in re.findall(r"\{([\d, ]*)\}", m.group(1) or "")]
    return np.array(groups) if groups else np.arange(num_devices)[None]
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
  if m:  # iota: [G,S]<=[dims]T(perm)
    dims = _ints(m.group(1))
    return _iota([-1, dims[-1]], _ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}", attrs)
  if m:  # mesh axes: mesh['a'=4,'b'=4], device_ids=([4,4]T(1,0)) {'a'}: groups along the named axes
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    reshape = _ints(m.group(2)) if m.group(2) else [math.prod(sizes)]
    ids = _iota(sizes, reshape, _ints(m.group(3)) if m.group(3) else None)
    over = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
    keep = [i for i in range(len(names)) if i not in over]
    return ids.transpose(keep + over).reshape(-1, math.prod(sizes[i] for i in over))
  return np.arange(num_devices)[None]


def _traffic(kind: str, nbytes: int, n: int) -> float:
  """Bytes each device sends for a result of `nbytes` over a group of n (ring algorithms)."""
  if n <= 1:
    return 0.0
  return {"all-reduce": 2 * (n - 1) / n * nbytes, "all-gather": (n - 1) / n * nbytes,
          "reduce-scatter": (n - 1) * nbytes, "all-to-all": (n - 1) / n * nbytes,
          "collective-permute": float(nbytes)}[kind]


def collectives(hlo: str, devices: Sequence[Any] | None = None) -> list[Collective]:
  """The collectives of a compiled module's text, each once as it runs (async pairs counted at
  their `-done`). XLA:TPU emits a reduce-scatter as a fusion calling an `all-reduce-scatter`
  computation (an all-reduce and a slice inside); it counts as one reduce-scatter. Between slices
  (Multislice) a collective is a `send` to the DCN runtime (`_xla_megascale_transfer_type`), marked
  cross-slice. `devices`: the program's devices in mesh order, to mark groups that span slices."""
  comps: dict[str, list[re.Match]] = {}
  current = None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      current = comps.setdefault(m.group("name"), [])
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      current.append(m)
  n = len(devices) if devices is not None else 1
  slice_of = (np.array([getattr(d, "slice_index", 0) or 0 for d in devices])
              if devices is not None else None)
  fused_rs = {c for c in comps if c.startswith("all-reduce-scatter")}
  starts = {m.group("name"): m for ms in comps.values() for m in ms if m.group("op").endswith("-start")}
  out = []

  def add(kind, name, nbytes, attrs):
    groups = replica_groups(attrs, n) if kind != "collective-permute" else None
    size = int(groups.shape[1]) if groups is not None else 2
    cross = False
    if slice_of is not None:
      if groups is not None:
        cross = any(len(set(slice_of[g])) > 1 for g in groups if max(g) < len(slice_of))
      else:
        pairs = [tuple(_ints(p)) for p in re.findall(r"\{(\d+,\d+)\}", attrs)]
        cross = any(slice_of[a] != slice_of[b] for a, b in pairs if max(a, b) < len(slice_of))
    out.append(Collective(kind, name, nbytes, size, _traffic(kind, nbytes, size), cross))

  def add_dcn(name, shape, attrs):  # a collective between slices, as a send to the DCN runtime
    kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', attrs).group(1).lower().replace("_", "-")
    target = re.search(r'_xla_megascale_target="\{([\d,:]+)\}', attrs)
    size = 2
    if target:
      spans = [tuple(_ints(r.replace(":", ","))) for r in target.group(1).split(",") if r]
      size = sum(b - a + 1 if len(r) == 2 else 1 for r in spans for a, b in [(r[0], r[-1])])
    nbytes = shape_bytes(re.search(r"\w+\[[\d,]*\]", shape).group(0))  # (data, context, token)
    kind = kind if kind in KINDS else "all-reduce"
    out.append(Collective(kind, name, nbytes, size, _traffic(kind, nbytes, size), True))

  for comp, ms in comps.items():
    if comp in fused_rs:  # the inside of a fused reduce-scatter, counted at its fusion
      continue
    for m in ms:
      op, name = m.group("op"), m.group("name")
      calls = re.search(r"calls=%([\w.\-]+)", m.group("attrs"))
      if op == "fusion" and calls and calls.group(1) in fused_rs:
        inner = next((i for i in comps[calls.group(1)] if i.group("op") == "all-reduce"), None)
        add("reduce-scatter", name, shape_bytes(m.group("shape")),
            inner.group("attrs") if inner else "")
      elif op in KINDS:
        add(op, name, shape_bytes(m.group("shape")), m.group("attrs"))
      elif op == "send" and "_xla_megascale_transfer_type" in m.group("attrs"):
        add_dcn(name, m.group("shape"), m.group("attrs"))
      elif op.endswith("-done") and op[:-5] in KINDS:
        start = starts.get(m.group("args").strip().lstrip("%"))
        add(op[:-5], name, shape_bytes(m.group("shape")), start.group("attrs") if start else "")
  return out


def summarize_collectives(found: Sequence[Collective]) -> dict[str, dict[str, float]]:
  """kind -> {count, bytes (results, per device), traffic (bytes sent per device)}."""
  out = {}
  for c in found:
    s = out.setdefault(c.kind, {"count": 0, "bytes": 0, "traffic": 0.0})
    s["count"] += 1
    s["bytes"] += c.bytes
    s["traffic"] += c.traffic
  return {k: out[k] for k in KINDS if k in out}


# ---------------------------------------------------------------------------------------------
# Roofline.
# ---------------------------------------------------------------------------------------------
def roofline(chip: Chip, flops: float, hbm_bytes: float, found: Sequence[Collective],
             model_flops: float | None = None) -> dict[str, float]:
  """Lower bounds on one step's time per chip from its compiled FLOPs, HBM bytes and collective
  traffic, and the MFU bound they give.

  Compute at the peak bf16 rate, memory at HBM bandwidth; each collective over one bidirectional
  ring (2 of the chip's ICI ports; XLA runs a collective along one torus axis at a time) or, when
  its groups span slices, over the chip's share of the data-centre network. The estimate is the
  largest of the three (perfect overlap); MFU = `model_flops` (default the compiled FLOPs, which
  count rematerialisation too) / (estimate * peak).
  """
  ici = sum(c.traffic for c in found if not c.cross_slice)
  dcn = sum(c.traffic for c in found if c.cross_slice)
  t = {"compute_s": flops / chip.peak_flops, "hbm_s": hbm_bytes / chip.hbm_bw,
       "ici_s": ici / (chip.ici_bw * 2 / chip.ici_ports),
       "dcn_s": dcn / chip.dcn_bw if dcn and chip.dcn_bw else 0.0}
  t["step_s"] = max(t.values())
  t["bound"] = max(("compute", "hbm", "ici", "dcn"), key=lambda k: t[f"{k}_s"])
  t["mfu"] = (model_flops if model_flops is not None else flops) / (t["step_s"] * chip.peak_flops) if t["step_s"] else 0.0
  return t
