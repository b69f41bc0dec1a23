"""The parameter counts stated in docs/model_zoo.md, README.md, the Sort-of-CLEVR project's README,
docs/ and bench/README.md's throughput tables equal those the code builds.

docs/model_zoo.py counts every config variant and backbone by abstract initialisation
(`nnx.eval_shape`); the models read the tiny configs' data sets (their tokenizers have the full
ones' vocabularies), generated in the folder tests/test_tasks.py uses.
"""

import importlib.util
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
  spec.loader.exec_module(module)
  return module


model_zoo = _load("model_zoo", ROOT / "docs" / "model_zoo.py")


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
  return model_zoo.counts(data_dir=str(tmp_path_factory.getbasetemp() / "task_data"), data_size="tiny")


def test_model_zoo_md_is_the_generated_block(counts):
  zoo = (ROOT / "docs" / "model_zoo.md").read_text(encoding="utf-8")
  assert model_zoo.committed_block(zoo) == model_zoo.block(counts)
  # Every count of the page is in the block.
  assert re.findall(model_zoo.NUMBER, zoo.split(model_zoo.BEGIN)[0] + zoo.split(model_zoo.END)[-1]) == []


def test_readme_counts_are_generated(counts):
  stated = {}
  for name in model_zoo.stating_files():
    text = (ROOT / name).read_text(encoding="utf-8")
    for fragment in model_zoo.fragments(counts).get(name, []):
      assert fragment in text, (name, fragment)
    stated[name] = model_zoo.stated_counts(text)
    assert set(stated[name]) <= {f"{n:,}" for n in counts.values()}, (name, stated[name])
  assert len(stated["README.md"]) >= 5  # the default VQA model and the four backbones
  assert len(stated[model_zoo.PROJECT_README]) >= 1  # the default VQA model


def test_check_names_each_disagreement(counts):
  assert model_zoo.check(counts) == []
  bert = counts["bert_base"]
  problems = model_zoo.check(dict(counts, bert_base=bert + 1))
  assert len(problems) == 3, problems
  assert problems[0].startswith("docs/model_zoo.md: the generated block differs")
  assert problems[1].startswith(f"README.md lacks 'ViT-B/16 + head {counts['vit_b16']:,};")
  assert problems[2] == f"README.md states {bert:,} parameters, which is no generated count"
  vqa = counts["default_vqa"]  # also the project config's row, so only the phrases differ
  problems = model_zoo.check(dict(counts, default_vqa=vqa + 1))
  assert problems == [f"{name} lacks 'The default VQA model ({vqa + 1:,} parameters)'"
                      for name in ("README.md", model_zoo.PROJECT_README)], problems


def test_bench_throughput_counts_are_the_benchmarked_models():
  """The "mmjax params" columns of bench/README.md's throughput tables: each model of
  bench/throughput.py at its full size (the LXMERT row once stated a working tree's count)."""
  throughput = _load("bench_throughput_counts", ROOT / "bench" / "throughput.py")
  stated = {}  # model -> the counts its rows state
  column = None
  for line in (ROOT / "bench" / "README.md").read_text(encoding="utf-8").splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if not line.startswith("|"):
      column = None
    elif "mmjax params" in cells or "params mmjax" in cells:
      column = cells.index("mmjax params" if "mmjax params" in cells else "params mmjax")
    elif column is not None and cells[0] in throughput.MODELS:
      stated.setdefault(cells[0], []).append(cells[column])
  assert sorted(stated) == sorted(throughput.MODELS) and all(len(v) == 2 for v in stated.values()), stated
  for name, counts in stated.items():
    case = throughput.CASES[name](throughput.SIZES[name]["full"], None)
    assert counts == [f"{model_zoo.count_params(case.mmjax_model):,}"] * 2, name
