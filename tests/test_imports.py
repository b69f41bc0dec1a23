"""Import hygiene: every mmjax module imports alone and in any order, and registries fill themselves.

The rest of the suite imports nearly everything, so an import circle that only resolves in one
order, or a registry entry that only exists after someone imported its module for the side
effect, passes there. Here:
- each module is imported alone in a fresh process: a child forked from a "zygote" process that
  has loaded the heavy third-party packages (jax, flax, TFDS, ...) but no mmjax module. mmjax's
  own import order starts from nothing in every child, as in a fresh interpreter, at a fraction of
  the cost (~0.3 s a module instead of ~3 s of JAX start-up);
- all modules are imported in alphabetical order and in reverse, each in a real fresh interpreter;
- the import graph read from the source, function-local imports included (which run later and
  so hide a circle from every import test), has no cycle;
- each registry, imported alone, knows every built-in entry (its `modules=` list), and
  "package.module:key" names resolve a module outside the library.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import pkgutil
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
PARALLEL = min(os.cpu_count() or 1, 8)


def module_files(path: pathlib.Path = ROOT / "mmjax", prefix: str = "mmjax") -> dict[str, pathlib.Path]:
  """{module: file} of the package at `path` (packages included), found by pkgutil without importing."""
  files = {prefix: path / "__init__.py"}
  for info in pkgutil.iter_modules([str(path)]):
    name = f"{prefix}.{info.name}"
    files.update(module_files(path / info.name, name) if info.ispkg else {name: path / f"{info.name}.py"})
  return files


FILES = module_files()
MODULES = sorted(FILES)

# Registry -> (the module defining it, one built-in key).
REGISTRIES = {
    "ENCODERS": ("mmjax.encoders.base", "vit"),
    "FUSIONS": ("mmjax.fusion.base", "gated"),
    "MODELS": ("mmjax.models.base", "dual_encoder"),
    "PP_OPS": ("mmjax.data.pp.registry", "audio.log_mel"),
    "TASKS": ("mmjax.train.tasks", "caption_shapes"),
}

# Modules whose entries configs name as "package.module:key", not built into a registry's
# `modules=`: the projects and the shape-only planning tasks.
BY_MODULE_NAME = ("mmjax.projects.", "mmjax.train.plan_tasks")

# {registry: {key: module of the registered object}} of the registries whose modules are loaded.
ENTRIES = textwrap.dedent(f"""
    def entries():
      out = {{}}
      for reg_name, (module, _) in {REGISTRIES!r}.items():
        if module in sys.modules:
          reg = getattr(sys.modules[module], reg_name)
          out[reg_name] = {{key: getattr(reg.get(key), "__module__", "?") for key in reg.names()}}
      return out
""")

# Imports the modules named in argv[1] (JSON) in that order, then prints `entries()`.
ORDER_RUN = "import importlib, json, sys\n" + ENTRIES + textwrap.dedent("""
    for name in json.loads(sys.argv[1]):
      importlib.import_module(name)
    print(json.dumps(entries()))
