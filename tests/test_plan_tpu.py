"""Ahead-of-time plans for TPU pod slices (`mmjax.train.plan` with a topology), compiled here
without a TPU: the library's ViT-B/16 classifier and a two-stream LXMERT-style VQA model on a
v5e 4x4 slice with a (data, fsdp) mesh, and ViT-L/16's memory as FSDP grows.

The compiling tests need libtpu (the `tpu` extra: `pip install "jax[tpu]==<jax version>"`), not a
TPU; without it they fail under CI=true with that line, and skip elsewhere. Run them with
JAX_PLATFORMS=cpu (JAX then does not probe for a local TPU). The HLO-parsing and topology tests
run everywhere.

Batches are one image per chip, where XLA:TPU compiles ViT-B/16's train step in ~30 s on a
shared 2-core machine (at 4 and 16 images per chip its stride-16 patch convolution's weight
gradient alone takes 3.5 min: libtpu retries that fusion six times).
"""

import functools
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.train import plan as plan_lib
from mmjax.train import topology

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: let pytest -n share libtpu

TOPOLOGY = "v5e:4x4"
FSDP = 4
MESH = {"data": 4, "fsdp": FSDP, "tensor": 1}
SMALL = 65536  # elements: leaves below this (biases, LayerNorm, class token) may stay replicated
SMALL_SHARE = 0.01  # ... and together they stay under this share of the parameter bytes


@pytest.fixture(scope="module")
def libtpu():
  """Fails under CI=true, skips elsewhere, where libtpu is missing; the message says how to install it."""
  if not topology.libtpu_available():
    if os.environ.get("CI", "").lower() in ("true", "1"):
      pytest.fail(topology.install_hint(), pytrace=False)
    pytest.skip(topology.install_hint())


