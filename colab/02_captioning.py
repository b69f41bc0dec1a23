# %% [markdown]
# # Image captioning on the embedded shapes_captions
#
# A small CNN encoder and a Transformer decoder (Show and Tell is `model=show_and_tell`), trained
# with teacher forcing and evaluated by greedy decoding with BLEU-4, ROUGE-L and CIDEr-D (equal to
# pycocoevalcap's); then beam-search captions of test images, shown with their images and a
# reference caption.
#
# **Run it**: Runtime → Change runtime type → TPU (or GPU); fill in the form of the first code
# cell (where mmjax comes from, where runs are written, the config size); Runtime → Run all. The
# outputs saved here come from a headless `tiny` run on a CPU (`python colab/execute.py`).

# %%
# @title Set up: where mmjax comes from, where runs are written, the config size
import glob
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

# Where mmjax comes from. There is no default: the code it names runs on this runtime. One of: a
# git URL of a repository you trust (cloned: the configs live in it), a folder holding a checkout,
# a wheel file (on Drive: /content/drive/MyDrive/...), or a PyPI requirement once mmjax is published.
MMJAX_SOURCE = ""  # @param {type:"string"}
# Where runs are written: a local folder (on Colab under /content, lost when the runtime goes), a
# folder on Google Drive (/content/drive/MyDrive/..., mounted here) or a bucket (gs://bucket/folder).
WORKDIR_ROOT = "workdirs/notebooks"  # @param {type:"string"}
# The config size. auto: "default" on a TPU or GPU, "small" on a CPU; tiny: a smoke run of a minute.
SIZE = "auto"  # @param ["auto", "tiny", "small", "default"]
NOTEBOOK, EXTRAS, ACCELERATOR_SIZE = "02_captioning", "", "default"  # this notebook's

# Headless runs (tests/test_notebooks.py, colab/execute.py) fill the form from the environment.
MMJAX_SOURCE = os.environ.get("MMJAX_NOTEBOOK_SOURCE", MMJAX_SOURCE).strip()
WORKDIR_ROOT = os.environ.get("MMJAX_NOTEBOOK_WORKDIR", WORKDIR_ROOT).strip()
SIZE = os.environ.get("MMJAX_NOTEBOOK_SIZE", SIZE).strip()
ON_COLAB = "google.colab" in sys.modules
GIT_URL = r"(git\+)?(https?|ssh|git|file)://\S+|[\w.-]+@[\w.-]+:\S+"
REQUIREMENT = r"[A-Za-z0-9][\w.-]*(\[[\w,-]+\])?(\s*[<>=!~]=?\s*[\w.*+!-]+,?)*"
if SIZE not in ("auto", "tiny", "small", "default"):
  raise ValueError(f"SIZE={SIZE!r}: expected auto, tiny, small or default")
if not MMJAX_SOURCE:
  raise ValueError("MMJAX_SOURCE is empty: set it in the form above to where mmjax comes from: a git "
                   "URL of a repository you trust, a folder holding a checkout, a .whl file or a PyPI "
                   "name. There is no default: the code it names runs on this runtime.")
if ON_COLAB and "/content/drive/" in f"{MMJAX_SOURCE} {WORKDIR_ROOT}":
  from google.colab import drive

  drive.mount("/content/drive")
if ON_COLAB and WORKDIR_ROOT.startswith("gs://"):
  from google.colab import auth

  auth.authenticate_user()  # the bucket is read and written as your Google account


def pip(*args: str) -> None:
  """`pip install args` in this kernel's interpreter; stops with pip's last lines where it fails."""
  out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"pip install {' '.join(args)} failed:\n{(out.stdout + out.stderr)[-3000:]}")


def checkout(folder: str) -> str:
  """`folder`, absolute, where it holds an mmjax checkout; stops otherwise."""
  pyproject = os.path.join(folder, "pyproject.toml")
  if not (os.path.isfile(pyproject) and re.search(r'^name = "mmjax"$', open(pyproject).read(), re.M)):
    raise ValueError(f"MMJAX_SOURCE: {folder!r} holds no mmjax checkout (no pyproject.toml with "
                     f'name = "mmjax")')
  return os.path.abspath(folder)


