"""Workdirs, checkpoints, predict, manifests and tokenizers in a bucket (`gs://`), against a GCS
emulator (tests/conftest.py `gcs_emulator`): train, SIGKILL, resume bit for bit, a corrupted
latest checkpoint, keep-best, predict from the bucket; and nothing written to a local folder
named after the URL (what `os.path.abspath("gs://b/run")` would make)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import types

import jax
import numpy as np
import pytest
from PIL import Image

from mmjax.data import manifest, tokenizer as tokenizer_lib
from mmjax.data.datasets import sort_of_clevr
from mmjax.train import trainer
from mmjax.train.checkpoint import Checkpointer, CorruptCheckpointError
from mmjax.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "vqa.py") + ":size=tiny"
STEPS = 8
# A checkpoint and a metrics row every 2 steps (windows end where a resumed run restarts, so its
# rows equal the uninterrupted run's); one evaluation, at the end.
OVERRIDES = [f"train.steps={STEPS}", "train.checkpoint_every=2", "train.log_every=2", f"train.eval_every={STEPS}"]


@pytest.fixture(scope="module")
def bed(gcs_emulator, tmp_path_factory):
  """A bucket, and local folders for the runs: the working folder of this process and its
  subprocesses, their temporary folder, the data set, a compilation cache shared by the runs."""
  root = tmp_path_factory.mktemp("gcs")
  bed = types.SimpleNamespace(bucket=gcs_emulator.bucket(), cwd=root / "cwd", tmp=root / "tmp", logs=root / "logs")
  for folder in (bed.cwd, bed.tmp, bed.logs):
    folder.mkdir()
  bed.env = dict(os.environ, MMJAX_DATA_DIR=str(root / "data"), TMPDIR=str(bed.tmp),
                 JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(bed.cwd)  # where a URL taken for a local path would land
    mp.setenv("MMJAX_DATA_DIR", bed.env["MMJAX_DATA_DIR"])
    yield bed


def _fs():
  """gcsfs without its listing cache: sees what other processes wrote."""
  import gcsfs
  return gcsfs.GCSFileSystem(token="anon", use_listings_cache=False, skip_instance_cache=True)


def _train(bed, workdir, wait=True):
  """`python train.py --config configs/vqa.py:size=tiny ...` in a subprocess; waited for: its
  final metrics and log. Its output goes to files (a pipe nobody reads while it runs would fill)."""
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", CONFIG, "--workdir", workdir,
         *[f"--config.{o}" for o in OVERRIDES]]
  out, err = (bed.logs / f"{time.time_ns()}.{n}" for n in ("out", "err"))
  with open(out, "w") as o, open(err, "w") as e:
    p = subprocess.Popen(cmd, cwd=bed.cwd, env=bed.env, stdout=o, stderr=e)
  p.log = err
  if not wait:
    return p
  p.wait(timeout=900)
  out, err = out.read_text(), err.read_text()
  assert p.returncode == 0, err[-4000:]
  return json.loads(out[out.rfind("\n{\n") + 1:]), err  # train.py's last output (TFDS may print before)


def _steps(fs, checkpoints):
  """(committed, uncommitted) step numbers in a bucket's checkpoint folder (GCS: a step is
  published by its commit_success.txt)."""
  found = {}
  for name in fs.find(checkpoints.removeprefix("gs://")):
    parts = name.split("/checkpoints/", 1)[1].split("/")
    if parts[0].isdigit():
      found[int(parts[0])] = found.get(int(parts[0]), False) or parts[1:] == ["commit_success.txt"]
  return sorted(s for s, c in found.items() if c), sorted(s for s, c in found.items() if not c)


def _config():
  return load_config(CONFIG, OVERRIDES)


def _restore(workdir, step):
  ck = Checkpointer(f"{workdir}/checkpoints")
  try:
    state, data = ck.restore(step, trainer.Setup(_config()).abstract_state)
  finally:
    ck.close()
  return jax.device_get(state), data


def _rows(workdir):
  """metrics.jsonl without the wall-clock columns."""
  return [{k: v for k, v in r.items() if k not in ("time", "train/examples_per_s")} for r in trainer.read_metrics(workdir)]


def assert_no_local_copy(bed):
  """Nothing on the local disk under a name taken from the bucket URL: nothing named after the
  bucket in the temporary folders or the repository, no `gs:` folder where the runs worked."""
  name = bed.bucket.removeprefix("gs://")
  found = []
  for top in (bed.cwd, bed.tmp, tempfile.gettempdir(), REPO):
    ours = str(top) in (str(bed.cwd), str(bed.tmp))
    for folder, dirs, files in os.walk(top):
      dirs[:] = [d for d in dirs if d not in (".venv", ".git")]
      found += [os.path.join(folder, n) for n in dirs + files if name in n or (ours and n == "gs:")]
  assert not found, f"local files named after {bed.bucket}: {sorted(set(found))[:5]}"


@pytest.fixture(scope="module")
def straight(bed):
  """An uninterrupted run in the bucket: its workdir URL and final metrics."""
  workdir = f"{bed.bucket}/straight"
  final, _ = _train(bed, workdir)
  return workdir, final


def test_workdir_in_a_bucket(bed, straight):
  workdir, final = straight
  assert final["step"] == STEPS and final["resumed_from"] is None
  files = _fs().find(workdir.removeprefix("gs://"))
  names = {f.split("/straight/", 1)[1] for f in files}
  assert {"config.json", "metrics.jsonl", "curves.png"} <= names
  assert any(n.startswith("tb/events.out.tfevents") for n in names)  # TensorBoard, through tensorboardX
  # The last train.keep (2) steps, the best (the last: the only one evaluated) among them; the
  # older steps' objects deleted from the bucket.
  assert _steps(_fs(), f"{workdir}/checkpoints") == ([STEPS - 2, STEPS], [])
  rows = trainer.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(2, STEPS + 1, 2))
  assert rows[-1]["test/accuracy"] == final["test/accuracy"]
  assert_no_local_copy(bed)


def test_sigkill_then_resume_equals_the_uninterrupted_run(bed, straight):
  workdir, fs = f"{bed.bucket}/killed", _fs()
  p = _train(bed, workdir, wait=False)
  deadline = time.time() + 600
  while True:  # killed while a save is in flight, after at least one complete step
    committed, partial = _steps(fs, f"{workdir}/checkpoints")
    if committed and partial:
      break
    if p.poll() is not None or time.time() > deadline:
      p.kill()
      pytest.fail(f"no kill point reached (committed {committed}, partial {partial}):\n{p.log.read_text()[-3000:]}")
    time.sleep(0.02)
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  committed, partial = _steps(fs, f"{workdir}/checkpoints")
  assert committed[-1] < STEPS and partial and min(partial) > committed[-1]  # the save in flight
  final, log = _train(bed, workdir)
  assert final["resumed_from"] == committed[-1] and final["step"] == STEPS
  assert "partial checkpoint left by an interrupted save" in log  # the step without its commit file
  assert _steps(fs, f"{workdir}/checkpoints")[1] == []
  a, da = _restore(straight[0], STEPS)
  b, db = _restore(workdir, STEPS)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, optimizer state, step: bit for bit
  assert da == db
  assert _rows(workdir) == _rows(straight[0])  # every logged metric, once per step
  assert {k: v for k, v in final.items() if k != "resumed_from" and "examples_per_s" not in k} == \
         {k: v for k, v in straight[1].items() if k != "resumed_from" and "examples_per_s" not in k}
  assert_no_local_copy(bed)


def test_corrupted_latest_checkpoint_in_the_bucket_falls_back(bed, straight):
  fs, src, wd = _fs(), straight[0].removeprefix("gs://"), f"{bed.bucket}/corrupt"
  fs.copy(f"{src}/checkpoints", f"{wd.removeprefix('gs://')}/checkpoints", recursive=True)
  # Every data object of the step garbled (which of them a restore reads depends on Orbax's
  # layout): 8 bytes in the middle flipped, so the arrays still "read".
  for name in fs.find(f"{wd.removeprefix('gs://')}/checkpoints/{STEPS}/state"):
    if "/d/" in name:
      data = bytearray(fs.cat(name))
      middle = slice(len(data) // 2, len(data) // 2 + 8)
      data[middle] = bytes(b ^ 0xFF for b in data[middle])
      fs.pipe(name, bytes(data))
  abstract = trainer.Setup(_config()).abstract_state
  ck = Checkpointer(f"{wd}/checkpoints")
  try:
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint step {STEPS} in gs://.*(corrupted|cannot be read)"):
      ck.restore(STEPS, abstract)
    step, got, _ = ck.restore_latest(abstract)
  finally:
    ck.close()
  assert step == STEPS - 2
  want, _ = _restore(straight[0], STEPS - 2)
  jax.tree.map(np.testing.assert_array_equal, want, jax.device_get(got))
  assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{wd.removeprefix('gs://')}/checkpoints")) == \
         [str(STEPS - 2), f"{STEPS}.corrupt"]  # moved aside in the bucket
  assert_no_local_copy(bed)


def test_keep_best_in_the_bucket(bed, tmp_path):
  state = {"w": jax.numpy.arange(6.0)}

  def run(directory):
    ck = Checkpointer(directory, keep=2, best_metric="acc")
    try:
      for step, acc in enumerate([0.2, 0.9, 0.5, 0.4, 0.7], start=1):
        ck.save(step, jax.tree.map(lambda x: x + step, state), {"i": step}, metrics={"acc": acc}, force=True)
        ck.wait()
      return ck.best_step(), ck.all_steps()
    finally:
      ck.close()

  directory = f"{bed.bucket}/best/checkpoints"
  # The last two steps and the best one; the bucket as a local folder.
  assert run(directory) == run(tmp_path / "checkpoints") == (2, [2, 4, 5])
  assert _steps(_fs(), directory) == ([2, 4, 5], [])  # the other steps' objects deleted from the bucket
  ck = Checkpointer(directory, best_metric="acc")  # a reader (predict) finds the best
  try:
    got, data = ck.restore(ck.best_step(), state)
  finally:
    ck.close()
  assert data == {"i": 2}
  np.testing.assert_array_equal(jax.device_get(got["w"]), np.arange(6.0) + 2)
  assert_no_local_copy(bed)


def test_predict_cli_reads_the_bucket(bed, straight, tmp_path):
  cfg = _config()
  record = sort_of_clevr.load("test", config=sort_of_clevr.sized_config(cfg.data.num_images))[1]
  Image.fromarray(record["image"]).save(tmp_path / "scene.png")
  _fs().put(str(tmp_path / "scene.png"), f"{bed.bucket}/inputs/scene.png".removeprefix("gs://"))
  local = tmp_path / "local"
  _fs().get(straight[0].removeprefix("gs://"), str(local), recursive=True)  # the oracle: a local copy
  question = record["questions"][3].decode()

  def predict(workdir, image):
    cmd = [sys.executable, "-m", "mmjax.predict", "--workdir", workdir, "--image", image,
           "--question", question, "--json", "--top", "3"]
    r = subprocess.run(cmd, cwd=bed.cwd, env=bed.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)

  from_bucket = predict(straight[0], f"{bed.bucket}/inputs/scene.png")
  assert from_bucket == predict(str(local), str(tmp_path / "scene.png"))
  assert from_bucket["step"] == STEPS and from_bucket["answer"] in sort_of_clevr.ANSWERS
  assert_no_local_copy(bed)


def test_manifest_and_folder_in_the_bucket(bed, tmp_path):
  data = tmp_path / "data"
  rng = np.random.default_rng(0)
  for i, cls in enumerate(["cat", "dog", "cat"]):
    (data / cls).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), np.uint8)).save(data / cls / f"{i}.png")
  lines = [{"image": "cat/0.png", "text": "a cat", "label": "cat"}, {"image": "dog/1.png", "text": "a dog", "label": "dog"}]
  (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  (data / "train.csv").write_text("image,label\ncat/2.png,0\ndog/1.png,1\n")
  (data / "bad.jsonl").write_text(json.dumps({"image": "cat/9.png"}) + "\n" + json.dumps({"image": "../x.png"}) + "\n")
  url = f"{bed.bucket}/data"
  _fs().put(str(data), url.removeprefix("gs://"), recursive=True)

  def records(source):
    return [source[i] for i in range(len(source))], source.classes

  for name in ("train.jsonl", "train.csv"):
    assert records(manifest.load_manifest(f"{url}/{name}")) == records(manifest.load_manifest(data / name))
  folder = manifest.load_manifest(url + "/")  # a folder of class subfolders
  assert [e.id for e in folder.entries] == [e.id for e in manifest.from_folder(data).entries]
  assert records(folder) == records(manifest.from_folder(data))
  with pytest.raises(manifest.ManifestError) as e:
    manifest.load_manifest(f"{url}/bad.jsonl")
  assert "line 1: image: file not found: 'cat/9.png'" in str(e.value) and "line 2: image:" in str(e.value)
  assert_no_local_copy(bed)


def test_tokenizer_file_in_the_bucket(bed):
  tok = tokenizer_lib.train_wordpiece(["what shape is the red object", "is there a blue square"])
  path = tokenizer_lib.save_tokenizer(tok, f"{bed.bucket}/tok/{tokenizer_lib.TOKENIZER_FILE}")
  assert str(path).startswith("gs://")
  again = tokenizer_lib.load_tokenizer(f"{bed.bucket}/tok")  # the folder holding tokenizer.json
  texts = ["what shape is the blue object", "is there a red circle"]
  for a, b in zip(tokenizer_lib.encode(tok, texts, 12), tokenizer_lib.encode(again, texts, 12)):
    np.testing.assert_array_equal(a, b)
  assert_no_local_copy(bed)


def test_export_reads_the_bucket(bed, straight, tmp_path):
  """`mmjax.export` of a gs:// workdir: the trained BERT question encoder, read from the bucket,
  written in the Hugging Face layout with the same tensors as an export of a local copy."""
  from mmjax import export
  from mmjax.transfer.io import read_safetensors
  local = tmp_path / "local"
  _fs().get(straight[0].removeprefix("gs://"), str(local), recursive=True)  # the oracle: a local copy
  export.export(straight[0], str(tmp_path / "from_bucket"))
  export.export(str(local), str(tmp_path / "from_local"))
  got, want = (read_safetensors(tmp_path / d / "encoders" / "text" / "model.safetensors")
               for d in ("from_bucket", "from_local"))
  assert sorted(got) == sorted(want) and len(got) > 10
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert_no_local_copy(bed)
