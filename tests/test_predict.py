"""Inference from a trained workdir: answers agree with the trainer's eval path, errors, no retracing, CLI;
the generic predictors of your own data's VQA and classification tasks."""

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mmjax import predict, viz
from mmjax.data.datasets import sort_of_clevr
from mmjax.projects.sort_of_clevr.task import VqaPredictor
from mmjax.train import trainer
from mmjax.train.checkpoint import Checkpointer, CorruptCheckpointError
from mmjax.train.config import load_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "mmjax/projects/sort_of_clevr/configs/vqa.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny cross-attention VQA model trained for 2 steps (data built in a temporary folder)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MMJAX_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    config = load_config(CONFIG + ":size=tiny,fusion=cross_attention")
    config.model.fusion_kwargs = {"depth": 1}
    config.data.eval_splits = ("test",)
    config.train.steps = 2
    config.train.eval_every = config.train.checkpoint_every = 2
    wd = str(tmp_path_factory.mktemp("workdir"))
    trainer.train(config, wd, progress=False)
    yield wd


@pytest.fixture(scope="module")
def predictor(workdir):
  return predict.Predictor.from_workdir(workdir)


@pytest.fixture(scope="module")
def test_split(predictor):
  """The test split's first eval batch (as the trainer sees it) and its raw records."""
  batch = next(iter(predictor.task.dataset("test", train=False, batch_size=8, shard_index=0,
                                           shard_count=1)))
  source = predictor.task.source("test")
  records = [source[i] for i in range(len(batch["image"]))]
  return batch, records


def test_restores_config_and_best_step(workdir, predictor):
  assert predictor.step == 2 and isinstance(predictor, VqaPredictor)  # the task's predictor class
  assert predictor.config.data.eval_splits == ("test",)  # JSON lists back to tuples
  expected = load_config(CONFIG + ":size=tiny").model.encoders.image.channels
  assert isinstance(expected, tuple) and predictor.config.model.encoders.image.channels == expected
  assert predictor.answers == sort_of_clevr.ANSWERS
  assert set(predictor.state) == {"params", "model_state"}  # no optimizer state in memory


def test_answers_match_trainer_eval_path(workdir, predictor, test_split, tmp_path):
  batch, records = test_split
  # The raw records are the images and questions behind the trainer's preprocessed batch.
  np.testing.assert_array_equal(np.stack([r["image"] for r in records]),
                                np.round(batch["image"] * 255).astype(np.uint8))
  images = [r["image"] for r in records for _ in r["questions"]]
  questions = [q.decode() for r in records for q in r["questions"]]
  out = predictor.answer_batch(images, questions)
  assert len(out) == len(questions) == 160
  for o in out:
    probs = np.array(list(o["probabilities"].values()))
    assert set(o["probabilities"]) == set(sort_of_clevr.ANSWERS)
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
    assert o["answer"] == max(o["probabilities"], key=o["probabilities"].get)
  predicted = np.array([sort_of_clevr.ANSWERS.index(o["answer"]) for o in out]).reshape(8, 20)

  # The trainer's eval step counts an answer as correct iff the argmax of the model's logits
  # equals it: with the predictor's answers as labels every question must count as correct.
  setup = predictor.setup
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  state, _ = ckpt.restore(predictor.step, setup.abstract_state, with_data=False)
  ckpt.close()
  eval_step = setup.make_eval_step()
  with setup.context():
    own = jax.device_get(eval_step(state, setup.global_batch({**batch, "answer": predicted.astype(np.int32)})))
    true = jax.device_get(eval_step(state, setup.global_batch(batch)))
  assert int(own["count"]) == 160 and int(own["correct"]) == 160
  assert int(true["correct"]) == int((predicted == batch["answer"]).sum())
  # The probabilities are those of the eval path's forward pass on the pipeline's batch.
  forward = jax.jit(lambda state, b: setup.model(state)(b["image"], b["question_ids"], b["question_mask"])[0])
  with setup.context():
    logits = jax.device_get(forward(state, setup.global_batch(
        {k: batch[k] for k in ("image", "question_ids", "question_mask")})))  # (8, 20, A)
  probs = np.array([[o["probabilities"][a] for a in sort_of_clevr.ANSWERS] for o in out])
  np.testing.assert_allclose(probs.reshape(8, 20, -1), jax.nn.softmax(logits, axis=-1), rtol=1e-4, atol=1e-6)

  # A PNG file and a PIL image give the same answer as the array.
  path = tmp_path / "scene.png"
  Image.fromarray(records[0]["image"]).save(path)
  for image in (str(path), Image.open(path)):
    again = predictor.answer(image, questions[0])
    assert again["answer"] == out[0]["answer"]
    np.testing.assert_allclose(list(again["probabilities"].values()),
                               list(out[0]["probabilities"].values()), rtol=1e-5)