def installed_from(folder: str) -> bool:
  """Whether this kernel imports an installed mmjax from the checkout `folder`."""
  spec = importlib.util.find_spec("mmjax")
  try:
    importlib.metadata.version("mmjax")
  except importlib.metadata.PackageNotFoundError:
    return False
  return spec is not None and spec.origin is not None and os.path.dirname(os.path.dirname(spec.origin)) == folder


REPO = None  # the checkout, where the source is one: the zoo's configs/ are read from it
if re.fullmatch(GIT_URL, MMJAX_SOURCE):
  url, clone = MMJAX_SOURCE.removeprefix("git+"), os.path.abspath("mmjax-src")
  if not os.path.isdir(clone):
    out = subprocess.run(["git", "clone", "-q", "--depth", "1", url, clone], capture_output=True, text=True)
    if out.returncode:
      raise ValueError(f"MMJAX_SOURCE: git clone {url} failed:\n{out.stderr[-3000:]}")
  origin = subprocess.run(["git", "-C", clone, "remote", "get-url", "origin"], capture_output=True, text=True)
  if origin.stdout.strip() != url:
    raise ValueError(f"{clone} is a clone of {origin.stdout.strip() or 'nothing'!r}, not of {url!r}: "
                     f"delete it (`rm -rf {clone}`) and run this cell again")
  REPO = checkout(clone)
elif os.path.isdir(os.path.expanduser(MMJAX_SOURCE)):
  REPO = checkout(os.path.expanduser(MMJAX_SOURCE))
elif MMJAX_SOURCE.endswith(".whl") or "/" in MMJAX_SOURCE:
  if not (MMJAX_SOURCE.endswith(".whl") and os.path.isfile(os.path.expanduser(MMJAX_SOURCE))):
    raise ValueError(f"MMJAX_SOURCE: {MMJAX_SOURCE!r} is no folder and no .whl file here"
                     + (" (Drive is mounted at /content/drive/MyDrive)" if ON_COLAB else ""))
  pip(os.path.expanduser(MMJAX_SOURCE))
elif re.fullmatch(REQUIREMENT, MMJAX_SOURCE):
  pip(MMJAX_SOURCE)
else:
  raise ValueError(f"MMJAX_SOURCE={MMJAX_SOURCE!r} is none of: a git URL (https://, ssh://, "
                   "git@host:path), a folder, a .whl file, a PyPI requirement (mmjax==0.1.0)")
if REPO is not None and not installed_from(REPO):
  pip("-e", REPO)
  sys.path.insert(0, REPO)  # an editable install reaches new kernels only
if EXTRAS:
  pip(f"mmjax[{EXTRAS}]")  # the extras of the mmjax installed above


