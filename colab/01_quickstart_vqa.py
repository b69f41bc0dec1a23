# %% [markdown]
# # mmjax quick start: visual question answering on Sort-of-CLEVR
#
# Train an LXMERT-style cross-attention VQA model on the embedded Sort-of-CLEVR data set
# (generated on the fly, offline), evaluate it, ask it your own question about a freshly
# generated image, and see where it looked.
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
NOTEBOOK, EXTRAS, ACCELERATOR_SIZE = "01_quickstart_vqa", "", "default"  # this notebook's

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

# %% [markdown]
# ## Config
#
# The same file and arguments as the command line: `python train.py --config
# mmjax/projects/sort_of_clevr/configs/vqa.py:size=small,fusion=cross_attention --workdir ...`.

# %%
# tiny: a smoke run that evaluates (on the test split) and checkpoints once, at the end; 40 steps
# reach the answer prior (below), 20 do not always
TINY = ["train.steps=40", "train.eval_every=40", "train.checkpoint_every=40", "data.eval_splits=('test',)"]
config = load(f"mmjax/projects/sort_of_clevr/configs/vqa.py:size={SIZE},fusion=cross_attention",
              *(TINY if SIZE == "tiny" else []))
print(f"{config.train.steps} steps of {config.data.batch_size} images x 20 questions; "
      f"fusion {config.model.fusion}")

# %% [markdown]
# ## Train and evaluate
#
# The trainer resumes from the workdir's latest checkpoint when run again. Beside each accuracy,
# the answer prior's: every question answered with the most frequent training answer of its
# subtype (shape, left, top, closest, furthest, count). A model that ignores the image reaches
# the prior and no more; a model leaves it once it finds the object a question names, and short
# runs such as `tiny` sit at it.

# %%
from mmjax.train import trainer
from mmjax.train.tasks import TASKS

metrics = trainer.train(config, str(WORKDIR), progress=SIZE != "tiny")
task = TASKS.get(config.task)(config)
prior = {split: task.prior_baseline(split) for split in config.data.eval_splits}
rows = []
for k, v in sorted(metrics.items()):
  split, name = k.split("/", 1) if "/" in k else ("", k)
  if split in prior and name.startswith("accuracy"):
    rows.append(f"| {k} | {v:.3f} | {prior[split][name]:.3f} |")
display(Markdown("| metric | model | answer prior |\n|---|---:|---:|\n" + "\n".join(rows)))
curves = show(viz.training_curves(str(WORKDIR)))

# %% [markdown]
# ## Ask your own question
#
# A new scene from the same generator as the data set; change `COLOR` or the question.

# %%
from mmjax.data import scenes
from mmjax.predict import Predictor

predictor = Predictor.from_workdir(str(WORKDIR))
scene = scenes.sample_scene(np.random.default_rng(2026))
image = scenes.render(scene)  # (75, 75, 3) uint8
COLOR = "red"
question = f"What shape is the {COLOR} object?"
out = predictor.answer(image, question)
truth = scenes.SHAPES[scene.shapes[scenes.COLORS.index(COLOR)]]
print(f"Q: {question}\nA: {out['answer']} (truth: {truth})")
print({k: round(p, 3) for k, p in list(out["probabilities"].items())[:4]})

# %% [markdown]
# ## Where did the model look?
#
# The question's cross-attention over the image grid in the last layer, averaged over heads; then
# one panel per head for each layer. Heads specialise: in a trained model one head of the first
# layer usually finds the object the question's colour names, and in the second layer (whose heads
# are biased towards cells near or far from where they looked in the first) the object a relational
# question asks about.

# %%
attention = WORKDIR / "attention.png"
viz.vqa_attention_figure(predictor, image, question, path=attention)
show(attention)
heads = []
for layer in range(len(predictor.model.fusion.layers)):
  heads.append(WORKDIR / f"attention_heads_layer{layer}.png")
  viz.vqa_attention_figure(predictor, image, question, head="all", layer=layer, size_px=160, path=heads[-1])
  show(heads[-1])
summary = {"backend": runtime.backend, "devices": runtime.devices, "size": SIZE, "step": predictor.step,
           "num_params": metrics["num_params"], "test/accuracy": metrics["test/accuracy"],
           "test/prior_accuracy": prior["test"]["accuracy"], "num_answers": len(predictor.answers),
           "question": question, "answer": out["answer"],
           "figures": [str(curves), str(attention), *map(str, heads)]}
with (WORKDIR / "summary.json").open("w") as f:  # read by tests/test_notebooks.py
  json.dump(summary, f, indent=2)