def test_missing_workdir_and_checkpoints(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    predict.Predictor.from_workdir(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.json"):
    predict.Predictor.from_workdir(tmp_path)
  shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    predict.Predictor.from_workdir(tmp_path)
  with pytest.raises(ValueError) as e:  # epath serves bucket URLs only
    predict.Predictor.from_workdir("https://example.com/run")
  assert str(e.value) == ("'https://example.com/run': unsupported URL; expected a local path or a "
                          "bucket URL (gs://bucket/..., s3://bucket/...)")


def test_a_damaged_checkpoint_is_named_or_skipped_for_the_newest_that_reads(workdir, predictor, tmp_path,
                                                                           caplog):
  wd = tmp_path / "wd"
  shutil.copytree(workdir, wd)
  shutil.copytree(wd / "checkpoints" / "2", wd / "checkpoints" / "1")  # a second, identical step
  ckpt = Checkpointer(wd / "checkpoints", best_metric=predictor.task.best_metric)
  best = ckpt.best_step()  # the step served by default is the one damaged
  ckpt.close()
  other = 3 - best
  data = next((wd / "checkpoints" / str(best) / "state" / "d").iterdir())
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])  # cut short, as by a full disk
  with caplog.at_level(logging.WARNING, logger="mmjax.predict"):
    state, step = predict.restore_params(predictor.setup, wd)
  assert step == other and set(state) == {"params", "model_state"}
  assert f"checkpoint step {best} in {wd / 'checkpoints'} cannot be read: " in caplog.text
  assert f"serving checkpoint step {other} instead of the unreadable step(s) [{best}]" in caplog.text
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(predictor.state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(CorruptCheckpointError, match=rf"^checkpoint step {best} in .* cannot be read: "):
    predict.restore_params(predictor.setup, wd, step=best)
  assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2"]  # a reader moves nothing aside


def test_missing_step(predictor, workdir):
  with pytest.raises(FileNotFoundError, match=r"step 7.*available steps: \[2\]"):
    predict.restore_params(predictor.setup, workdir, step=7)


def test_bad_inputs(predictor, test_split):
  image = test_split[1][0]["image"]
  with pytest.raises(ValueError, match="75×75"):
    predictor.answer(np.zeros((64, 80, 3), np.uint8), "What shape is the red object?")
  resized = predictor.answer(np.zeros((64, 80, 3), np.uint8), "What shape is the red object?", resize=True)
  assert resized["answer"] in sort_of_clevr.ANSWERS
  with pytest.raises(TypeError, match="uint8"):
    predictor.answer(image.astype(np.float32), "What shape is the red object?")
  for empty in ("", "   \n"):
    with pytest.raises(ValueError, match="question"):
      predictor.answer(image, empty)
  with pytest.raises(TypeError, match="question"):
    predictor.answer(image, None)
  with pytest.raises(ValueError, match="same number"):
    predictor.answer_batch([image, image], ["What shape is the red object?"])
  with pytest.raises(AttributeError, match="caption"):  # each task serves its own functions
    predictor.caption(image)


def test_no_retrace_over_50_requests(predictor, test_split):
  records = test_split[1]
  predictor.answer(records[0]["image"], "What shape is the red object?")  # compiled by now
  events = []
  listener = lambda name, *_, **__: events.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for i in range(50):
      r = records[i % len(records)]
      predictor.answer(r["image"], r["questions"][i % 20].decode() + " " * (i % 3))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  compiles = [e for e in events if "trace" in e or "compile" in e]
  assert compiles == []


def test_cli_prints_json(workdir, predictor, test_split, tmp_path, capsys):
  record = test_split[1][1]
  path = tmp_path / "scene.png"
  Image.fromarray(record["image"]).save(path)
  question = record["questions"][3].decode()
  assert predict.main(["--workdir", workdir, "--image", str(path), "--question", question,
                       "--json", "--top", "3"]) == 0
  out = json.loads(capsys.readouterr().out)
  expected = predictor.answer(str(path), question)
  assert out["answer"] == expected["answer"] and out["step"] == 2
  assert list(out["probabilities"]) == list(expected["probabilities"])[:3]


def test_attention_figure_from_predictor(predictor, test_split):
  record = test_split[1][2]
  fig = viz.vqa_attention_figure(predictor, record["image"], record["questions"][0].decode(), size_px=300)
  pixels = viz.figure_to_array(fig)
  assert pixels.shape == (300, 300, 3) and pixels.var() > 0


def test_cli_options_of_another_task_and_files_of_the_wrong_kind(workdir, test_split, tmp_path, capsys):
  record = test_split[1][0]
  image = tmp_path / "scene.png"
  Image.fromarray(record["image"]).save(image)
  notes = tmp_path / "notes.txt"
  notes.write_text("not an image, not audio\n")

  def cli_error(*args):
    with pytest.raises(SystemExit) as e:
      predict.main(["--workdir", workdir, *args])
    assert e.value.code == 2
    return capsys.readouterr().err

  err = cli_error("--image", str(image), "--question", "What shape is the red object?", "--beam")
  assert err.startswith("error: --beam: not an option of this workdir's task") and "VqaPredictor" in err
  assert "--image, --question, --resize" in err
  err = cli_error("--image", str(notes), "--question", "What shape is the red object?")
  assert f"error: image: {str(notes)!r} is not an image file" in err and "Traceback" not in err
  with pytest.raises(ValueError, match=r"^images\[1\]: .* is not an image file"):
    predict.read_image(str(notes), field="images[1]")
  with pytest.raises(ValueError, match=r"^wav: .*notes.txt' is not an audio file \(WAV, FLAC, OGG\)"):
    predict.read_wav(str(notes))


# ---------------------------------------------------------------------------------------------
# The generic predictors of your own data's tasks: answer (configs/vqa_open.py) and classify
# (configs/classify.py), each served as its evaluation computes.
# ---------------------------------------------------------------------------------------------
COLORS = {"red": (220, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
REPO = os.path.join(os.path.dirname(__file__), "..")


def _user_data(root, n=16):
  """n one-shape PNGs and wavs (pitch by shape) with their rows: image, wav, question, answers,
  text, label."""
  import soundfile

  rows = []
  for i in range(n):
    color, shape = list(COLORS)[i % 4], ("square", "circle")[i // 4 % 2]
    yy, xx = np.mgrid[:40, :40] - 20
    inside = np.maximum(abs(yy), abs(xx)) < 10 if shape == "square" else yy ** 2 + xx ** 2 < 100
    pixels = np.full((40, 40, 3), 255, np.uint8)
    pixels[inside] = COLORS[color]
    Image.fromarray(pixels).save(root / f"{i}.png")
    t = np.arange(8000) / 16000
    soundfile.write(root / f"{i}.wav", (0.5 * np.sin(2 * np.pi * (300 if shape == "square" else 600) * t)
                                         ).astype(np.float32), 16000)
    rows.append({"image": f"{i}.png", "audio": f"{i}.wav", "question": f"what color is the {shape}?",
                 "answers": [color] * 9 + [f"dark {color}"], "text": f"a {color} thing", "label": shape})
  path = root / "data.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path, rows


def _served_equals_evaluated(p, name, batch, probabilities, logits_fn, sigmoid=False):
  """The predictor's probabilities equal the softmax (`sigmoid`: each logit's sigmoid, as a
  per-answer binary loss trains them) of the model's logits on the eval batch."""
  with p.context():
    logits = np.asarray(jax.jit(logits_fn)(p.model, batch))
  if sigmoid:
    expected = 1 / (1 + np.exp(-logits))
  else:
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
  got = np.array([[o["probabilities"][a] for a in name] for o in probabilities])
  np.testing.assert_allclose(got, expected[:len(got)], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def user_workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("user_data")
  path, rows = _user_data(root)
  out = {"rows": rows, "root": root}
  overrides = [f"input.train={path}", f"input.eval={path}", "train.steps=2", "train.eval_every=2",
               "train.checkpoint_every=2"]
  for kind, spec, more in (("vqa", "vqa_open.py:size=tiny", []),
                           ("classify", "classify.py:size=tiny,modality=image+audio+text",
                            ["mesh.data=4", "mesh.fsdp=2"])):  # served on any devices all the same
    config = load_config(os.path.join(REPO, "configs", spec), overrides + more)
    out[kind] = str(tmp_path_factory.mktemp(kind))
    trainer.train(config, out[kind], progress=False)
  return out


def test_answer_predictor_serves_a_vqa_open_workdir(user_workdirs, capsys):
  wd, rows, root = user_workdirs["vqa"], user_workdirs["rows"], user_workdirs["root"]
  p = predict.Predictor.from_workdir(wd)  # the task's own predictor, as the CLI takes it
  assert isinstance(p, predict.AnswerPredictor) and p.answers[:4] == ("blue", "green", "red", "yellow")
  batch = next(iter(p.task.dataset("eval", train=False, batch_size=8, shard_index=0, shard_count=1)))
  out = p.answer_batch([str(root / r["image"]) for r in rows[:8]], [r["question"] for r in rows[:8]])
  _served_equals_evaluated(p, p.answers, batch, out,
                           lambda m, b: m(b["image"], b["question_ids"], b["question_mask"])[0],
                           sigmoid=True)  # vqa_open trains each answer with a sigmoid
  image = str(root / rows[1]["image"])
  assert predict.main(["--workdir", wd, "--image", image, "--question", rows[1]["question"], "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["answer"] == p.answer(image, rows[1]["question"])["answer"]


def test_classify_predictor_serves_an_image_audio_text_workdir(user_workdirs, capsys):
  wd, rows, root = user_workdirs["classify"], user_workdirs["rows"], user_workdirs["root"]
  p = predict.Predictor.from_workdir(wd)  # the task's own predictor, as the CLI takes it
  assert p.request_fields == ("image", "wav", "text") and p.classes == ("circle", "square")
  batch = next(iter(p.task.dataset("eval", train=False, batch_size=8, shard_index=0, shard_count=1)))
  out = p.classify_batch(images=[str(root / r["image"]) for r in rows[:8]],
                         wavs=[str(root / r["audio"]) for r in rows[:8]], texts=[r["text"] for r in rows[:8]])
  _served_equals_evaluated(p, p.classes, batch, out, lambda m, b: m(p.task.model_inputs(b))[0])
  args = ["--image", str(root / rows[2]["image"]), "--wav", str(root / rows[2]["audio"]),
          "--text", rows[2]["text"]]
  assert predict.main(["--workdir", wd, *args, "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["probabilities"] == out[2]["probabilities"]
  with pytest.raises(SystemExit):
    predict.main(["--workdir", wd, *args[:4]])
  assert "--text is required" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    predict.main(["--workdir", wd, *args[:2], "--wav", str(root / "data.jsonl"), *args[4:]])
  assert f"wav: {str(root / 'data.jsonl')!r} is not an audio file" in capsys.readouterr().err
  with pytest.raises(TypeError, match=r"expected \['images', 'wavs', 'texts'\], got \['images'\]"):
    p.classify_batch(images=[str(root / rows[0]["image"])])


@pytest.fixture(scope="module")
def classify_predictor(user_workdirs):
  return predict.Predictor.from_workdir(user_workdirs["classify"])


def _classify_request(user_workdirs, i: int) -> dict[str, str]:
  row, root = user_workdirs["rows"][i], user_workdirs["root"]
  return {"image": str(root / row["image"]), "wav": str(root / row["audio"]), "text": row["text"]}


def test_a_workdir_trained_on_8_devices_serves_on_1(user_workdirs, classify_predictor):
  wd, p = user_workdirs["classify"], classify_predictor
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
  request = _classify_request(user_workdirs, 3)
  expected = p.classify(**request)["probabilities"]
  script = ("import json, sys, jax; from mmjax import predict; "
            "p = predict.Predictor.from_workdir(sys.argv[1]); "
            "print(json.dumps([jax.device_count(), p.batch_size, p.classify(**json.loads(sys.argv[2]))]))")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  env = {**os.environ, "XLA_FLAGS": flags + " --xla_force_host_platform_device_count=1"}
  run = subprocess.run([sys.executable, "-c", script, wd, json.dumps(request)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  devices, batch_size, out = json.loads(run.stdout.splitlines()[-1])
  assert devices == batch_size == 1
  assert list(out["probabilities"]) == list(expected)
  np.testing.assert_allclose(list(out["probabilities"].values()), list(expected.values()), rtol=1e-5, atol=1e-7)
  # Data parallel over this process's 8 devices by default; the training mesh when asked for.
  assert dict(p.setup.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1} and p.batch_size == 8
  on_mesh = predict.Predictor.from_workdir(wd, mesh={"data": 4, "fsdp": 2})
  assert dict(on_mesh.setup.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(on_mesh.state))  # sharded as trained
  again = on_mesh.classify(**request)["probabilities"]
  np.testing.assert_allclose([again[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-7)


def test_classify_takes_a_waveform_at_its_sample_rate(user_workdirs, classify_predictor, tmp_path):
  import soundfile  # pylint: disable=g-import-not-at-top

  p = classify_predictor
  request = _classify_request(user_workdirs, 5)
  path = request.pop("wav")
  wave, rate = soundfile.read(path, dtype="float32")  # (T,) at 16 kHz
  assert rate == 16000
  from_file = p.classify(wav=path, **request)["probabilities"]
  assert p.classify(wav=wave, **request)["probabilities"] == from_file
  # At another rate, a waveform is resampled by the pp string as a file of that rate is.
  soundfile.write(tmp_path / "8k.wav", wave[::2], 8000, subtype="FLOAT")
  at_8k = p.classify(wav=str(tmp_path / "8k.wav"), **request)["probabilities"]
  assert p.classify(wav=wave[::2], sr=8000, **request)["probabilities"] == at_8k
  # The waveform's WAV bytes: its rate in the header, its samples unclipped.
  data = predict.read_wav(2 * wave, sr=8000)
  assert soundfile.info(io.BytesIO(data)).samplerate == 8000
  np.testing.assert_array_equal(soundfile.read(io.BytesIO(data), dtype="float32")[0], 2 * wave)
  with pytest.raises(ValueError, match=r"^sr: expected the waveform's sample rate in Hz"):
    predict.read_wav(wave, sr=0)


def test_resize_is_no_option_of_a_workdir_without_images(user_workdirs, tmp_path, monkeypatch, capsys):
  root = user_workdirs["root"]
  config = load_config(os.path.join(REPO, "configs", "classify.py:size=tiny,modality=audio"),
                       [f"input.train={root / 'data.jsonl'}", "input.eval="])
  setup = trainer.Setup(config, workdir=str(tmp_path))
  p = predict.ClassifyPredictor(setup, setup.init_state())  # an audio-only classifier
  wav = str(root / user_workdirs["rows"][0]["audio"])
  assert p.request_fields == ("wav",) and p.request_options == ()
  with pytest.raises(ValueError, match=r"^resize: this workdir's model takes no images"):
    p.classify(wav=wav, resize=True)
  monkeypatch.setattr(predict.Predictor, "from_workdir", classmethod(lambda cls, *args: p))
  with pytest.raises(SystemExit):
    predict.main(["--workdir", str(tmp_path), "--wav", wav, "--resize"])
  assert capsys.readouterr().err == ("error: --resize: not an option of this workdir's task 'classify' "
                                     "(served by ClassifyPredictor, which takes --wav)\n")
