"""User manifests and class folders: records, pp errors naming lines, paths kept under the root."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import soundfile

from mmjax.data import manifest, pipeline, pp


def _png(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(path)
  return path


def _wav(path, n=800):
  path.parent.mkdir(parents=True, exist_ok=True)
  soundfile.write(path, np.linspace(-0.5, 0.5, n, dtype=np.float32), 8000, subtype="FLOAT")
  return path


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture
def data(tmp_path):
  root = tmp_path / "data"
  _png(root / "img" / "a.png", 10)
  _png(root / "img" / "b.png", 200)
  _wav(root / "wav" / "a.wav")
  (tmp_path / "secret.png").write_bytes((root / "img" / "a.png").read_bytes())
  return root


def test_class_folders(tmp_path):
  root = tmp_path / "pets"
  for i, (cls, value) in enumerate([("dog", 1), ("cat", 2), ("cat", 3), ("emu", 4)]):
    _png(root / cls / f"{i}.png", value)
  (root / "cat" / "notes.txt").write_text("ignored")
  src = manifest.load_manifest(root)
  assert src.classes == ["cat", "dog", "emu"] and len(src) == 4
  records = [src[i] for i in range(len(src))]
  assert [r["label"] for r in records] == [0, 0, 1, 2]
  assert [r["id"] for r in records] == ["cat/1.png", "cat/2.png", "dog/0.png", "emu/3.png"]
  img = pp.parse("image.decode")(records[2], np.random.default_rng(0))["image"]
  np.testing.assert_array_equal(img, 1)
  (root / "empty").mkdir()
  with pytest.raises(manifest.ManifestError, match="empty/: no image files"):
    manifest.from_folder(root)


def test_class_folder_symlink_out_is_refused(tmp_path):
  root = tmp_path / "pets"
  _png(root / "cat" / "1.png", 1)
  outside = _png(tmp_path / "elsewhere" / "x.png", 2)
  os.symlink(outside, root / "cat" / "2.png")
  with pytest.raises(manifest.ManifestError, match="cat/2.png: resolves to .*outside the data root"):
    manifest.from_folder(root)


def test_jsonl_records_and_pp(data):
  m = _jsonl(data / "m.jsonl", [
      {"image": "img/a.png", "text": "A cat", "audio": "wav/a.wav", "label": "cat"},
      {"image": "img/b.png", "text": "A dog", "audio": "wav/a.wav", "label": "dog"},
  ])
  src = manifest.load_manifest(m)
  assert len(src) == 2 and src.classes == ["cat", "dog"]
  r = src[1]
  assert r["id"] == "m.jsonl:2" and r["label"] == 1 and r["text"] == "A dog"
  assert r["image"] == (data / "img" / "b.png").read_bytes()
  out = pp.parse("image.decode|audio.load|audio.resample(16000)|text.normalize")(
      r, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], 200)
  assert out["audio"].shape == (1600,) and out["text"] == "a dog"
  given = manifest.load_manifest(m, classes=["dog", "cat", "emu"])
  assert [given[i]["label"] for i in range(2)] == [1, 0]


def test_csv_with_ids_and_a_separate_root(data, tmp_path):
  m = tmp_path / "list.csv"
  m.write_text("image,label\nimg/a.png,3\nimg/b.png,0\n")
  src = manifest.load_manifest(m, root=data)
  assert [src[i]["label"] for i in range(2)] == [3, 0] and src.classes is None
  assert src[0]["id"] == "list.csv:2"


def test_pp_errors_name_the_manifest_line(data):
  (data / "img" / "broken.png").write_bytes(b"\x89PNG not really")
  m = _jsonl(data / "m.jsonl", [{"image": "img/a.png"}, {"image": "img/broken.png"}])
  src = manifest.load_manifest(m)
  f = pp.parse("image.decode")
  f(src[0], np.random.default_rng(0))
  with pytest.raises(pp.BadExample, match=r"record id='m.jsonl:2': field 'image'"):
    f(src[1], np.random.default_rng(0))


@pytest.mark.parametrize("bad_path,why", [
    ("../secret.png", "'\\.\\.' component"),
    ("img/../../secret.png", "'\\.\\.' component"),
    ("/etc/hostname", "absolute path"),
    ("~/x.png", "absolute path"),
    ("link.png", "outside the data root"),
])
def test_paths_may_not_escape_the_root(data, tmp_path, bad_path, why):
  os.symlink(tmp_path / "secret.png", data / "link.png")
  m = _jsonl(data / "m.jsonl", [{"image": "img/a.png"}, {"image": bad_path}])
  with pytest.raises(manifest.ManifestError, match=rf"line 2: image: .*{why}"):
    manifest.load_manifest(m)


def test_all_problems_reported_with_line_numbers(data):
  m = data / "m.jsonl"
  m.write_text(json.dumps({"image": "img/a.png"}) + "\n\n{not json\n[1, 2]\n")
  with pytest.raises(manifest.ManifestError, match="2 problem") as info:
    manifest.load_manifest(m)
  assert "line 3: invalid JSON" in str(info.value)
  assert "line 4: expected a JSON object, got list" in str(info.value)
  m = _jsonl(data / "m.jsonl", [
      {"image": "img/a.png", "label": 0},
      {"image": "img/missing.png", "label": 1},
      {"image": "img/b.png"},
      {"image": "img/b.png", "label": True},
      {"image": "img/gone.png", "label": 2},
  ])
  with pytest.raises(manifest.ManifestError, match="4 problem") as info:
    manifest.load_manifest(m)
  for expected in ("line 2: image: file not found: 'img/missing.png'",
                   "line 3: fields ['image'] differ from line 1",
                   "line 4: label: expected a class id or name, got True",
                   "line 5: image: file not found: 'img/gone.png'"):
    assert expected in str(info.value)


def test_manifest_shape_errors(data):
  with pytest.raises(manifest.ManifestError, match="expected a subset"):
    manifest.load_manifest(_jsonl(data / "a.jsonl", [{"imgae": "img/a.png"}]))
  with pytest.raises(manifest.ManifestError, match="mix class ids and class names"):
    manifest.load_manifest(_jsonl(data / "b.jsonl", [{"image": "img/a.png", "label": 1},
                                                     {"image": "img/b.png", "label": "cat"}]))
  with pytest.raises(manifest.ManifestError, match="id 5 out of range for 2 classes"):
    manifest.load_manifest(_jsonl(data / "c.jsonl", [{"image": "img/a.png", "label": 5}]),
                           classes=["x", "y"])
  (data / "d.csv").write_text("image,label\nimg/a.png,1,extra\n")
  with pytest.raises(manifest.ManifestError, match="line 2: 2 columns expected"):
    manifest.load_manifest(data / "d.csv")
  with pytest.raises(manifest.ManifestError, match="expected a .jsonl or .csv"):
    manifest.load_manifest(_png(data / "x.png", 0))


def test_source_feeds_the_pipeline_which_drops_skips(data):
  (data / "img" / "broken.png").write_bytes(b"\x89PNG not really")
  m = _jsonl(data / "m.jsonl", [{"image": "img/a.png", "label": 0},
                                {"image": "img/broken.png", "label": 1},
                                {"image": "img/b.png", "label": 1}] * 2)
  src = manifest.load_manifest(m)
  f = pp.parse("image.decode|image.value_range(0, 1)|keep('image', 'label')", skip_bad=True)
  ds = pipeline.make_pipeline(src, batch_size=2, preprocess=f, shuffle=False, num_epochs=1,
                              shard_index=0, shard_count=1, drop_remainder=False)
  batches = list(ds)
  assert [b["image"].shape for b in batches] == [(2, 6, 5, 3), (2, 6, 5, 3)]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), [0, 1, 0, 1])
  np.testing.assert_allclose(batches[0]["image"][1], 200 / 255.0, rtol=1e-6)
  strict = pipeline.make_pipeline(src, batch_size=2, preprocess=pp.parse("image.decode"),
                                  shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
  with pytest.raises(pp.BadExample, match="record id='m.jsonl:2': field 'image'"):
    list(strict)