""")

# Third-party packages the zygote loads: a speed-up only, a child imports whatever else it needs.
PRELOAD = ("numpy", "scipy.ndimage", "scipy.signal", "scipy.stats", "jax", "flax.nnx", "optax",
           "orbax.checkpoint", "grain", "tensorflow_datasets", "ml_collections", "PIL.Image", "soundfile",
           "safetensors.numpy", "tokenizers", "matplotlib.figure")

# Reads one JSON {label: code} per stdin line; runs each code in a forked child (PARALLEL at a
# time, results through files in argv[1]) and answers one JSON line {label: {"ok", "value" (the
# code's `result`, or the traceback), "seconds"}}. JAX starts no thread on import, so forking after
# it is safe.
ZYGOTE = textwrap.dedent("""
    import importlib, itertools, json, os, sys, time, traceback
    for name in sys.argv[3:]:
      try:
        importlib.import_module(name)
      except ImportError:
        pass
    assert not [m for m in sys.modules if m.split(".")[0] == "mmjax"], "the zygote imported mmjax"
    tmp, parallel, counter = sys.argv[1], int(sys.argv[2]), itertools.count()

    def start(code, path):
      pid = os.fork()
      if pid:
        return pid
      os.dup2(2, 1)  # the child's prints must not reach the answer channel
      status = 0
      try:
        namespace = {"__name__": "__fresh__"}
        exec(code, namespace)
        value = namespace.get("result")
      except BaseException:
        value, status = traceback.format_exc(), 1
      with open(path, "w") as f:
        json.dump(value, f, default=str)
      os._exit(status)

    for line in sys.stdin:
      pending, running, results = list(json.loads(line).items()), {}, {}
      while pending or running:
        while pending and len(running) < parallel:
          label, code = pending.pop(0)
          path = os.path.join(tmp, f"{next(counter)}.json")
          running[start(code, path)] = (label, path, time.perf_counter())
        pid, status = os.wait()
        label, path, t0 = running.pop(pid)
        try:
          with open(path) as f:
            value = json.load(f)
        except (OSError, ValueError):
          value = f"the child died (wait status {status}) before writing its result"
        results[label] = {"ok": status == 0, "value": value, "seconds": time.perf_counter() - t0}
      print(json.dumps(results), flush=True)
""")


@pytest.fixture(scope="module")
def orders():
  """The two whole-package import runs, started first so that they overlap the zygote's work."""
  runs = {name: subprocess.Popen([sys.executable, "-c", ORDER_RUN, json.dumps(order)], cwd=ROOT, env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for name, order in (("alphabetical", MODULES), ("reverse", MODULES[::-1]))}
  yield runs
  for proc in runs.values():
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def finished_orders(orders):
  """{order: (returncode, stdout, stderr)} of the two whole-package runs."""
  return {name: (proc.wait(timeout=300), *proc.communicate()) for name, proc in orders.items()}


@pytest.fixture(scope="module")
def fresh(orders, tmp_path_factory):
  """`fresh({label: code})`: runs each code in its own fresh (forked) process; see ZYGOTE."""
  del orders  # requested so that they run meanwhile
  tmp = tmp_path_factory.mktemp("zygote")
  log = tmp / "stderr.txt"
  with open(log, "w") as err:
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(tmp), str(PARALLEL), *PRELOAD], cwd=ROOT,
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

  def run(jobs: dict[str, str]) -> dict[str, dict]:
    proc.stdin.write(json.dumps(jobs) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the zygote died:\n{log.read_text()[-5000:]}")
    return json.loads(line)

  yield run
  proc.stdin.close()
  proc.wait(timeout=60)


def check(results: dict[str, dict]) -> None:
  """Fails with the tracebacks of the failed jobs."""
  failed = "\n".join(f"--- {label}:\n{r['value']}" for label, r in results.items() if not r["ok"])
  if failed:
    pytest.fail(failed, pytrace=False)


def all_entries(finished_orders) -> dict[str, dict[str, str]]:
  """`entries()` once every module is imported (the alphabetical run)."""
  returncode, stdout, stderr = finished_orders["alphabetical"]
  assert returncode == 0, stderr[-5000:]
  return json.loads(stdout.splitlines()[-1])


def imported_modules(name: str, path: pathlib.Path | None = None) -> set[str]:
  """The mmjax modules that module `name`'s source imports, at top level or inside functions.

  `from package import name` counts `package.name` when that is a module, else `package`. The
  module's own parent packages, which Python imports first, are not counted: a package's
  `__init__` may import its submodules.
  """
  path = path or FILES[name]
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  targets = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
      targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in FILES else base for alias in node.names]
  out = set()
  for target in targets:
    while target and target not in FILES:  # a name inside a module, or not mmjax
      target = target.rpartition(".")[0]
    if target and target != name:
      out.add(target)
  return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
  state, path = {}, []

  def visit(node):
    state[node] = "open"
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_cycle_check_sees_function_local_imports_and_cycles(tmp_path):
  source = tmp_path / "text.py"
  source.write_text(textwrap.dedent("""
      import jax
      from mmjax.encoders.base import ENCODERS
      from mmjax.fusion import build_fusion

      def load():
        from mmjax.transfer import minilm
        import mmjax.layers.common
  """))
  assert imported_modules("mmjax.encoders.text", source) == {
      "mmjax.encoders.base", "mmjax.fusion", "mmjax.transfer.minilm", "mmjax.layers.common"}
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_cycle_even_through_function_local_imports():
  cycle = find_cycle({name: imported_modules(name) for name in MODULES})
  assert cycle is None, " -> ".join(cycle)