@functools.cache
def _bench():
  """bench/tpu_plan.py, whose configs the tests compile."""
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "tpu_plan.py"
  spec = importlib.util.spec_from_file_location("bench_tpu_plan", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _plan(model, batch, mesh=MESH, **kw):
  """(plan, Setup) of the train step of bench/tpu_plan.py's `model` on TOPOLOGY."""
  config = _bench().make_config(model, batch, mesh, **kw)
  setup = plan_lib.make_setup(config, TOPOLOGY)
  return plan_lib.plan(config, TOPOLOGY, eval_step=False, setup=setup), setup


def _leaf_bytes(tree):
  """[(path, bytes, bytes per chip, elements)] of an abstract sharded tree."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    n = int(np.prod(leaf.shape))
    size = np.dtype(leaf.dtype).itemsize
    out.append((jax.tree_util.keystr(path), n * size,
                int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * size, n))
  return out


def assert_fsdp_sharded(tree, fsdp):
  """Every leaf of SMALL elements or more holds at most 1/fsdp of itself per chip; the smaller
  (replicated) ones add under SMALL_SHARE of the total."""
  leaves = _leaf_bytes(tree)
  big = [(p, b, c) for p, b, c, n in leaves if n >= SMALL and c * fsdp > b]
  assert not big, f"leaves not sharded {fsdp} ways: {big[:5]}"
  total = sum(b for _, b, _, _ in leaves)
  small = sum(b for _, b, _, n in leaves if n < SMALL)
  assert small <= SMALL_SHARE * total, (small, total)
  per_chip = sum(c for _, _, c, _ in leaves)
  assert per_chip <= total / fsdp + small, (per_chip, total / fsdp, small)


def assert_reduce_scattered(p, setup, fsdp):
  """Gradients leave the backward pass reduce-scattered over fsdp, not all-reduced in full: the
  all-reduces carry at most an f32 copy of the trainable elements' 1/fsdp share (e.g. the shards'
  all-reduce over `data`) plus the small leaves in full, where one full all-reduce of gradients is
  >= 2 bytes per element (bf16); and reduce-scatters carry at least half the share at 2 bytes
  (the rest is computed sharded, e.g. an embedding's scatter-add, or is small)."""
  frozen = jax.tree.leaves(setup.frozen)
  leaves = [x for x, f in zip(_leaf_bytes(setup.abstract_state["params"]), frozen) if not f]
  big = sum(n for _, _, _, n in leaves if n >= SMALL)
  small = sum(n for _, _, _, n in leaves if n < SMALL)
  coll = p["train"]["collectives"]
  rs = coll.get("reduce-scatter", {}).get("bytes", 0)
  ar = coll.get("all-reduce", {}).get("bytes", 0)
  assert ar <= 4 * (big / fsdp + small), f"all-reduce results {ar:,} B > {4 * (big / fsdp + small):,.0f} B: {coll}"
  assert rs >= 0.5 * 2 * big / fsdp, f"reduce-scatter results {rs:,} B < {big / fsdp:,.0f} B: {coll}"


def assert_fits(p, hbm=16 * topology.GiB):
  """The train step compiled within HBM (XLA:TPU refuses a larger one: `plan` reports its error)."""
  s = p["train"]
  over = s.get("over_bytes", max(s.get("total_bytes", 0) - hbm, 0))
  assert s["fits"] and s["total_bytes"] <= hbm, (
      f"does not fit: {over / topology.GiB:.2f} GiB over ({s.get('error', 'compiled')})")


# -- compiled for a v5e 4x4 slice ------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b16(libtpu):
  return _plan("vit_b16", 16)  # one 224 px image per chip


@pytest.fixture(scope="module")
def lxmert(libtpu):
  # Two streams (BERT question tokens, ViT image patches) that attend to each other in each
  # cross-modality layer; smaller than LXMERT's BERT-base / 5 layers to keep the compile short.
  return _plan("lxmert_vqa", 16, text_variant="bert-small", vision_variant="S/16", cross_layers=2)


@pytest.mark.parametrize("name", ["vit_b16", "lxmert"])
def test_fsdp_parameters_per_chip(name, request):
  p, setup = request.getfixturevalue(name)
  assert p["chip"]["name"] == "v5e" and p["devices"] == 16 and p["mesh"]["fsdp"] == FSDP
  assert_fsdp_sharded(setup.abstract_state["params"], FSDP)
  # The compiled step takes the state as Setup shards it: its arguments are the per-chip state
  # and batch (XLA:TPU pads small leaves to its tiles: within 2%).
  expected = (p["param_bytes_per_device"] + p["opt_state_bytes_per_device"]
              + p["model_state_bytes_per_device"] + p["train"]["batch_bytes_per_device"])
  assert p["train"]["argument_bytes"] == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", ["vit_b16", "lxmert"])
def test_gradients_reduce_scattered(name, request):
  p, setup = request.getfixturevalue(name)
  assert_reduce_scattered(p, setup, FSDP)


@pytest.mark.parametrize("name", ["vit_b16", "lxmert"])
def test_fits_v5e_hbm(name, request):
  p, _ = request.getfixturevalue(name)
  assert_fits(p)
  assert p["train"]["flops"] > 0 and p["train"]["roofline"]["step_s"] > 0
  assert plan_lib.format_plan(p).count("fits") == 1


def test_vit_b16_model_flops(vit_b16):
  """The model FLOPs the MFU counts equal ViT-B/16's matmuls and patch convolution counted by hand:
  forward, then its transpose twice (input and weight gradients), less the images' gradient."""
  p, _ = vit_b16
  d, mlp, n, layers = 768, 3072, 197, 12
  patch = (n - 1) * 16 * 16 * 3 * d
  fwd = patch + layers * (n * (4 * d * d + 2 * d * mlp) + 2 * n * n * d) + d * 1000  # multiply-adds
  assert p["train"]["model_flops"] * p["devices"] == 16 * 2 * (3 * fwd - patch)
  r = p["train"]["roofline"]
  assert r["mfu"] == pytest.approx(p["train"]["model_flops"] / (r["step_s"] * p["chip"]["peak_flops"]))


def test_vit_l16_memory_falls_with_fsdp(libtpu):
  """Parameters + optimizer state per chip of ViT-L/16 on 16 chips, fsdp = 1, 2, 4, 16 (the
  trainer's shardings; no step compiled): exactly 1/fsdp of the leaves of SMALL elements or more
  (all of ViT-L's divide by 16), plus at most the small ones whole (under SMALL_SHARE)."""
  for fsdp in (1, 2, 4, 16):
    config = _bench().make_config("vit_l16", 16, {"data": 16 // fsdp, "fsdp": fsdp, "tensor": 1})
    setup = plan_lib.make_setup(config, TOPOLOGY)
    leaves = _leaf_bytes({k: setup.abstract_state[k] for k in ("params", "opt_state")})
    total = sum(b for _, b, _, _ in leaves)
    big = [(b, c) for _, b, c, n in leaves if n >= SMALL]
    small = [(b, c) for _, b, c, n in leaves if n < SMALL]
    assert total > 3 * 4 * 300e6  # f32 parameters and two Adam moments of ViT-L's 304 M
    assert sum(c for _, c in big) * fsdp == sum(b for b, _ in big), fsdp
    assert sum(c for _, c in small) <= sum(b for b, _ in small) < SMALL_SHARE * total


def test_cross_slice_collectives(libtpu):
  """Two slices: the mesh's data axis spans them, so an all-reduce over it is marked cross-slice
  (it runs over the data-centre network) and one over fsdp is not."""
  devices = topology.topology_devices("v5e:2x2", num_slices=2)
  assert len(devices) == 8
  mesh = topology.make_mesh({"data": 2, "fsdp": -1}, devices)
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slices == np.arange(2)[:, None]).all()  # data index = slice
  x = jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=NamedSharding(mesh, P("data", "fsdp")))
  for axis, cross in (("data", True), ("fsdp", False)):
    # The sum over one axis stays sharded over the other: no gather after the reduction.
    f = jax.jit(lambda a, axis=axis: a.sum(0 if axis == "data" else 1),
                out_shardings=NamedSharding(mesh, P("fsdp" if axis == "data" else "data")))
    found = topology.collectives(f.lower(x).compile().as_text(), list(mesh.devices.flat))
    reductions = [c for c in found if c.kind == "all-reduce"]
    assert reductions and all(c.cross_slice == cross for c in reductions), (axis, found)


# -- everywhere ----------------------------------------------------------------------------------
def test_without_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setattr(topology, "libtpu_available", lambda: False)
  with pytest.raises(RuntimeError, match=rf'pip install "jax\[tpu\]=={jax.__version__}"'):
    topology.topology_devices("v5e:4x4")


def test_topology_names():
  assert topology.parse_topology("v5e:4x4")[1] == "v5e:4x4"
  assert topology.parse_topology("v5e-256")[1] == "v5e:16x16"
  assert topology.parse_topology("v5p-128")[1] == "v5p:4x4x4"  # v5p counts TensorCores: 64 chips
  assert topology.parse_topology("v4-32")[1] == "v4:2x2x4"
  assert topology.parse_topology("v6e-16")[0].peak_flops == 918e12
  for bad in ("v5e:4x4x4", "v7:2x2", "v5p-3", "v5e-24"):
    with pytest.raises(ValueError):
      topology.parse_topology(bad)


def test_replica_group_spellings():
  groups = lambda attrs, n=16: topology.replica_groups(attrs, n).tolist()
  assert groups("replica_groups={{0,2},{1,3}}") == [[0, 2], [1, 3]]
  assert groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
  assert groups("replica_groups=[2,4]<=[8]") == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert groups("replica_groups=[2,4]<=[4,2]T(1,0)") == [[0, 2, 4, 6], [1, 3, 5, 7]]
  # Named mesh axes (4, 1, 4) over devices iota(16).reshape(4, 4).T, grouped along axis_0.
  mesh = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=4], device_ids=([4,4]T(1,0)) {'axis_0'}"
  ids = np.arange(16).reshape(4, 4).T.reshape(4, 1, 4)
  assert groups(mesh) == [ids[:, 0, j].tolist() for j in range(4)]
  assert groups("replica_groups=mesh['a'=2,'b'=4] {'b'}", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]