def tpu_on_pci() -> bool:
  """A Google TPU chip among the PCI devices (as JAX's own detection looks for one)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    device = os.path.join(os.path.dirname(vendor), "device")
    if open(vendor).read().strip() == "0x1ae0" and open(device).read().strip() in (
        "0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"):
      return True
  return False


# The runtime's accelerator, from the machine (not from JAX, which falls back to the CPU quietly).
ACCELERATOR = ("tpu" if glob.glob("/dev/accel*") or tpu_on_pci() else
               "gpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu")
if os.environ.get("JAX_PLATFORMS") == "cpu":
  ACCELERATOR = "cpu"  # asked for
if ACCELERATOR == "tpu":
  pip(f"jax[tpu]=={importlib.metadata.version('jax')}")  # libtpu for the jax installed above

import jax  # after the install: this kernel's first import of it

if jax.__version__ != importlib.metadata.version("jax"):
  raise RuntimeError(f"this session imported jax {jax.__version__} before the install replaced it with "
                     f"{importlib.metadata.version('jax')}: Runtime -> Restart session, then run all again")
BACKEND, DEVICES = jax.default_backend(), jax.device_count()
HINT = {"tpu": "a jax whose libtpu supports this TPU", "gpu": f"jax[cuda12]=={jax.__version__}"}
if ACCELERATOR != "cpu" and BACKEND != ACCELERATOR:
  raise RuntimeError(f"This runtime has a {ACCELERATOR.upper()}, but JAX {jax.__version__} sees none "
                     f"(backend {BACKEND!r}): the notebook stops rather than train on the CPU. Restart the "
                     f"session and run all again; where JAX still sees none, install {HINT[ACCELERATOR]} "
                     "before running this cell.")
if SIZE == "auto":
  SIZE = ACCELERATOR_SIZE if BACKEND in ("tpu", "gpu") else "small"
print(f"mmjax {importlib.metadata.version('mmjax')} from {MMJAX_SOURCE!r}; JAX {jax.__version__}, "
      f"{DEVICES} {jax.devices()[0].device_kind} device(s); size {SIZE!r}")
if BACKEND == "cpu":
  print(f"No TPU or GPU on this runtime: the notebook runs the CPU-sized config ({SIZE}).")

# %%
# Configs, workdir and figures.
import json

import numpy as np
from etils import epath
from IPython.display import Image, Markdown, display

import mmjax
from mmjax import viz
from mmjax.train.config import load_config

# The configs: the checkout's, else the installed package's own (a wheel holds no configs/ folder).
CONFIGS = epath.Path(REPO) if REPO else epath.Path(mmjax.__file__).parent.parent
WORKDIR = epath.Path(WORKDIR_ROOT) / NOTEBOOK
WORKDIR.mkdir(parents=True, exist_ok=True)
print(f"workdir {WORKDIR}")


def load(config: str, *overrides: str):
  """The config 'file.py:args' (file relative to the checkout) with command-line overrides
  ('train.steps=40'), batch sizes rounded up to a multiple of the device count."""
  file, _, args = config.partition(":")
  if not (CONFIGS / file).exists():
    raise FileNotFoundError(f"{file} is not in {CONFIGS}: the zoo's configs/ come with the repository, "
                            "not the package; set MMJAX_SOURCE to a git URL or a checkout folder")
  spec = f"{CONFIGS / file}:{args}"
  config = load_config(spec, overrides)
  fit = [f"data.{k}={-(-int(config.data[k]) // DEVICES) * DEVICES}"  # the batch splits over every device
         for k in ("batch_size", "eval_batch_size") if k in config.data]
  return load_config(spec, [*overrides, *fit])


def show(path):
  """Shows the PNG at `path` (a local file or in a bucket) inline; returns its path."""
  display(Image(data=epath.Path(path).read_bytes()))
  return path


# %%
from mmjax.train import trainer

config = load(f"configs/caption_shapes.py:size={SIZE},model=transformer")
metrics = trainer.train(config, str(WORKDIR), progress=SIZE != "tiny")
rows = [f"| {k} | {v:.3f} |" for k, v in sorted(metrics.items()) if k.startswith("test/")]
display(Markdown("| metric | value |\n|---|---|\n" + "\n".join(rows)))
curves = show(viz.training_curves(str(WORKDIR)))

# %% [markdown]
# ## Beam-search samples

# %%
from mmjax.predict import Predictor

predictor = Predictor.from_workdir(str(WORKDIR))
source = predictor.task.source("test")
records = [source[i] for i in range(8)]
images = [np.asarray(r["image"]) for r in records]


def text(caption) -> str:
  return caption.decode() if isinstance(caption, bytes) else str(caption)


greedy = predictor.caption_batch(images, method="greedy")
outs = predictor.caption_batch(images, method="beam")  # config.eval.beam_size beams
samples = WORKDIR / "caption_samples.png"
viz.caption_samples_figure(images, [f"greedy: {g['caption']} / beam: {o['caption']} / ref: {text(r['captions'][0])}"
                                    for g, o, r in zip(greedy, outs, records)], cols=4, path=samples)
show(samples)
summary = {"backend": BACKEND, "devices": DEVICES, "size": SIZE, "step": predictor.step,
           **{k: v for k, v in metrics.items() if k.startswith("test/")},
           "captions": [o["caption"] for o in outs], "greedy": [g["caption"] for g in greedy],
           "figures": [str(curves), str(samples)]}
with (WORKDIR / "summary.json").open("w") as f:  # read by tests/test_notebooks.py
  json.dump(summary, f, indent=2)