def test_every_module_imports_alone_in_a_fresh_process(fresh):
  t0 = time.perf_counter()
  results = fresh({name: f"import {name}" for name in MODULES})
  slowest = sorted(results, key=lambda n: -results[n]["seconds"])[:5]
  print(f"{len(MODULES)} modules in {time.perf_counter() - t0:.1f} s ({PARALLEL} at a time); slowest: "
        + ", ".join(f"{n} {results[n]['seconds']:.1f} s" for n in slowest))
  check(results)


@pytest.mark.parametrize("order", ["alphabetical", "reverse"])
def test_all_modules_import_in_one_interpreter_in_order(finished_orders, order):
  returncode, _, stderr = finished_orders[order]
  assert returncode == 0, stderr[-5000:]


def test_each_registry_alone_knows_every_builtin_entry(fresh, finished_orders):
  """A registry imported alone (nothing else first) holds every entry the library registers,
  except those named by module (BY_MODULE_NAME)."""
  results = fresh({name: f"import sys\nfrom {module} import {name}\n{name}.get({key!r})\n{ENTRIES}"
                         f"result = entries()[{name!r}]\n" for name, (module, key) in REGISTRIES.items()})
  check(results)
  everything = all_entries(finished_orders)
  assert sorted(everything) == sorted(REGISTRIES)
  for name in REGISTRIES:
    builtin = {k: m for k, m in everything[name].items() if not m.startswith(BY_MODULE_NAME)}
    assert results[name]["value"] == builtin, name


def test_module_key_names_resolve_outside_the_builtins(fresh, finished_orders, tmp_path):
  """"package.module:key" imports a user's package, and each BY_MODULE_NAME module, on lookup."""
  (tmp_path / "user_ext").mkdir()
  (tmp_path / "user_ext" / "__init__.py").write_text("")
  (tmp_path / "user_ext" / "fusion.py").write_text(textwrap.dedent("""
      from mmjax.fusion.base import FUSIONS
      from mmjax.fusion.gated import GatedFusion

      @FUSIONS.register("user_gated")
      class UserGated(GatedFusion):
        pass
  """))
  jobs = {"user": textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(tmp_path)!r})
      from mmjax.fusion.base import FUSIONS
      before = "user_gated" in FUSIONS
      cls = FUSIONS.get("user_ext.fusion:user_gated")
      try:
        FUSIONS.get("user_ext.missing:user_gated")
        missing = "no error"
      except KeyError as e:
        missing = str(e)
      result = [before, cls.__module__, cls.__name__, FUSIONS.get("user_gated") is cls,
                FUSIONS.get("mmjax.fusion.gated:gated") is FUSIONS.get("gated"), missing]
  """)}
  by_module = {(name, module, key) for name, entries in all_entries(finished_orders).items()
               for key, module in entries.items() if module.startswith(BY_MODULE_NAME)}
  assert by_module  # the planning tasks at least
  for name, module, key in by_module:
    jobs[f"{name} {module}:{key}"] = (f"from {REGISTRIES[name][0]} import {name}\n"
                                      f"result = {name}.get({f'{module}:{key}'!r}).__module__")
  results = fresh(jobs)
  check(results)
  before, module, cls_name, same, builtin_same, missing = results["user"]["value"]
  assert (before, module, cls_name, same, builtin_same) == (False, "user_ext.fusion", "UserGated", True, True)
  assert "cannot import module 'user_ext.missing'" in missing, missing
  for name, module, key in by_module:
    assert results[f"{name} {module}:{key}"]["value"] == module