HLO = """\
HloModule jit_step, entry_computation_layout={(f32[64,128]{1,0})->f32[16,128]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%all-reduce-scatter.3 (input: f32[64,128]) -> f32[16,128] {
  %input = f32[64,128]{1,0} parameter(0)
  %all-reduce.9 = f32[64,128]{1,0:T(8,128)} all-reduce(%input), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %dynamic-slice.5 = f32[16,128]{1,0} dynamic-slice(%all-reduce.9, %c, %c), dynamic_slice_sizes={16,128}
}

ENTRY %main (p: f32[64,128]) -> f32[16,128] {
  %p = f32[64,128]{1,0} parameter(0)
  %fusion = f32[16,128]{1,0:T(8,128)S(1)} fusion(%p), kind=kCustom, calls=%all-reduce-scatter.3, backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion"}}
  %all-gather-start = (bf16[16,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(%q), channel_id=4, replica_groups=[1,4]<=[4], dimensions={0}
  %all-gather-done = bf16[64,128]{1,0} all-gather-done(%all-gather-start)
  %all-reduce.1 = (f32[128]{0}, bf16[8]{0}) all-reduce(%a, %b), channel_id=5, replica_groups={{0,1},{2,3}}, to_apply=%add
  %collective-permute = f32[4,128]{1,0} collective-permute(%r), channel_id=6, source_target_pairs={{0,1},{1,2},{2,3}}
  %send.20 = (bf16[48,8,128]{2,1,0:T(8,128)(2,1)}, u32[], token[]) send(%r, %after-all.20), channel_id=30, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:15}",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %out = f32[16,128]{1,0} add(%fusion, %fusion)
}
"""


