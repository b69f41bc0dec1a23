"""The code of README.md and of docs/fusion.md's worked example runs as written: each file's
```python blocks, in order, in a fresh process."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(path: str) -> list[str]:
  with open(path) as f:
    return re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.S | re.M)


def run_blocks(blocks: list[str]) -> list[str]:
  """Runs the blocks as one script in a fresh process; returns its stdout split on whitespace."""
  # A fresh process: registering "hadamard" must not leak into this process's FUSIONS registry,
  # which other tests iterate over.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
         "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"}
  out = subprocess.run([sys.executable, "-c", "\n\n".join(blocks)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout.split()


def test_readme_example_runs():
  blocks = python_blocks(os.path.join(ROOT, "README.md"))
  assert len(blocks) == 1  # encoders + fusion by name + head, with an absent image
  assert run_blocks(blocks) == ["(2,", "10)", "absent", "image", "changes", "nothing"]


def test_fusion_doc_example_runs():
  blocks = python_blocks(os.path.join(ROOT, "docs", "fusion.md"))
  assert len(blocks) == 4  # the block, using it, the missing-modality check, a model with it
  assert run_blocks(blocks) == ["(4,", "32)", "absent", "text", "changes", "nothing", "(2,", "10)"]
