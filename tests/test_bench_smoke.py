"""Smoke test of bench/throughput.py at its --tiny setting, so that the benchmark does not rot.

It checks what the run produces, never how fast anything is: both sides train every model, the
parameter counts agree with HF's (exactly where the layouts are the same), XLA's FLOP count of a
train step is about three forward passes, the table and JSON are written, and the mmjax side
runs the trainer's step (its non-finite guard).
"""

import importlib.util
import json
import math
import os
import pathlib
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


def _load():
  spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
  spec.loader.exec_module(module)
  return module


def _vit_forward_matmul_flops(s):
  """2 * multiply-adds of the matmuls in one ViT forward pass (patchify, blocks, head)."""
  b, d, m = s["batch"], s["width"], s["mlp"]
  n = (s["image"] // s["patch"]) ** 2
  t = n + 1  # with the class token
  patchify = 2 * b * n * (s["patch"] ** 2 * 3) * d
  per_layer = 2 * b * t * (4 * d * d + 2 * d * m) + 2 * 2 * b * t * t * d  # projections, mlp, QK^T and AV
  head = 2 * b * d * s["classes"]
  return patchify + s["depth"] * per_layer + head


def test_tiny_run_end_to_end(tmp_path, capsys):
  tp = _load()
  out = tmp_path / "throughput.json"
  cores = os.sched_getaffinity(0)
  results = tp.main(["--tiny", "--threads", "1", "--out", str(out)])
  assert os.sched_getaffinity(0) == cores  # restored

  assert json.loads(out.read_text()) == json.loads(json.dumps(results))
  assert set(results["models"]) == set(tp.MODELS)
  assert results["threads"] == 1
  assert results["matmul"]["gflops"] > 0
  table = capsys.readouterr().out
  assert "| model | params mmjax | params HF | mmjax ms/step | HF ms/step | speed ratio" in table
  for name, r in results["models"].items():
    assert f"| {name} | {r['mmjax']['params']:,} | {r['hf']['params']:,} |" in table
    for side in ("mmjax", "hf"):
      assert len(r[side]["step_ms"]) == results["steps"] == 2
      assert all(t > 0 for t in r[side]["step_ms"]), (name, side)
      assert math.isfinite(r[side]["first_loss"]) and math.isfinite(r[side]["last_loss"]), (name, side)
    assert r["mmjax"]["compile_s"] > 0 and r["gflop_per_step"] > 0, name

  models = results["models"]
  # Same parameter layout as HF: the counts agree exactly.
  for name in ("vit", "bert"):
    assert models[name]["mmjax"]["params"] == models[name]["hf"]["params"], name
  # Same widths and depths, a few different projections / norms: within a few percent.
  for name in ("lxmert", "clip"):
    ratio = models[name]["mmjax"]["params"] / models[name]["hf"]["params"]
    assert 0.95 < ratio < 1.05, (name, ratio)

  # A train step costs about three forward passes (plus norms, softmax and AdamW).
  forward = _vit_forward_matmul_flops(tp.SIZES["vit"]["tiny"])
  ratio = models["vit"]["gflop_per_step"] * 1e9 / forward
  assert 2.5 < ratio < 5.0, ratio


  # Training mode computes the same loss at dropout 0.
  case = tp.CASES["vit"](tp.SIZES["vit"]["tiny"], None)
  train = tp.run_mmjax(case, case.make_batch(np.random.default_rng(0)), 1, 0, tp.FAST_COMPILE,
                       deterministic=False)
  np.testing.assert_allclose(train["first_loss"], models["vit"]["mmjax"]["first_loss"], rtol=1e-5)


def test_mmjax_side_runs_the_trainers_step():
  """The timed step is the trainer's: a NaN batch is flagged and leaves the state unchanged."""
  tp = _load()
  case = tp.CASES["vit"](tp.SIZES["vit"]["tiny"], None)
  batch = case.make_batch(np.random.default_rng(0))
  step = tp.mmjax_step(case, {**batch, "images": np.full_like(batch["images"], np.nan)}, tp.FAST_COMPILE)
  step["one"]()
  step["one"]()
  assert step["nonfinite"] == [1, 1] and np.isnan(step["losses"]).all()


def test_rejects_unknown_model():
  tp = _load()
  with pytest.raises(SystemExit):
    tp.parse_args(["--models", "vit,resnet"])
