"""Smoke tests of bench/sort_of_clevr.py, bench/fusion_sweep.py, bench/gpu_mfu.py, bench/colour_binding.py
and bench/step_time.py at tiny settings.

They check what the scripts produce, never how fast anything is: the trainer's wall-clock budget
(`train.max_minutes`) ends a run early, the accuracy with every modality marked present equals
the trainer's own evaluation of the same checkpoint, the tables and files are written, and XLA's
FLOP count of a train step agrees with the analytic matmul count.
"""

import importlib.util
import json
import pathlib
import sys

import jax.numpy as jnp
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
  spec.loader.exec_module(module)
  return module


def test_fusion_sweep_time_budget_and_absent_modalities(tmp_path, capsys):
  sweep = _load("fusion_sweep")
  out = tmp_path / "out"
  # 1000 scheduled steps, a budget that the first compile exceeds: the run stops at the first
  # logging step (every step at size=tiny), then evaluates and saves.
  results = sweep.main(["--tasks", "sort_of_clevr", "--fusions", "concat", "--dropouts", "0",
                        "--size", "tiny", "--steps", "1000", "--minutes", "0.001",
                        "--set", f"data.data_dir={tmp_path / 'data'}", "--out", str(out)])
  (run,) = results["runs"]
  assert run["steps"] == 1 and run["final"]["step"] == 1
  # Every modality marked present: the same accuracy as the trainer's evaluation of that state.
  assert run["accuracy"]["all"] == pytest.approx(run["final"]["test/accuracy"], abs=1e-9)
  assert set(run["accuracy"]) == {"all", "no_image", "no_text"}
  assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values())
  assert run["train_flops_per_example"] > 0 and run["params"] > 0
  table = capsys.readouterr().out
  assert f"| sort_of_clevr | concat | 0 | {run['params']:,} |" in table
  assert json.loads((out / "results.json").read_text())["runs"][0]["steps"] == 1
  assert (out / "table.md").read_text().strip() in table and (out / "sweep.png").stat().st_size > 0


def test_fusion_sweep_keeps_the_runs_not_redone(tmp_path, monkeypatch):
  sweep = _load("fusion_sweep")

  def fake_run(fusion, acc):
    def run(args):
      return {"size": args.size, "minutes_budget": args.minutes, "runs": [
          {"task": "av_digits", "fusion": fusion, "modality_dropout": 0.0, "params": 1,
           "train_flops_per_example": 1e9, "examples_per_s": 1.0, "steps": 1,
           "modalities": ["image", "audio"],
           "accuracy": {"all": acc, "no_image": acc, "no_audio": acc}}]}
    return run

  args = ["--tasks", "av_digits", "--dropouts", "0", "--minutes", "2", "--out", str(tmp_path)]
  for fusion, acc in (("concat", 0.25), ("film", 0.5), ("concat", 0.75)):
    monkeypatch.setattr(sweep, "run", fake_run(fusion, acc))
    sweep.main(args + ["--fusions", fusion])
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]
  # Sorted by task, fusion and rate; concat redone: its second result, once.
  assert [(r["fusion"], r["accuracy"]["all"]) for r in runs] == [("concat", 0.75), ("film", 0.5)]
  assert (tmp_path / "table.md").read_text().count("| av_digits |") == 2


