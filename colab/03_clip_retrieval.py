# %% [markdown]
# # CLIP on shapes_captions: contrastive image-text training and retrieval
#
# An image tower (small CNN) and a caption tower (GRU) trained with the CLIP loss (`loss=siglip`
# for SigLIP); evaluation reports recall@1/5 both ways. Then we embed the test split and retrieve
# images for captions, and captions for images.
#
# **Run it**: Runtime → Change runtime type → TPU (or GPU); fill in the form of the first code
# cell (where mmjax comes from, where runs are written, the config size); Runtime → Run all. The
# outputs saved here come from a headless `tiny` run on a CPU (`python colab/execute.py`).

# %%
# @title Set up: where mmjax comes from, where runs are written, the config size
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
# folder on Google Drive (/content/drive/MyDrive/..., mounted below) or a bucket (gs://bucket/folder).
WORKDIR_ROOT = "workdirs/notebooks"  # @param {type:"string"}
# The config size. auto: "default" on a TPU or GPU, "small" on a CPU; tiny: a smoke run of a minute.
SIZE = "auto"  # @param ["auto", "tiny", "small", "default"]
NOTEBOOK, EXTRAS, ACCELERATOR_SIZE = "03_clip_retrieval", "", "default"  # this notebook's

# Headless runs (tests/test_notebooks.py, colab/execute.py) fill the form from the environment.
MMJAX_SOURCE = os.environ.get("MMJAX_NOTEBOOK_SOURCE", MMJAX_SOURCE).strip()
WORKDIR_ROOT = os.environ.get("MMJAX_NOTEBOOK_WORKDIR", WORKDIR_ROOT).strip()
SIZE = os.environ.get("MMJAX_NOTEBOOK_SIZE", SIZE).strip()
ON_COLAB = "google.colab" in sys.modules
GIT_URL = r"(git\+)?(https?|ssh|git|file)://\S+|[\w.-]+@[\w.-]+:\S+"
REQUIREMENT = r"[A-Za-z0-9][\w.-]*(\[[\w,-]+\])?(\s*[<>=!~]=?\s*[\w.*+!-]+,?)*"
if not MMJAX_SOURCE:
  raise ValueError("MMJAX_SOURCE is empty: set it in the form above to where mmjax comes from: a git "
                   "URL of a repository you trust, a folder holding a checkout, a .whl file or a PyPI "
                   "name. There is no default: the code it names runs on this runtime.")
if ON_COLAB and MMJAX_SOURCE.startswith("/content/drive/"):
  from google.colab import drive

  drive.mount("/content/drive")


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
print(f"mmjax {importlib.metadata.version('mmjax')} from {MMJAX_SOURCE!r}")

# %%
# The runtime: its accelerator (on a TPU, jax[tpu] is installed first), the config size, the
# workdir; `load` reads a config of the zoo, `show` shows a figure.
from mmjax import notebook

runtime = notebook.start(NOTEBOOK, size=SIZE, workdir_root=WORKDIR_ROOT, accelerator_size=ACCELERATOR_SIZE, repo=REPO)
SIZE, WORKDIR, load, show = runtime.size, runtime.workdir, runtime.load, runtime.show

# What the cells below use (after `start`: mmjax.viz imports jax)
import json

import numpy as np
from IPython.display import Markdown, display

from mmjax import viz

# %%
from mmjax.train import trainer

config = load(f"configs/clip_shapes.py:size={SIZE},loss=clip")
metrics = trainer.train(config, str(WORKDIR), progress=SIZE != "tiny")
rows = [f"| {k} | {v:.3f} |" for k, v in sorted(metrics.items()) if k.startswith("test/")]
display(Markdown("| metric | value |\n|---|---|\n" + "\n".join(rows)))
curves = show(viz.training_curves(str(WORKDIR)))

# %% [markdown]
# ## Embed the test split

# %%
from mmjax.predict import Predictor


def embed(model, images, ids, mask):
  return model.embed("image", images)[0], model.embed("text", (ids, mask))[0]  # (B, E) each


def text(caption) -> str:
  return caption.decode() if isinstance(caption, bytes) else str(caption)


predictor = Predictor.from_workdir(str(WORKDIR))
image_emb, text_emb = [], []
for batch in predictor.task.dataset("test", train=False, batch_size=predictor.batch_size,
                                    shard_index=0, shard_count=1):
  keep = batch["valid"]
  zi, zt = predictor.run("embed", embed, batch["image"], batch["caption_ids"][:, 0], batch["caption_mask"][:, 0])
  image_emb.append(zi[keep])
  text_emb.append(zt[keep])
image_emb, text_emb = np.concatenate(image_emb), np.concatenate(text_emb)  # (N, E): the first caption of each image
source = predictor.task.source("test")
images = [np.asarray(source[i]["image"]) for i in range(len(image_emb))]
captions = [text(source[i]["captions"][0]) for i in range(len(image_emb))]
similarity = text_emb @ image_emb.T  # (N captions, N images)
top1 = float((similarity.argmax(1) == np.arange(len(captions))).mean())
print(f"{len(captions)} test pairs; text->image recall@1 over first captions: {top1:.3f} "
      f"(chance {1 / len(captions):.3f})")

# %% [markdown]
# ## Retrieval examples
#
# For each query caption, the three most similar test images.

# %%
queries = range(min(3, len(captions)))
panels, labels = [], []
for q in queries:
  for rank, i in enumerate(np.argsort(-similarity[q])[:3]):
    panels.append(images[i])
    labels.append((f"query: {captions[q]} -> " if rank == 0 else "") + f"#{rank + 1} ({similarity[q, i]:.2f})"
                  + (" [its image]" if i == q else ""))
retrieval = WORKDIR / "retrieval.png"
viz.caption_samples_figure(panels, labels, cols=3, path=retrieval)
show(retrieval)
summary = {"backend": runtime.backend, "devices": runtime.devices, "size": SIZE, "step": predictor.step,
           **{k: v for k, v in metrics.items() if k.startswith("test/")},
           "pairs": len(captions), "text_to_image_r1_first_caption": top1,
           "figures": [str(curves), str(retrieval)]}
with (WORKDIR / "summary.json").open("w") as f:  # read by tests/test_notebooks.py
  json.dump(summary, f, indent=2)
