"""The generic tasks over a user's own data (mmjax/tasks/user_data.py), driven by the config alone:
CLIP from a Hugging Face checkpoint, open-ended VQA with ten answers, classification from class
folders, and bad inputs reported with their manifest line."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from mmjax.data import manifest
from mmjax.metrics.vqa import normalize_answer, vqa_accuracy
from mmjax.train.config import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("square", "circle")


def _image(path: pathlib.Path, color: str, shape: str, size: int = 40) -> str:
  """A white PNG with one coloured square or circle; returns its name."""
  path.parent.mkdir(parents=True, exist_ok=True)
  yy, xx = np.mgrid[:size, :size] - size // 2
  inside = (np.maximum(abs(yy), abs(xx)) < size // 4) if shape == "square" else (yy ** 2 + xx ** 2 < (size // 4) ** 2)
  pixels = np.full((size, size, 3), 255, np.uint8)
  pixels[inside] = COLORS[color]
  PIL.Image.fromarray(pixels).save(path)
  return path.name


def _jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _scenes(n: int) -> list[tuple[str, str]]:
  """(colour, shape) of scene i: every pair in turn."""
  return [(list(COLORS)[i % 4], SHAPES[(i // 4) % 2]) for i in range(n)]


def _caption_data(root: pathlib.Path, n: int = 64) -> pathlib.Path:
  rows = []
  for i, (color, shape) in enumerate(_scenes(n)):
    _image(root / "img" / f"{i}.png", color, shape)
    rows.append({"image": f"img/{i}.png", "text": f"a {color} {shape}"})
  _jsonl(root / "eval.jsonl", rows[:16])
  return _jsonl(root / "train.jsonl", rows)


def train_cli(config: str, workdir, *overrides: str) -> dict:
  """`python train.py --config CONFIG --config.K=V ... --workdir W`: its final metrics, and its
  log in "log"."""
  cmd = [sys.executable, "train.py", "--config", config, *(f"--config.{o}" for o in overrides),
         "--workdir", str(workdir)]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return {**json.loads(out.stdout[out.stdout.index("{"):]), "log": out.stderr}


# ---------------------------------------------------------------------------------------------
# 1. CLIP from a Hugging Face CLIPModel folder: train, resume, export.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory):
  """64 image-caption pairs and a tiny random HF CLIPModel; `configs/clip.py` trained on them
  from that checkpoint by the command line: 10 steps then resumed to 20, and 20 in one run."""
  import torch
  import transformers

  tmp = tmp_path_factory.mktemp("clip")
  train = _caption_data(tmp / "data")
  hf = tmp / "hf_clip"
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=16)
  torch.manual_seed(0)
  transformers.CLIPModel(cfg).save_pretrained(hf, safe_serialization=True)
  common = (f"input.train={train}", f"input.eval={train.parent / 'eval.jsonl'}",
            f"model_init={hf}", "optim.schedule=constant")
  resumed, whole = tmp / "resumed", tmp / "whole"
  first = train_cli("configs/clip.py:size=tiny", resumed, *common, "train.steps=10")
  tokenizer = (resumed / "tokenizer" / "tokenizer.json").read_bytes()
  second = train_cli("configs/clip.py:size=tiny", resumed, *common, "train.steps=20")
  uninterrupted = train_cli("configs/clip.py:size=tiny", whole, *common, "train.steps=20")
  return dict(tmp=tmp, train=train, hf=hf, resumed=resumed, whole=whole, first=first,
              second=second, uninterrupted=uninterrupted, tokenizer=tokenizer)


def _metrics(workdir) -> dict[int, dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  out: dict[int, dict] = {}
  for r in rows:
    out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("time", "step")
                                          and k != "train/examples_per_s"})
  return out


def test_clip_from_hf_checkpoint_trains_resumes_and_keeps_its_assets(clip_runs):
  r = clip_runs
  assert r["first"]["step"] == 10 and r["first"]["resumed_from"] is None
  assert r["second"]["step"] == 20 and r["second"]["resumed_from"] == 10
  # The architecture is the checkpoint's (its config.json), and the text tower pools at the end
  # token of the tokenizer trained on the captions ([SEP] = 3), not the checkpoint's eos 1.
  saved = json.loads((r["resumed"] / "config.json").read_text())
  image, text = saved["model"]["encoders"]["image"], saved["model"]["encoders"]["text"]
  assert (image["width"], image["patch"], image["image_size"], image["act"]) == (32, 8, 32, "quick_gelu")
  assert (text["vocab_size"], text["max_len"], text["eos_id"]) == (300, 16, 3)
  assert saved["model"]["embed_dim"] == 16 and saved["data"]["image_size"] == 32
  # The tokenizer trained at the first start is the one the resumed run read back.
  assert "tokenizer: trained on" in r["first"]["log"]
  assert f"tokenizer: read from {r['resumed'] / 'tokenizer'}" in r["second"]["log"]
  assert (r["resumed"] / "tokenizer" / "tokenizer.json").read_bytes() == r["tokenizer"]
  # Resumed == uninterrupted: every logged step after the restart, and the final evaluation.
  resumed, whole = _metrics(r["resumed"]), _metrics(r["whole"])
  for step in range(11, 21):
    assert resumed[step]["train/loss"] == pytest.approx(whole[step]["train/loss"], rel=1e-6, abs=1e-7), step
  for key in ("eval/rsum", "eval/loss", "eval/i2t_r@1", "eval/t2i_r@1", "eval/i2t_r@5"):
    assert r["second"][key] == pytest.approx(r["uninterrupted"][key], rel=1e-6, abs=1e-7), key


@pytest.mark.skipif(not (ROOT / "mmjax" / "export.py").exists(), reason="mmjax.export not written yet")
def test_clip_export_loads_in_transformers_with_equal_embeddings(clip_runs):
  import torch
  import transformers

  from mmjax.predict import Predictor

  r = clip_runs
  out = r["tmp"] / "exported"
  done = subprocess.run([sys.executable, "-m", "mmjax.export", "--workdir", str(r["resumed"]),
                         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  hf = transformers.CLIPModel.from_pretrained(out).eval()
  predictor = Predictor.from_workdir(r["resumed"])
  images = [r["train"].parent / "img" / f"{i}.png" for i in range(6)]
  texts = ["a red square", "a blue circle", "a green circle"]
  pixels = predictor.image_inputs(images)  # (N, H, W, 3), as evaluation preprocesses them
  ids, mask = predictor.text_inputs(texts)
  with torch.no_grad():  # CLIPModel's forward gives both towers' L2-normalised embeddings
    out = hf(pixel_values=torch.from_numpy(np.asarray(pixels).transpose(0, 3, 1, 2)),
             input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
             attention_mask=torch.from_numpy(np.asarray(mask, np.int64)))
  np.testing.assert_allclose(predictor.embed_images(images), out.image_embeds.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(predictor.embed_texts(texts), out.text_embeds.numpy(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# docs/your_data.md, run as written: VQA, classification and captioning by the command line.
# ---------------------------------------------------------------------------------------------
def doc_blocks(path: pathlib.Path) -> list[tuple[str, str]]:
  """(language, code) of every fenced block, in order; "" for a block of printed output."""
  return re.findall(r"^```(python|bash|)\n(.*?)^```$", path.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
  """docs/your_data.md's blocks run in order in a fresh folder holding train.py and configs/;
  each printed-output block must equal what the block before it printed."""
  tmp = tmp_path_factory.mktemp("doc")
  (tmp / "train.py").symlink_to(ROOT / "train.py")
  (tmp / "configs").symlink_to(ROOT / "configs")
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  blocks = doc_blocks(ROOT / "docs" / "your_data.md")
  printed = []
  for lang, code in blocks:
    if not lang:  # what the block before printed
      assert printed[-1].strip() == code.strip()
      continue
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-ec", code]
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{lang} block:\n{code}\n{out.stderr[-4000:]}"
    printed.append(out.stdout)
  return dict(tmp=tmp, blocks=blocks, printed=printed)


def test_your_data_doc_runs_as_written(doc_run):
  langs = [lang for lang, _ in doc_run["blocks"]]
  assert langs.count("bash") == 4 and langs.count("python") == 4  # four tasks; data, checkpoint, predictor, errors
  assert doc_run["printed"][0].strip() == '{"image": "img/0.png", "text": "a red square"}'
  assert any(line.startswith("zero-shot: ") and line.split(": ")[1] in ("red square", "blue circle")
             for p in doc_run["printed"] for line in p.splitlines())
  work = doc_run["tmp"] / "workdirs"
  for name in ("my_clip", "my_vqa", "my_classes", "my_captions"):
    assert (work / name / "checkpoints").is_dir(), name
  clip = json.loads((work / "my_clip" / "config.json").read_text())
  assert clip["model"]["embed_dim"] == 16 and clip["model"]["encoders"]["text"]["vocab_size"] == 500


def test_vqa_open_trains_from_a_manifest_and_keeps_its_answers(doc_run):
  workdir = doc_run["tmp"] / "workdirs" / "my_vqa"
  final = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
  assert 0.0 <= final["eval/vqa_accuracy"] <= final["eval/best_possible"] == 1.0
  # Most frequent first (each colour 16 x 8, each "dark <colour>" 16 x 2), ties alphabetical.
  assert json.loads((workdir / "answers.json").read_text()) == [
      "blue", "green", "red", "yellow", "dark blue", "dark green", "dark red", "dark yellow"]
  assert (workdir / "tokenizer" / "tokenizer.json").exists()


def test_classify_from_class_folders(doc_run, tmp_path):
  from mmjax.tasks.user_data import UserClassification

  workdir = doc_run["tmp"] / "workdirs" / "my_classes"
  assert json.loads((workdir / "classes.json").read_text()) == ["blue", "green", "red", "yellow"]
  # An evaluation folder without "blue" keeps the training split's ids: green 1, red 2.
  for color in ("red", "green"):
    _image(tmp_path / "eval" / color / "0.png", color, "square")
  config = load_config("configs/classify.py:size=tiny", [
      f"input.train={doc_run['tmp'] / 'my_data' / 'classes'}", f"input.eval={tmp_path / 'eval'}"])
  task = UserClassification(config, workdir=workdir)
  labels = {e.id.split("/")[0]: e.label for e in task.source("eval").source.entries}
  assert labels == {"green": 1, "red": 2}


def test_answer_predictor_reports_each_answers_sigmoid(doc_run):
  import jax

  from mmjax.predict import Predictor, read_image

  p = Predictor.from_workdir(doc_run["tmp"] / "workdirs" / "my_vqa")
  image, question = str(doc_run["tmp"] / "my_data" / "img" / "5.png"), "what color is the shape?"
  out = p.answer(image, question)
  x = p.preprocess([{"image": read_image(image), "question": question}])
  with p.context():
    logits = jax.jit(lambda m, x: m(x["image"], x["question_ids"], x["question_mask"])[0])(p.model, x)
  logits = np.asarray(logits, np.float64)[0]  # (A,)
  best = int(np.argmax(logits))
  # The task trains each answer with a sigmoid (soft scores): that is the reported probability.
  assert out["answer"] == p.answers[best]
  assert out["probabilities"][out["answer"]] == pytest.approx(1 / (1 + np.exp(-logits[best])), rel=1e-5)


def test_predict_cli_on_a_class_folder_workdir(doc_run):
  from mmjax.predict import Predictor

  workdir, folder = doc_run["tmp"] / "workdirs" / "my_classes", doc_run["tmp"] / "my_data" / "classes"
  image = str(sorted((folder / "green").iterdir())[0])
  done = subprocess.run([sys.executable, "-m", "mmjax.predict", "--workdir", str(workdir),
                         "--image", image, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  printed = json.loads(done.stdout)
  assert printed["class"] in [c.name for c in folder.iterdir()]
  p = Predictor.from_workdir(workdir)
  assert printed == {**p.classify(image=image), "step": p.step}


def _wav(path: pathlib.Path, hz: float) -> None:
  import soundfile

  path.parent.mkdir(parents=True, exist_ok=True)
  t = np.arange(8000) / 16000
  soundfile.write(path, (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)


def test_classify_any_combination_of_image_audio_and_text(tmp_path):
  from flax import nnx

  from mmjax.tasks.user_data import UserClassification

  rows = []
  for i, (color, shape) in enumerate(_scenes(8)):
    _image(tmp_path / "img" / f"{i}.png", color, shape)
    _wav(tmp_path / "wav" / f"{i}.wav", 300 if shape == "square" else 600)
    rows.append({"picture": f"img/{i}.png", "sound": f"wav/{i}.wav", "text": f"a {color} thing",
                 "label": shape})
  train = _jsonl(tmp_path / "train.jsonl", rows)
  config = load_config("configs/classify.py:size=tiny,modality=image+audio+text", [
      f"input.train={train}", "input.fields.image=picture", "input.fields.audio=sound"])
  task = UserClassification(config, workdir=tmp_path / "work")
  assert task.classes == ("circle", "square") and task.modalities == ("image", "audio", "text")
  batch = next(iter(task.dataset("train", train=False, batch_size=8, shard_index=0, shard_count=1)))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["audio"].shape == (8, 16000)
  assert batch["audio_len"].tolist() == [8000] * 8 and batch["text_ids"].shape == (8, 32)
  assert batch["label"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # squares first: scenes 0-3
  loss, metrics = task.loss_fn(task.build_model(nnx.Rngs(0)), batch, False)
  assert np.isfinite(float(loss)) and 0.0 <= float(metrics["accuracy"]) <= 1.0
  # A folder of audio clips by class.
  for i in range(4):
    _wav(tmp_path / "sounds" / ("low" if i < 2 else "high") / f"{i}.wav", 200 + 100 * i)
  (tmp_path / "sounds" / "low" / "notes.txt").write_text("not a clip: ignored, as any other extension")
  config = load_config("configs/classify.py:size=tiny,modality=audio",
                       [f"input.train={tmp_path / 'sounds'}"])
  task = UserClassification(config)
  assert task.classes == ("high", "low") and len(task.source("train")) == 4


# ---------------------------------------------------------------------------------------------
# VQA accuracy on a hand-checked batch.
# ---------------------------------------------------------------------------------------------
def _vqa_data(root: pathlib.Path) -> pathlib.Path:
  """32 questions: the colour (six say it, one "<colour>.", two "dark <colour>", one "pink") or
  the shape (three say it, six "round" / "box", one "Two")."""
  rows = []
  for i, (color, shape) in enumerate(_scenes(16)):
    name = f"img/{i}.png"
    _image(root / name, color, shape)
    rows.append({"image": name, "question": "what color is the shape?",
                 "answers": [color] * 6 + [f"{color}."] + [f"dark {color}"] * 2 + ["pink"]})
    other = "round" if shape == "circle" else "box"
    rows.append({"image": name, "question": "what shape is it?",
                 "answers": [shape] * 3 + [other] * 6 + ["Two"]})
  return _jsonl(root / "train.jsonl", rows)


class _FixedAnswers:
  """A stand-in VQA model whose answers are given: logits one-hot at the given answer ids."""

  def __init__(self, ids, num_answers):
    self.logits = np.eye(num_answers, dtype=np.float32)[ids] * 10.0

  def __call__(self, images, ids, mask, **kwargs):
    return self.logits, {}


def test_vqa_accuracy_is_the_official_formula_on_a_hand_checked_batch(tmp_path):
  from mmjax.data.pipeline import make_pipeline
  from mmjax.tasks.user_data import UserVQA

  train = _vqa_data(tmp_path / "data")
  config = load_config("configs/vqa_open.py:size=tiny", [f"input.train={train}"])
  task = UserVQA(config, workdir=tmp_path / "work")
  # Every reference answer counts, normalised ("red." -> "red", "Two" -> "2"); most frequent
  # first, ties alphabetical: "round" and "box" 8 x 6 = 48, each colour 4 x 7 = 28, each shape
  # 8 x 3 = 24, "2" and "pink" 16, each "dark <colour>" 4 x 2 = 8.
  assert task.answers == ("box", "round", "blue", "green", "red", "yellow", "circle", "square", "2",
                          "pink", "dark blue", "dark green", "dark red", "dark yellow")
  assert json.loads((tmp_path / "work" / "answers.json").read_text()) == list(task.answers)
  png = (train.parent / "img" / "0.png").read_bytes()
  cases = [  # (reference answers, predicted answer, the official accuracy worked by hand)
      # "red." counts as "red" (punctuation); "dark red" matches 2 of 10: leaving out one of
      # those two leaves 1 (1/3), leaving out any of the other eight leaves 2 (2/3):
      # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
      (["red"] * 6 + ["red."] + ["dark red"] * 2 + ["pink"], "dark red", 0.6),
      # 3 "circle": leaving one out leaves 2 (2/3), else 3 (1): (3 * 2/3 + 7 * 1) / 10 = 0.9.
      (["circle"] * 3 + ["round"] * 7, "circle", 0.9),
      (["square"] * 10, "red", 0.0),
      # 4 or more people agree: 1 whichever one is left out.
      (["box"] * 4 + ["square"] * 6, "box", 1.0),
      # One reference answer: exact match after normalisation ("Two" -> "2").
      (["Two"], "2", 1.0),
  ]
  # The task's records: its answer targets added (`record_transform`), as its source gives them.
  records = [task.record_transform()({"id": f"case{i}", "image": png, "question": "what is it?",
                                      "answers": a}) for i, (a, _, _) in enumerate(cases)]
  data = make_pipeline(records, batch_size=8, preprocess=task.preprocess(config.input.pp_eval),
                       shuffle=False, num_epochs=1, drop_remainder=False, pad_remainder=True)
  batch = next(iter(data))
  predicted = [task.answers.index(p) for _, p, _ in cases] + [0] * 3  # 3 padding rows
  sums = task.eval_fn(_FixedAnswers(predicted, len(task.answers)), batch)
  metrics = task.summarize({k: float(v) for k, v in sums.items()})
  for answers, prediction, expected in cases[:4]:  # the official script's formula agrees
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)
  assert metrics["vqa_accuracy"] == pytest.approx(0.7, abs=1e-6)  # (0.6 + 0.9 + 0 + 1 + 1) / 5
  assert metrics["best_possible"] == pytest.approx(1.0, abs=1e-6)


def test_vqa_targets_count_raw_answers_as_the_vocabulary_does(tmp_path):
  from mmjax.tasks.user_data import UserVQA

  task = UserVQA(load_config("configs/vqa_open.py:size=tiny", [f"input.train={_vqa_data(tmp_path)}"]))
  targets = task.record_transform()
  png = (tmp_path / "img" / "0.png").read_bytes()
  # The vocabulary holds normalised answers ("red", "2"); references as people typed them score
  # for those entries: ten "Red" are ten "red", "The Box" is "box", "Two" / "two" are "2".
  cases = [(["Red"] * 10, "red", 1.0), (["The Box"] * 3 + ["circle"] * 7, "box", 0.9),
           (["Two", "two", "2", "2"] + ["pink"] * 6, "2", 1.0), (["Red."], "red", 1.0)]
  for answers, entry, score in cases:
    out = targets({"id": "case", "image": png, "question": "q", "answers": answers})
    scores = dict(zip(out["answer_ids"].tolist(), out["answer_scores"].tolist()))
    assert scores[task.answers.index(entry)] == pytest.approx(score), answers
    normalised = [normalize_answer(a) for a in answers]
    if len(answers) > 1:  # the official formula on the normalised references
      assert vqa_accuracy(entry, normalised) == pytest.approx(score)


# ---------------------------------------------------------------------------------------------
# 4. Bad inputs.
# ---------------------------------------------------------------------------------------------
def _clip_config(train, *overrides):
  return load_config("configs/clip.py:size=tiny", [f"input.train={train}", *overrides])


def test_bad_records_are_reported_with_their_lines(tmp_path):
  from mmjax.tasks.user_data import UserCLIP

  train = _caption_data(tmp_path, n=8)
  rows = [json.loads(line) for line in train.read_text().splitlines()]
  rows[2]["image"] = "img/missing.png"  # line 3: no such file
  del rows[4]["image"]  # line 5: no image column
  (tmp_path / "notes.txt").write_text("not an image")
  rows[6]["image"] = "notes.txt"  # line 7: not an image
  bad = _jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(manifest.ManifestError) as e:
    UserCLIP(_clip_config(bad))
  message = str(e.value)
  assert "line 3: image: file not found: 'img/missing.png'" in message
  assert "line 5: no column 'image' (the image)" in message
  # A missing file is found first; once the manifest's lines are whole, every file that is not
  # an image is named by its line.
  rows[2]["image"], rows[4]["image"] = "img/2.png", "img/4.png"
  _jsonl(bad, rows)
  with pytest.raises(manifest.ManifestError, match=r"bad.jsonl:7: image: '.*notes.txt' is not an image"):
    UserCLIP(_clip_config(bad))
  # Without the header check, decoding it fails on that record, named by its line: nothing is
  # skipped.
  task = UserCLIP(_clip_config(bad, "data.verify_files=False"))
  data = task.dataset("train", train=False, batch_size=8, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"record id='bad.jsonl:7': field 'image': cannot decode image bytes"):
    next(iter(data))


@pytest.mark.parametrize("config", ["clip", "caption"])
def test_eval_records_need_the_same_number_of_captions(tmp_path, config):
  from mmjax.train.tasks import TASKS

  train = _caption_data(tmp_path, n=8)
  rows = [json.loads(line) for line in train.read_text().splitlines()]
  rows[1]["text"] = [rows[1]["text"], "another caption"]
  evaluation = _jsonl(tmp_path / "uneven.jsonl", rows)
  overrides = [f"input.train={train}", f"input.eval={evaluation}"]
  with pytest.raises(ValueError, match=r"input.eval: every record needs the same number of captions "
                                       r"for evaluation; found 1 \(uneven.jsonl:1 ...\), 2 \(uneven.jsonl:2\)"):
    TASKS.get(config)(load_config(f"configs/{config}.py:size=tiny", overrides))
  # Training records may differ (one caption is drawn at a time).
  overrides = [f"input.train={evaluation}", f"input.eval={train}"]
  task = TASKS.get(config)(load_config(f"configs/{config}.py:size=tiny", overrides))
  assert len(task.source("eval")) == 8


def test_bad_image_on_the_command_line_names_the_line(tmp_path):
  train = _caption_data(tmp_path, n=8)
  rows = [json.loads(line) for line in train.read_text().splitlines()]
  (tmp_path / "img" / "3.png").write_text("not an image either")
  cmd = [sys.executable, "train.py", "--config", "configs/clip.py:size=tiny",
         f"--config.input.train={train}", "--workdir", str(tmp_path / "work")]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and rows[3]["image"] == "img/3.png"
  assert "train.jsonl:4: image: " in out.stderr and "is not an image" in out.stderr


def test_a_trained_tokenizer_must_fit_the_pretrained_vocabulary(tmp_path):
  import torch
  import transformers

  from mmjax.tasks.user_data import UserCLIP

  train = _caption_data(tmp_path, n=8)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1),
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
  torch.manual_seed(0)
  transformers.CLIPModel(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
  with pytest.raises(ValueError, match="at most 40 tokens .*the pretrained text encoder"):
    UserCLIP(_clip_config(train, f"model_init={tmp_path / 'hf'}"))
  with pytest.raises(ValueError, match="data.vocab_size=100: the text encoder .* has 40 tokens"):
    UserCLIP(_clip_config(train, f"model_init={tmp_path / 'hf'}", "data.vocab_size=100"))
  # A tokenizer given by data.tokenizer must fit too.
  from mmjax.data import tokenizer as tokenizer_lib

  words = tokenizer_lib.train_wordpiece([f"a {c} {s}" for c, s in _scenes(8)])
  path = tokenizer_lib.save_tokenizer(words, tmp_path / "words")
  with pytest.raises(ValueError, match=f"tokenizer .*: {len(words)} tokens do not fit the text encoder "
                                       r"\(the pretrained text encoder .*\), which has 40"):
    UserCLIP(_clip_config(train, f"model_init={tmp_path / 'hf'}", f"data.tokenizer={path}"))


# ---------------------------------------------------------------------------------------------
# Other sources and checkpoints.
# ---------------------------------------------------------------------------------------------
def test_tfds_split_as_a_source(tmp_path):
  import io

  import tensorflow_datasets as tfds

  from mmjax.tasks.user_data import UserClassification

  class ToyColors(tfds.core.GeneratorBasedBuilder):
    """Eight 8x8 images of two classes (PNG-encoded here: encoding arrays needs TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "picture": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
          "kind": tfds.features.ClassLabel(names=["dark", "light"]),
          "note": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(8):
        png = io.BytesIO()
        PIL.Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(png, format="png")
        yield i, {"picture": png.getvalue(), "kind": int(i >= 4), "note": "unused"}

  ToyColors(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
  config = load_config("configs/classify.py:size=tiny", [
      "input.train=tfds:toy_colors/train", f"data.data_dir={tmp_path}",
      "input.fields.image=picture", "input.fields.label=kind"])
  task = UserClassification(config)
  assert task.classes == ("dark", "light")
  batch = next(iter(task.dataset("train", train=False, batch_size=8, shard_index=0, shard_count=1)))
  assert batch["image"].shape == (8, 32, 32, 3)
  index = np.rint(batch["image"][:, 0, 0, 0] * 255 / 30).astype(int)  # pixels 30 * i, TFDS's order
  assert sorted(index.tolist()) == list(range(8)) and (batch["label"] == (index >= 4)).all()
  # Evaluated against a class folder's classes: the label feature's must be the same, in order.
  for i, name in enumerate(("light", "medium")):
    _image(tmp_path / "folder" / name / "0.png", list(COLORS)[i], "square")
  config.input.train, config.input.eval = str(tmp_path / "folder"), "tfds:toy_colors/train"
  with pytest.raises(ValueError, match=r"classes \['dark', 'light'\] are not the training split's \['light', 'medium'\]"):
    UserClassification(config).source("eval")
  config.input.train, config.input.eval = "tfds:toy_colors/train", ""
  config.input.fields.label = "label"
  with pytest.raises(ValueError, match=r"no feature\(s\) \{'label': 'label'\}.*\['kind', 'note', 'picture'\]"):
    UserClassification(config)


def test_tfds_texts_and_id_labels_are_read_without_decoding_images(tmp_path, monkeypatch):
  import io

  import tensorflow_datasets as tfds

  from mmjax.tasks.user_data import UserClassification

  class ToyNotes(tfds.core.GeneratorBasedBuilder):
    """Eight 8x8 images with a note and an id label that is not a `ClassLabel`."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "picture": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
          "kind": tfds.features.Scalar(np.int64),
          "note": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(8):
        png = io.BytesIO()
        PIL.Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(png, format="png")
        yield i, {"picture": png.getvalue(), "kind": i % 3, "note": f"a {'dark' if i < 4 else 'light'} tone"}

  ToyNotes(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
  decoded = []
  decode = tfds.features.Image.decode_example_np
  monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                      lambda self, example: decoded.append(1) or decode(self, example))
  config = load_config("configs/classify.py:size=tiny,modality=image+text", [
      "input.train=tfds:toy_notes/train", f"data.data_dir={tmp_path}",
      "input.fields.image=picture", "input.fields.text=note", "input.fields.label=kind"])
  # The tokenizer is trained on the notes and the classes are the ids 0..2: neither pass decodes
  # an image.
  task = UserClassification(config)
  assert task.classes == ("0", "1", "2") and not decoded
  assert {"dark", "light", "tone"} <= set(task.tokenizer.get_vocab())
  # Training batches do decode them (the count above can see a decode).
  batch = next(iter(task.dataset("train", train=False, batch_size=8, shard_index=0, shard_count=1)))
  assert len(decoded) == 8 and batch["image"].shape == (8, 32, 32, 3)
  assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_siglip_checkpoint_sets_the_architecture(tmp_path):
  import torch
  import transformers
  from flax import nnx

  from mmjax.tasks.user_data import UserCLIP
  from mmjax.transfer.model_init import check_model_init

  train = _caption_data(tmp_path, n=8)
  cfg = transformers.SiglipConfig(
      text_config=dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=8))
  torch.manual_seed(0)
  transformers.SiglipModel(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
  # The checkpoint's own tokenizer (here a WordPiece one on other words) is the task's.
  from mmjax.data import tokenizer as tokenizer_lib

  own = tokenizer_lib.train_wordpiece(["the quick brown fox", "a lazy dog"], vocab_size=200)
  tokenizer_lib.save_tokenizer(own, tmp_path / "hf")
  # The config asks for CLIP towers of another size and a remat option: the checkpoint's
  # architecture replaces them; the run-time option stays.
  # A SigLIP pools its last text position: texts are padded to all 16 of its positions.
  config = _clip_config(train, f"model_init={tmp_path / 'hf'}", "data.image_size=64", "data.max_len=8")
  config.model.encoders.image.remat = "full"
  task = UserCLIP(config, workdir=tmp_path / "work")
  m = config.model
  assert (m.loss_type, m.projection, m.embed_dim, config.data.image_size) == ("siglip", False, 32, 32)
  assert config.data.max_len == 16
  batch = next(iter(task.dataset("train", train=False, batch_size=2, shard_index=0, shard_count=1)))
  assert batch["caption_ids"].shape[-1] == 16
  assert (m.encoders.image.pool, m.encoders.image.remat, m.encoders.text.pool) == ("map", "full", "last")
  words = ["a red square", "the quick dog"]
  for tok in (task.tokenizer, tokenizer_lib.load_tokenizer(tmp_path / "work" / "tokenizer")):
    np.testing.assert_array_equal(tokenizer_lib.encode(tok, words, 8)[0],
                                  tokenizer_lib.encode(own, words, 8)[0])
  # Every checkpoint tensor has its place in the model the task builds.
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  assert check_model_init(str(tmp_path / "hf"), model) > 0
  # model_init naming the checkpoint's .safetensors file: the tokenizer beside it is still the task's.
  task = UserCLIP(_clip_config(train, f"model_init={tmp_path / 'hf' / 'model.safetensors'}"))
  np.testing.assert_array_equal(tokenizer_lib.encode(task.tokenizer, words, 8)[0],
                                tokenizer_lib.encode(own, words, 8)[0])


def test_a_pretrained_tokenizer_is_kept_in_a_bucket_workdir(gcs_emulator, tmp_path):
  from etils import epath

  from mmjax.data import tokenizer as tokenizer_lib
  from mmjax.tasks.user_data import UserCLIP

  train = _caption_data(tmp_path / "data", n=8)
  own = tokenizer_lib.train_wordpiece(["the quick brown fox", "a lazy dog"], vocab_size=200)
  own.save_pretrained(tmp_path / "tok")  # a tokenizer folder, as a downloaded one
  workdir = f"{gcs_emulator.bucket()}/run"
  config = _clip_config(train, f"data.tokenizer={tmp_path / 'tok'}")
  UserCLIP(config, workdir=workdir)
  assert (epath.Path(workdir) / "tokenizer" / "tokenizer_config.json").exists()
  # Read back from the bucket, not from data.tokenizer (gone now).
  (tmp_path / "tok" / "tokenizer.json").unlink()
  again = UserCLIP(config, workdir=workdir).tokenizer
  words = ["a red square", "the quick dog"]
  np.testing.assert_array_equal(tokenizer_lib.encode(again, words, 16)[0], tokenizer_lib.encode(own, words, 16)[0])


def test_a_pretrained_text_tower_keeps_its_padded_embedding_table(tmp_path):
  """A BERT checkpoint whose embedding table has more rows than its tokenizer has tokens (tables
  are often padded to a multiple of 64 or 128) loads whole: the model's table takes the
  checkpoint's size, not the tokenizer's."""
  import torch
  import transformers
  from flax import nnx

  from mmjax.data import tokenizer as tokenizer_lib
  from mmjax.tasks.user_data import UserClassification
  from mmjax.transfer.model_init import check_model_init

  rows = [{"text": f"a {color} {shape}", "label": shape} for color, shape in _scenes(8)]
  train = _jsonl(tmp_path / "train.jsonl", rows)
  own = tokenizer_lib.train_wordpiece([r["text"] for r in rows], vocab_size=200)
  padded = (len(own) // 64 + 1) * 64
  cfg = transformers.BertConfig(vocab_size=padded, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=128, max_position_embeddings=32)
  torch.manual_seed(0)
  transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "hf", safe_serialization=True)
  tokenizer_lib.save_tokenizer(own, tmp_path / "hf")
  config = load_config("configs/classify.py:size=tiny,modality=text",
                       [f"input.train={train}", f"model_init={{'encoders/text': '{tmp_path / 'hf'}'}}"])
  task = UserClassification(config)
  assert len(task.tokenizer) == len(own)
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  import safetensors
  with safetensors.safe_open(tmp_path / "hf" / "model.safetensors", "np") as f:
    tensors = len(list(f.keys()))
  assert check_model_init(config.model_init.to_dict(), model) == tensors  # every one, the table too
  # The table's size is kept in the config (config.json), which serving reads without model_init.
  assert config.model.encoders.text.vocab_size == padded


def test_siglip_trains_from_scratch(tmp_path):
  """configs/clip.py:loss=siglip without a checkpoint: the text tower pools the last position, so
  the CLIP default end token (49407, beyond a small trained vocabulary) must not stop the build."""
  from flax import nnx

  from mmjax.tasks.user_data import UserCLIP

  train = _caption_data(tmp_path, n=8)
  task = UserCLIP(load_config("configs/clip.py:size=tiny,loss=siglip", [f"input.train={train}"]))
  batch = next(iter(task.dataset("train", train=True, batch_size=8, shard_index=0, shard_count=1)))
  loss, _ = task.loss_fn(task.build_model(nnx.Rngs(0)), batch, True)
  assert np.isfinite(float(loss))