def test_sort_of_clevr_table_and_curves(tmp_path):
  soc = _load("sort_of_clevr")
  final = {"num_params": 1234, "test/accuracy_relational": 0.5, "test/accuracy_non_relational": 0.75,
           "paraphrase/accuracy": 0.625, **{f"test/accuracy_{s}": i / 10 for i, s in enumerate(soc.SUBTYPES)},
           **{f"test/accuracy_non_relational_{c}": i / 20 for i, c in enumerate(soc.COLORS)}}
  colours = lambda a: {f"test/accuracy_non_relational_{c}": a for c in soc.COLORS}  # noqa: E731
  curve = [{"minutes": 1.0, "test/accuracy_relational": 0.25, "test/accuracy_non_relational": 0.5, **colours(0.5)},
           {"minutes": 2.0, "test/accuracy_relational": 0.5, "test/accuracy_non_relational": 0.75, **colours(0.7)}]
  old = {"final": {"num_params": 1, "test/accuracy_relational": 0.5}, "steps": 1, "minutes": 1.0,
         "examples_per_s": 1.0, "params": 1, "curve": [{"minutes": 1.0, "test/accuracy_relational": 0.5}]}
  results = {"size": "tiny", "minutes_budget": 2, "models": {
      "relation": {"final": final, "steps": 7, "minutes": 2.0, "examples_per_s": 3.0, "params": 1234,
                   "curve": curve}, "film": old}}
  text = soc.table(results)
  assert "| relation network (CNN+RN) | relation | 1,234 | 7 | 2.0 | 60 | 50.0 | 75.0 | 62.5 | > 94% | > 94% |" in text
  assert "| relation | " + " | ".join(f"{10 * i:.1f}" for i in range(len(soc.SUBTYPES))) + " |" in text
  assert "| " + " | ".join(("model",) + soc.COLORS) + " |" in text
  assert "| relation | " + " | ".join(f"{5 * i:.1f}" for i in range(len(soc.COLORS))) + " |" in text
  assert "| film | " + " | ".join([""] * len(soc.COLORS)) + " |" in text  # a result from before the metric
  soc.plot(results, tmp_path / "curves.png")
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert soc.plot_colours(results, tmp_path / "colours.png")  # the panel of the model with the metric
  assert (tmp_path / "colours.png").stat().st_size > 0
  assert not soc.plot_colours({"models": {"film": old}}, tmp_path / "none.png")
  assert not (tmp_path / "none.png").exists()
  with pytest.raises(SystemExit):
    soc.parse_args(["--models", "concat,nope"])


