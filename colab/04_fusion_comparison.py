# %% [markdown]
# # Every fusion block on one task: accuracy, and answers with a modality missing
#
# Trains the Sort-of-CLEVR VQA model once per fusion block (only `fusion=` changes), then measures
# test accuracy with both modalities, without the image and without the question. On an
# accelerator this notebook uses the `small` configs (one training per block); choose `default` in
# the form for the full ones.
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
NOTEBOOK, EXTRAS, ACCELERATOR_SIZE = "04_fusion_comparison", "", "small"  # this notebook's

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
from mmjax.fusion import FUSIONS
from mmjax.predict import Predictor
from mmjax.train import trainer

# Fusion blocks to train, comma-separated (empty: every registered block).
FUSION_LIST = ""  # @param {type:"string"}
FUSION_LIST = os.environ.get("MMJAX_NOTEBOOK_FUSIONS", FUSION_LIST) or ",".join(FUSIONS.names())
FUSION_NAMES = [f.strip() for f in FUSION_LIST.split(",") if f.strip()]
CONDITIONS = {"both": (True, True), "no image": (False, True), "no question": (True, False)}
print(FUSION_NAMES)


# %% [markdown]
# ## Missing-modality evaluation
#
# `presence` switches a modality off for every example; the model never sees its tokens (an absent
# modality changes no output bit, `tests/test_fusion.py`).

# %%
def predict_answers(model, images, ids, mask, image_present, text_present):
  logits, _ = model(images, ids, mask, presence={"image": image_present, "text": text_present})
  return logits.argmax(-1)  # (B, Q)


def accuracy_under(predictor, image_present, text_present):
  """Test-split accuracy with the image and/or the question switched off."""
  correct = count = 0
  data = predictor.task.dataset("test", train=False, batch_size=predictor.batch_size,
                                shard_index=0, shard_count=1)
  for batch in data:
    n = len(batch["image"])
    answers = predictor.run("presence", predict_answers, batch["image"], batch["question_ids"],
                            batch["question_mask"], np.full(n, image_present), np.full(n, text_present))
    valid = np.asarray(batch.get("valid", np.ones(n, bool)))  # (B,): False on padding
    correct += int((answers == batch["answer"])[valid].sum())
    count += batch["answer"][valid].size
  return correct / count


# %% [markdown]
# ## Train and evaluate every block

# %%
# tiny: no evaluation during training (the test accuracy is measured below), one checkpoint at the
# end; 40 steps reach the answer prior (below), 20 do not always
TINY = ["data.eval_splits=()", "train.steps=40", "train.eval_every=40", "train.checkpoint_every=40"]
results = {}
for fusion in FUSION_NAMES:
  config = load(f"mmjax/projects/sort_of_clevr/configs/vqa.py:size={SIZE},fusion={fusion}",
                "data.eval_splits=('test',)", *(TINY if SIZE == "tiny" else []))
  metrics = trainer.train(config, str(WORKDIR / fusion), progress=SIZE != "tiny")
  predictor = Predictor.from_workdir(str(WORKDIR / fusion), batch_size=int(config.data.eval_batch_size))
  results[fusion] = {"params": metrics["num_params"],
                     **{c: accuracy_under(predictor, *p) for c, p in CONDITIONS.items()}}
  print(fusion, results[fusion])

# %% [markdown]
# ## Table and chart
#
# The answer prior answers every question with the most frequent training answer of its subtype: a
# model that ignores the image reaches it and no more.

# %%
PRIOR = predictor.task.prior_baseline("test")["accuracy"]
header = "| fusion | parameters | " + " | ".join(CONDITIONS) + " |\n|---|---:|" + "---:|" * len(CONDITIONS)
rows = [f"| {f} | {r['params']:,} | " + " | ".join(f"{r[c]:.3f}" for c in CONDITIONS) + " |"
        for f, r in results.items()]
display(Markdown(header + "\n" + "\n".join(rows) + f"\n\nAnswer prior (test): {PRIOR:.3f}"))
chart = WORKDIR / "fusion_comparison.png"
viz.grouped_bars_figure({f: {c: r[c] for c in CONDITIONS} for f, r in results.items()},
                        ylabel="test accuracy", title=f"Sort-of-CLEVR VQA ({SIZE})", path=chart)
show(chart)
summary = {"backend": runtime.backend, "devices": runtime.devices, "size": SIZE, "results": results,
           "prior_accuracy": PRIOR, "num_answers": len(predictor.answers), "figures": [str(chart)]}
with (WORKDIR / "summary.json").open("w") as f:  # read by tests/test_notebooks.py
  json.dump(summary, f, indent=2)
