"""Writes colab/NN_name.ipynb from its source colab/NN_name.py, executed headless on the CPU.

  python colab/execute.py                         # every notebook, size tiny
  python colab/execute.py 02_captioning --size small

Each notebook runs in a fresh python3 kernel of this interpreter, in the checkout, with the form's
fields set through the environment: mmjax from this checkout (MMJAX_NOTEBOOK_SOURCE=.), the
workdir workdirs/colab/<notebook> (emptied first: the trainer would resume from it), the size
given. Its outputs are saved into the .ipynb (so the notebook reads on GitHub) without stderr
(warnings, local paths). Run it after editing a source; `jupytext --sync colab/NN_name.py`
updates the inputs only and keeps the outputs.
"""

from __future__ import annotations

import argparse
import base64
import glob
import io
import os
import shutil
import sys

import jupytext
import nbclient
import nbformat
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKDIR_ROOT = "workdirs/colab"  # relative: the saved outputs show no local path
MAX_BYTES = 300_000  # a notebook with its outputs, to keep the repository small


def sources() -> list[str]:
  """The notebooks' names (colab/NN_name.py), in order."""
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "[0-9][0-9]_*.py")))


def notebook(name: str) -> nbformat.NotebookNode:
  """colab/<name>.py as a Colab notebook without outputs, with stable cell ids."""
  nb = jupytext.read(os.path.join(HERE, f"{name}.py"))
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "accelerator": "TPU",
      "colab": {"provenance": [], "name": f"{name}.ipynb"},
  }
  for i, cell in enumerate(nb.cells):
    cell.id = f"{name[:2]}-{i:02d}"  # stable: rewriting a notebook changes no id
    cell.metadata = {}
  return nb


def small_png(data: str) -> str:
  """A base64 PNG re-encoded with a 256-colour palette: a third of the bytes, the same figure to the eye."""
  image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").quantize(256)
  out = io.BytesIO()
  image.save(out, "png", optimize=True)
  return base64.b64encode(out.getvalue()).decode()


def execute(name: str, size: str, timeout: int) -> nbformat.NotebookNode:
  """Runs `name` headless on the CPU; returns it with its outputs: stderr left out, PNGs made smaller."""
  nb = notebook(name)
  shutil.rmtree(os.path.join(ROOT, WORKDIR_ROOT, name), ignore_errors=True)
  env = {"MMJAX_NOTEBOOK_SOURCE": ".", "MMJAX_NOTEBOOK_WORKDIR": WORKDIR_ROOT,
         "MMJAX_NOTEBOOK_SIZE": size, "JAX_PLATFORMS": "cpu"}
  os.environ.update(env)  # the kernel inherits this process's environment
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                          resources={"metadata": {"path": ROOT}}).execute()
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
      for output in cell.outputs:
        if "image/png" in output.get("data", {}):
          output.data["image/png"] = small_png(output.data["image/png"])
  return nb


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("names", nargs="*", help=f"notebooks (default: all of {', '.join(sources())})")
  parser.add_argument("--size", default="tiny", choices=("tiny", "small", "default"))
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.names) - set(sources()))
  if unknown:
    parser.error(f"no colab/<name>.py for {unknown}; known: {sources()}")
  status = 0
  for name in args.names or sources():
    nb = execute(name, args.size, args.timeout)
    path = os.path.join(HERE, f"{name}.ipynb")
    nbformat.write(nb, path)
    size = os.path.getsize(path)
    print(f"wrote {os.path.relpath(path, ROOT)} ({size / 1e3:.0f} KB)")
    if size > MAX_BYTES:
      print(f"  larger than {MAX_BYTES / 1e3:.0f} KB: make its figures or printed output smaller", file=sys.stderr)
      status = 1
  return status


if __name__ == "__main__":
  sys.exit(main())