def test_sort_of_clevr_keeps_the_rows_of_models_not_rerun(tmp_path, monkeypatch):
  soc = _load("sort_of_clevr")

  def row(rel):
    return {"final": {"num_params": 1, "test/accuracy_relational": rel}, "steps": 1, "minutes": 1.0,
            "examples_per_s": 1.0, "params": 1, "curve": []}

  def fake_run(name, rel):
    return lambda args: {"size": args.size, "minutes_budget": args.minutes, "models": {name: row(rel)}}

  monkeypatch.setattr(soc, "run", fake_run("concat", 0.25))
  soc.main(["--models", "concat", "--minutes", "3", "--out", str(tmp_path)])
  monkeypatch.setattr(soc, "run", fake_run("film", 0.5))
  soc.main(["--models", "film", "--minutes", "3", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert list(saved["models"]) == ["concat", "film"]
  assert "| 25.0 |" in (tmp_path / "table.md").read_text()
  monkeypatch.setattr(soc, "run", fake_run("concat", 0.75))  # rerun: replaced, not duplicated
  soc.main(["--models", "concat", "--minutes", "3", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["models"]["concat"]["final"]["test/accuracy_relational"] == 0.75
  assert list(saved["models"]) == ["film", "concat"]
  monkeypatch.setattr(soc, "run", fake_run("film", 0.5))  # another budget: a fresh table
  soc.main(["--models", "film", "--minutes", "5", "--out", str(tmp_path)])
  assert list(json.loads((tmp_path / "results.json").read_text())["models"]) == ["film"]


def test_sort_of_clevr_relation_and_cnn_mlp_run_on_the_papers_5x5_grid_and_set_wins():
  import mmjax.tasks  # noqa: F401  (registers the task)
  from flax import nnx
  from mmjax.train.tasks import TASKS

  soc = _load("sort_of_clevr")
  for name, cells in (("relation", 25), ("concat", 25), ("film", 100)):
    cfg = soc.model_config(name, soc.parse_args(["--models", name, "--size", "tiny"]))
    model = TASKS.get(cfg.task)(cfg).build_model(nnx.Rngs(0))
    out = model.vision(jnp.zeros((1, *model.image_shape)), deterministic=True)
    assert out.tokens.shape[1] == cells, name
  # the paper's CNN+MLP: no Transformer over the grid, its 25 cells flattened into the MLP
  assert model.vision.encoder is not None  # film keeps the config's grid Transformer
  cfg = soc.model_config("concat", soc.parse_args(["--size", "tiny"]))
  model = TASKS.get(cfg.task)(cfg).build_model(nnx.Rngs(0))
  assert model.vision.encoder is None and dict(model.fusion.flatten) == {"image": 25}
  logits, _ = model(jnp.zeros((2, *model.image_shape)), jnp.ones((2, 3, model.question_len), jnp.int32))
  assert logits.shape[:2] == (2, 3) and bool(jnp.isfinite(logits).all())
  cfg = soc.model_config("relation", soc.parse_args(["--size", "tiny", "--set", "model.vision.channels=(8,8,8)"]))
  assert tuple(cfg.model.vision.channels) == (8, 8, 8)


def test_gpu_mfu_tiny(tmp_path, capsys):
  gm = _load("gpu_mfu")
  # ViT-B/16 at 224 px: 17.6 G multiply-adds per image forward (the ViT paper, timm), a train
  # step 3 forward passes.
  per_image = gm.analytic_flops("vit", gm.FULL, 1) / 3
  assert per_image / 1e9 == pytest.approx(35.1, abs=0.2)
  results = gm.main(["--tiny", "--models", "vit", "--out", str(tmp_path / "mfu.json"),
                     "--profile", str(tmp_path / "profile"), "--profile-steps", "1"])
  r = results["models"]["vit"]
  assert len(r["step_ms"]) == 2 and all(t > 0 for t in r["step_ms"])
  assert r["last_loss"] < r["first_loss"]  # 3 AdamW steps on one batch
  # XLA's count = the matmuls + norms, softmax and AdamW, which weigh more at tiny widths.
  assert 1.0 < r["hlo_flops"] / r["analytic_flops"] < 1.6, r
  out = capsys.readouterr().out
  assert f"| vit | {r['params']:,} |" in out
  assert json.loads((tmp_path / "mfu.json").read_text())["models"]["vit"]["params"] == r["params"]
  # --profile: the matmuls that ran (dense + attention, counted from the executed ops' HLO) are
  # the analytic count less the patchify convolution's (3 x 2 b n p^2 3 d), exactly.
  v, b = gm.TINY.vit, 2
  p = v["patch"] if isinstance(v["patch"], int) else v["patch"][0]
  n = (v["image_size"] // p) ** 2
  c = r["profile"]["classes"]
  ran = 1e9 * (c["dense matmul"]["gflop"] + c["attention matmul"]["gflop"])
  assert ran == pytest.approx(r["analytic_flops"] - 3 * 2 * b * n * p * p * 3 * v["width"], rel=1e-6)
  assert c["convolution"]["ms"] > 0 and c["attention matmul"]["gflop"] > 0
  assert (tmp_path / "profile" / "vit.hlo.txt").exists() and "vit: where the step's time goes" in out


def test_gpu_mfu_profile_failure_keeps_the_timings(tmp_path, monkeypatch, capsys):
  gm = _load("gpu_mfu")

  def broken(logdir):
    raise RuntimeError("no CUPTI")

  monkeypatch.setattr(gm.xla_trace, "trace_events", broken)
  r = gm.main(["--tiny", "--models", "vit", "--profile", str(tmp_path), "--profile-steps", "1"])["models"]["vit"]
  assert r["median_ms"] > 0 and r["profile_error"] == "RuntimeError: no CUPTI" and "profile" not in r
  captured = capsys.readouterr()
  assert "vit: profile failed: RuntimeError: no CUPTI" in captured.out
  assert "vit: --profile failed" in captured.err


def test_xla_trace_maps_gpu_kernels_to_hlo_ops():
  """GPU shapes of the data, hand-written: a cuBLAS GEMM custom call with a tuple shape, and
  kernels on a device's Stream thread (the host's launch events and XLA Ops line not counted)."""
  xt = _load("xla_trace")
  hlo = """ENTRY %main (p0: bf16[8,4], p1: bf16[4,16]) -> bf16[8,16] {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %p1 = bf16[4,16]{1,0} parameter(1)
  %custom-call.1 = (bf16[8,16]{1,0}, s8[1024]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %get-tuple-element.1 = bf16[8,16]{1,0} get-tuple-element(%custom-call.1), index=0
  ROOT %fusion.2 = bf16[8,16]{1,0} fusion(%get-tuple-element.1), kind=kLoop, calls=%fused_tanh
}"""
  ops = xt.hlo_ops(hlo)
  assert ops["custom-call.1"]["class"] == "dense matmul" and ops["custom-call.1"]["flops"] == 2 * 8 * 16 * 4
  ev = lambda name, ts, dur, thread, op=None, process="/device:GPU:0": dict(  # noqa: E731
      name=name, ts=ts, dur=dur, process=process, thread=thread, args={"hlo_op": op} if op else {})
  events = [ev("sm90_xmma_gemm_bf16", 0, 6, "Stream #13(Compute)", "custom-call.1"),
            ev("loop_tanh_fusion", 6, 2, "Stream #13(Compute)", "fusion.2"),
            ev("nvjet_hsh_64x8", 8, 1, "Stream #13(Compute)"),  # no hlo_op: classed by name
            ev("custom-call.1", 0, 6, "XLA Ops", "custom-call.1"),
            ev("KernelThunk", 0, 9, "python", "fusion.2", process="/host:CPU")]
  t = xt.op_times(events, ops, steps=1, top=5)
  assert t["events"] == 3
  assert t["classes"]["dense matmul"]["ms"] == pytest.approx(7e-3)
  assert t["classes"]["dense matmul"]["gflop"] == pytest.approx(2 * 8 * 16 * 4 / 1e9)
  assert t["classes"]["other"]["ms"] == pytest.approx(2e-3)  # the tanh fusion
  assert [o["name"] for o in t["top"]] == ["custom-call.1", "fusion.2", "nvjet_hsh_64x8"]


def test_xla_trace_counts_a_gemms_flops_once_per_launch():
  """A GEMM run as two kernels back to back (e.g. split-K + reduce) is one launch: its FLOPs
  count once; launched again after another op, twice."""
  xt = _load("xla_trace")
  ops = {"gemm": {"class": "dense matmul", "flops": 1e9, "shape": "", "op_name": ""},
         "fusion": {"class": "other", "flops": 0.0, "shape": "", "op_name": ""}}
  ev = lambda ts, op: dict(name=f"k_{op}", ts=ts, dur=1, process="/device:GPU:0",  # noqa: E731
                           thread="Stream #13(Compute)", args={"hlo_op": op})
  once = xt.op_times([ev(0, "gemm"), ev(1, "gemm"), ev(2, "fusion")], ops, steps=1, top=3)
  assert once["classes"]["dense matmul"]["gflop"] == pytest.approx(1.0)
  assert once["classes"]["dense matmul"]["ms"] == pytest.approx(2e-3)
  twice = xt.op_times([ev(0, "gemm"), ev(1, "fusion"), ev(2, "gemm")], ops, steps=1, top=3)
  assert twice["classes"]["dense matmul"]["gflop"] == pytest.approx(2.0)


def test_colour_binding_reports_per_head_attention():
  binding = _load("colour_binding")
  r = binding.run(4.0, 0, 3, 3e-3, sentence=True, pool="max", vision={"pixel_freqs": 1})
  assert r["off_prior_at"] is None and 0.0 <= r["accuracy"] <= 1.0
  assert len(r["per_colour"]) == 6 and r["accuracy"] == pytest.approx(sum(r["per_colour"]) / 6)
  assert len(r["per_head"]) == 4 and all(0.0 <= x <= 1.0 for x in r["per_head"])
  assert 0.0 <= r["attention_on_object"] <= 1.0


def test_step_time_builds_each_variant(tmp_path, capsys):
  rows = _load("step_time").main([
      "--config", "configs/vqa_sort_of_clevr.py:size=tiny", "--rounds", "1", "--steps", "1",
      "--variant", f"data.data_dir={tmp_path}",
      "--variant", f"data.data_dir={tmp_path} model.vision.depth=0"])
  assert [r["ratio"] for r in rows][0] == 1.0 and all(r["step_s"] > 0 for r in rows)
  assert rows[1]["num_params"] < rows[0]["num_params"]  # the override reached the model
  assert "| variant | step s |" in capsys.readouterr().out


def test_step_time_runs_every_config_with_every_variant(tmp_path, capsys):
  configs = ["configs/vqa_sort_of_clevr.py:size=tiny", "configs/vqa_sort_of_clevr.py:size=tiny,fusion=film"]
  rows = _load("step_time").main(["--rounds", "1", "--steps", "1", "--config", configs[0],
                                  "--config", configs[1], "--variant", f"data.data_dir={tmp_path}"])
  assert [r["config"] for r in rows] == configs and rows[0]["num_params"] != rows[1]["num_params"]
  assert f"| {configs[1]} data.data_dir={tmp_path} |" in capsys.readouterr().out
