"""Smoke test of bench/profile_step.py: its HLO classes and FLOP counts, and a --tiny run.

The FLOP counts are checked against what could disagree: the dense matmuls counted from the
executed XLA thunks must equal torch's own count of its linear layers (same model, same shapes),
and the classes of a hand-written function must come out as written.
"""

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load():
  sys.path.insert(0, str(BENCH))
  spec = importlib.util.spec_from_file_location("bench_profile_step", BENCH / "profile_step.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_hlo_classes_and_flops_of_a_small_function():
  ps = _load()
  b, m, k, n, t, d = 2, 48, 40, 24, 12, 8

  def f(x, w, q, kk, y):
    dense = x @ w                                       # (m, k) @ (k, n): 2 m k n
    scores = jnp.einsum("bqd,bkd->bqk", q, kk)           # batched: 2 b t t d
    return jnp.tanh(dense), jnp.exp(scores), y.T.copy()  # y.T: a transpose copy

  args = (jnp.ones((m, k)), jnp.ones((k, n)), jnp.ones((b, t, d)), jnp.ones((b, t, d)),
          jnp.ones((64, 32)))
  ops = ps.hlo_ops(jax.jit(f).lower(*args).compile().as_text())
  by_class = {}
  for op in ops.values():
    by_class.setdefault(op["class"], []).append(op)
  assert 2 * m * k * n in {op["flops"] for op in by_class["dense matmul"]}
  assert 2 * b * t * t * d in {op["flops"] for op in by_class["attention matmul"]}
  assert any(op["shape"].startswith("f32[32,64]") for op in by_class["layout copy"])
  assert "convolution" not in by_class


def test_split_overlaps_shares_the_wall_time_among_concurrent_events():
  ps = _load()
  events = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 6, "dur": 2}, {"ts": 30, "dur": 4}]
  # 0-5 a alone; 5-6 a,b; 6-8 a,b,c; 8-10 a,b; 10-15 b alone; 30-34 d alone.
  assert ps.split_overlaps(events) == pytest.approx([5 + 0.5 + 2 / 3 + 1, 0.5 + 2 / 3 + 1 + 5, 2 / 3, 4])
  assert sum(ps.split_overlaps(events)) == pytest.approx(15 + 4)  # the union of the intervals


def test_tiny_run_counts_the_same_dense_matmul_flops_as_torch(tmp_path, capsys):
  ps = _load()
  results = ps.main(["--tiny", "--models", "vit,bert", "--steps", "1", "--out", str(tmp_path)])
  assert json.loads((tmp_path / "profile.json").read_text()) == json.loads(json.dumps(results))
  text = capsys.readouterr().out
  for name in ("vit", "bert"):
    mm, hf = results[name]["mmjax"]["classes"], results[name]["hf"]["classes"]
    assert mm["dense matmul"]["gflop"] > 0
    assert mm["dense matmul"]["gflop"] == pytest.approx(hf["dense matmul"]["gflop"], rel=1e-6), name
    assert mm["attention matmul"]["gflop"] > 0 and mm["dense matmul"]["ms"] > 0
    assert f"### {name}: step" in text
    iso = results[name]["isolated"]
    assert len(iso["shape"]) == 3 and len(iso["gflops"]) == 3
    assert all(v["xla"] > 0 and v["torch"] > 0 for v in iso["gflops"].values())
  assert (tmp_path / "profile.md").read_text().count("| dense matmul |") == 2


def test_mlp_grad_lists_every_dot_of_the_backward_pass(capsys):
  ps = _load()
  rows = ps.main(["--mlp-grad", "--tiny"])["mlp_grad"]
  dots = [r for r in rows if r["class"] == "dense matmul"]
  # Forward x @ W1 and the backward dh = dy @ W2.T, dW2 = g.T @ dy, dx, dW1 (the forward g @ W2
  # is dead: only gradients are returned): however XLA fuses or transposes them, five matmuls
  # of 2 * 24 * 16 * 32 FLOPs each must be accounted for, once.
  flops = sum(r["gflops"] * r["raw_ms"] / 1e3 for r in dots)  # GFLOP per call
  assert flops * 1e9 == pytest.approx(5 * 2 * 24 * 16 * 32, rel=1e-3)
  assert "| HLO instruction | class |" in capsys.readouterr().out
