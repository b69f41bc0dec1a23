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


def test_manifests_with_a_byte_order_mark_read_as_without(data):
  """Excel's "CSV UTF-8" and Notepad's "UTF-8 with BOM" start the file with EF BB BF."""
  bom = b"\xef\xbb\xbf"
  (data / "m.csv").write_bytes(bom + b"image,label\r\nimg/a.png,cat\r\nimg/b.png,dog\r\n")
  _jsonl(data / "m.jsonl", [{"image": "img/a.png", "label": "cat"}, {"image": "img/b.png", "label": "dog"}])
  (data / "m.jsonl").write_bytes(bom + (data / "m.jsonl").read_bytes())
  for name in ("m.csv", "m.jsonl"):
    for columns in (None, {"image": "image", "label": "label"}):
      src = manifest.load_manifest(data / name, columns=columns)
      assert src.classes == ["cat", "dog"] and [src[i]["label"] for i in range(2)] == [0, 1], name
      assert src[1]["image"] == (data / "img" / "b.png").read_bytes()


def test_a_manifest_not_in_utf8_names_its_line_and_byte(data):
  # Excel's plain "CSV (comma delimited)" writes Windows-1252: "é" is the byte E9.
  (data / "m.csv").write_bytes("image,text\nimg/a.png,a red square\nimg/b.png,un café rouge\n".encode("cp1252"))
  with pytest.raises(manifest.ManifestError) as e:
    manifest.load_manifest(data / "m.csv")
  assert str(e.value) == (f"{data / 'm.csv'}: line 3: byte 0xe9 is not UTF-8; save the manifest as "
                          "UTF-8 (Excel: 'CSV UTF-8')")
  (data / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + '{"image": "img/a.png"}\n{"text": "café"}\n'.encode("latin-1"))
  with pytest.raises(manifest.ManifestError, match=r"m.jsonl: line 2: byte 0xe9 is not UTF-8"):
    manifest.load_manifest(data / "m.jsonl")  # the line counted after the BOM


def test_bad_json_is_reported_with_every_other_problem(data):
  m = data / "m.jsonl"
  m.write_text('{"image": "img/a.png", "title": "a"}\n{not json\n{"image": "img/b.png"}\n'
               '{"image": "img/gone.png", "title": "b"}\n')
  with pytest.raises(manifest.ManifestError) as e:
    manifest.load_manifest(m, columns={"image": "image", "captions": "title"})
  assert str(e.value).splitlines()[1:] == [
      "  line 2: invalid JSON (Expecting property name enclosed in double quotes)",
      "  line 3: no column 'title' (the captions); it has ['image']",
      "  line 4: image: file not found: 'img/gone.png' (under " + str(data) + ")"]


def test_a_class_folder_from_a_mac_keeps_only_the_images(tmp_path):
  root = tmp_path / "pets"
  apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 40
  for cls in ("cat", "dog"):
    _png(root / cls / "1.png", 1)
    (root / cls / "._1.png").write_bytes(apple_double)  # macOS's resource fork beside each file
    (root / cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  _png(root / "cat" / ".ipynb_checkpoints" / "1-checkpoint.png", 2)
  (root / "__MACOSX" / "cat").mkdir(parents=True)  # a macOS zip's folder of resource forks
  (root / "__MACOSX" / "cat" / "._1.png").write_bytes(apple_double)
  src = manifest.load_manifest(root)
  assert src.classes == ["cat", "dog"] and [e.id for e in src.entries] == ["cat/1.png", "dog/1.png"]
  manifest.verify_files(src)


def test_an_unsupported_url_is_named(data):
  for path in ("https://example.com/m.jsonl", "ftp://example.com/pets"):
    with pytest.raises(ValueError) as e:
      manifest.load_manifest(path)
    assert str(e.value) == (f"{path!r}: unsupported URL; expected a local path or a bucket URL "
                            "(gs://bucket/..., s3://bucket/...)")
  with pytest.raises(ValueError, match="'https://example.com/data': unsupported URL"):
    manifest.load_manifest(_jsonl(data / "m.jsonl", [{"image": "img/a.png"}]), root="https://example.com/data")