def test_collectives_from_hlo():
  found = {c.name: c for c in topology.collectives(HLO)}
  assert set(found) == {"fusion", "all-gather-done", "all-reduce.1", "collective-permute", "send.20"}
  rs, ag, ar, cp, dcn = (found[k] for k in ("fusion", "all-gather-done", "all-reduce.1", "collective-permute", "send.20"))
  assert not any(c.cross_slice for c in (rs, ag, ar, cp))
  # Between two slices: a send to the DCN runtime; 2 (n - 1) / n of its bytes leave each chip.
  assert (dcn.kind, dcn.bytes, dcn.group_size, dcn.traffic, dcn.cross_slice) == ("all-reduce", 48 * 8 * 128 * 2, 2, 48 * 8 * 128 * 2, True)
  assert (rs.kind, rs.bytes, rs.group_size, rs.traffic) == ("reduce-scatter", 16 * 128 * 4, 4, 3 * 16 * 128 * 4)
  assert (ag.kind, ag.bytes, ag.group_size, ag.traffic) == ("all-gather", 64 * 128 * 2, 4, 0.75 * 64 * 128 * 2)
  assert (ar.kind, ar.bytes, ar.group_size, ar.traffic) == ("all-reduce", 128 * 4 + 8 * 2, 2, 128 * 4 + 8 * 2)
  assert (cp.kind, cp.bytes, cp.traffic) == ("collective-permute", 4 * 128 * 4, 4 * 128 * 4)
  summary = topology.summarize_collectives(found.values())
  assert list(summary) == ["all-reduce", "reduce-scatter", "all-gather", "collective-permute"]
  chip = topology.CHIPS["v5e"]
  r = topology.roofline(chip, flops=chip.peak_flops * 1e-3, hbm_bytes=0.0, found=list(found.values()))
  assert r["compute_s"] == pytest.approx(1e-3) and r["bound"] == "compute" and r["mfu"] == pytest.approx(1.0)
  ici = rs.traffic + ag.traffic + ar.traffic + cp.traffic
  assert r["ici_s"] == pytest.approx(ici / (chip.ici_bw / 2))  # one bidirectional ring: 2 of 4 ports
  assert r["dcn_s"] == pytest.approx(dcn.traffic / chip.dcn_bw)
