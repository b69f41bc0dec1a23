"""The Colab notebooks' runtime: accelerator, JAX, config size, configs and workdir, in one call.

Each notebook (colab/NN_name.py) installs mmjax in its first cell and calls `start` in its second.
On a TPU, `start` installs `jax[tpu]` (libtpu) pinned to the installed jax before this kernel's
first import of jax, so this module imports jax inside `start` only.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import os
import subprocess
import sys

from etils import epath

from mmjax.train.config import load_config  # imports no jax

SIZES = ("auto", "tiny", "small", "default")
# PCI device ids of Google TPU chips (vendor 0x1ae0), as JAX's own detection looks for them
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def pip(*args: str) -> None:
  """`pip install args` in this kernel's interpreter; stops with pip's last lines where it fails."""
  out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"pip install {' '.join(args)} failed:\n{(out.stdout + out.stderr)[-3000:]}")


def tpu_on_pci() -> bool:
  """A Google TPU chip among the PCI devices."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    device = os.path.join(os.path.dirname(vendor), "device")
    if open(vendor).read().strip() == "0x1ae0" and open(device).read().strip() in TPU_PCI_DEVICES:
      return True
  return False


def accelerator() -> str:
  """The runtime's accelerator, "tpu", "gpu" or "cpu", from the machine (not from JAX, which falls
  back to the CPU quietly); "cpu" where JAX_PLATFORMS=cpu asks for it."""
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    return "cpu"
  if glob.glob("/dev/accel*") or tpu_on_pci():
    return "tpu"
  return "gpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu"


def mount(workdir_root: str) -> None:
  """On Colab, mounts Google Drive for a workdir on it, or signs in for one in a bucket."""
  if "google.colab" not in sys.modules:
    return
  if workdir_root.startswith("/content/drive/") and not os.path.ismount("/content/drive"):
    from google.colab import drive

    drive.mount("/content/drive")
  elif workdir_root.startswith("gs://"):
    from google.colab import auth

    auth.authenticate_user()  # the bucket is read and written as your Google account


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What a notebook runs on and where it writes; `load` reads a config, `show` shows a figure."""

  accelerator: str  # the machine's: tpu, gpu or cpu
  backend: str  # JAX's default backend
  devices: int  # JAX's device count
  size: str  # the config size: tiny, small or default
  configs: epath.Path  # the folder the configs' paths are relative to
  workdir: epath.Path

  def load(self, config: str, *overrides: str):
    """The config 'file.py:args' (file relative to the checkout) with command-line overrides
    ('train.steps=40'), batch sizes rounded up to a multiple of the device count."""
    file, _, args = config.partition(":")
    if not (self.configs / file).exists():
      raise FileNotFoundError(f"{file} is not in {self.configs}: the zoo's configs/ come with the repository, "
                              "not the package; set MMJAX_SOURCE to a git URL or a checkout folder")
    spec = f"{self.configs / file}:{args}"
    config = load_config(spec, overrides)
    fit = [f"data.{k}={-(-int(config.data[k]) // self.devices) * self.devices}"  # the batch splits over every device
           for k in ("batch_size", "eval_batch_size") if k in config.data]
    return load_config(spec, [*overrides, *fit])

  def show(self, path):
    """Shows the PNG at `path` (a local file or in a bucket) inline; returns its path."""
    from IPython.display import Image, display

    display(Image(data=epath.Path(path).read_bytes()))
    return path


def start(notebook: str, size: str = "auto", workdir_root: str = "workdirs/notebooks",
          accelerator_size: str = "default", repo: str | None = None) -> Runtime:
  """Readies this kernel for the notebook `notebook`: jax[tpu] on a TPU, JAX checked to see the
  runtime's accelerator (a clear stop otherwise, rather than training on the CPU), `size` "auto"
  resolved (`accelerator_size` on a TPU or GPU, "small" on a CPU), the configs of the checkout
  `repo` (else of the installed package) and the workdir `workdir_root`/`notebook` (a local or Drive
  folder, or gs://bucket/folder)."""
  if size not in SIZES:
    raise ValueError(f"SIZE={size!r}: expected auto, tiny, small or default")
  machine = accelerator()
  if machine == "tpu":
    pip(f"jax[tpu]=={importlib.metadata.version('jax')}")  # libtpu for the installed jax

  import jax  # after the install: this kernel's first import of it

  if jax.__version__ != importlib.metadata.version("jax"):
    raise RuntimeError(f"this session imported jax {jax.__version__} before the install replaced it with "
                       f"{importlib.metadata.version('jax')}: Runtime -> Restart session, then run all again")
  backend, devices = jax.default_backend(), jax.device_count()
  hint = {"tpu": "a jax whose libtpu supports this TPU", "gpu": f"jax[cuda12]=={jax.__version__}"}
  if machine != "cpu" and backend != machine:
    raise RuntimeError(f"This runtime has a {machine.upper()}, but JAX {jax.__version__} sees none "
                       f"(backend {backend!r}): the notebook stops rather than train on the CPU. Restart the "
                       f"session and run all again; where JAX still sees none, install {hint[machine]} "
                       "before running this cell.")
  if size == "auto":
    size = accelerator_size if backend in ("tpu", "gpu") else "small"
  print(f"JAX {jax.__version__}, {devices} {jax.devices()[0].device_kind} device(s); size {size!r}")
  if backend == "cpu":
    print(f"No TPU or GPU on this runtime: the notebook runs the CPU-sized config ({size}).")
  mount(workdir_root)
  # the configs: the checkout's, else the installed package's own (a wheel holds no configs/ folder)
  configs = epath.Path(repo) if repo else epath.Path(__file__).parent.parent
  workdir = epath.Path(workdir_root) / notebook
  workdir.mkdir(parents=True, exist_ok=True)
  print(f"workdir {workdir}")
  return Runtime(machine, backend, devices, size, configs, workdir)
