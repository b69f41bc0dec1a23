"""Your own data without writing a TFDS builder: a folder of class subfolders, or a manifest.

Two layouts become a random-access source for the Grain pipeline (`len(source)`,
`source[i]`), whose records go through the same pp ops as the TFDS data sets:

- a folder with one subfolder per class holding images (`root/cat/1.png`, `root/dog/x.jpg`):
  records `{"id", "image": bytes, "label": int}`, classes in sorted folder-name order;
- a JSONL or CSV manifest with the columns `image` (path), `text`, `audio` (path) and `label`,
  any non-empty subset of them, the same on every line: records hold the image and audio file
  bytes (decode them with `image.decode` / `audio.load`), the text, and the label as an int.

Every record has an `id` naming its manifest line (`captions.jsonl:12`) or file, so pp errors
point at it. Paths are relative to the data root (default: the manifest's folder) and may not
leave it: absolute paths, `..` components and symlinks that resolve outside the root are
refused. Every problem found (missing files, bad lines) is reported at once, with line numbers.
Labels are class ids (ints, or strings of digits) or class names, mapped to ids by `classes`
(default: the sorted names found).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Sequence

FIELDS = ("image", "text", "audio", "label")
PATH_FIELDS = ("image", "audio")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_MAX_REPORTED = 20


class ManifestError(ValueError):
  """Problems in a manifest or folder; the message lists them with their line numbers."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One record to read.

  Attributes:
    id: where it came from, "<manifest>:<line>" or the file's path under the root.
    paths: field -> absolute file path (image, audio).
    text: the text, if the manifest has it.
    label: the class id, if the manifest has labels.
  """

  id: str
  paths: dict[str, pathlib.Path]
  text: str | None = None
  label: int | None = None


def resolve_under(root: pathlib.Path, rel: str) -> pathlib.Path:
  """`root / rel` resolved, or a ValueError if `rel` is absolute, has `..`, or leaves `root`."""
  if not isinstance(rel, str) or not rel.strip():
    raise ValueError(f"path must be a non-empty string, got {rel!r}")
  if os.path.isabs(rel) or rel.startswith("~") or re.match(r"^[A-Za-z]:[\\/]", rel):
    raise ValueError(f"absolute path {rel!r} is not allowed; give it relative to the data root")
  if ".." in re.split(r"[\\/]", rel):
    raise ValueError(f"path {rel!r} has a '..' component; it may not leave the data root")
  path = (root / rel).resolve()
  if not path.is_relative_to(root.resolve()):
    raise ValueError(f"path {rel!r} resolves to {path}, outside the data root {root} (a symlink?)")
  return path


class ManifestSource:
  """Random-access source over files under a data root (Grain's `RandomAccessDataSource`).

  Attributes:
    root: the data root all paths are under.
    entries: the records, validated (every file exists under the root).
    classes: class names by id, when labels were names or came from folders; else None.
  """

  def __init__(self, root: pathlib.Path, entries: Sequence[Entry],
               classes: Sequence[str] | None = None):
    self.root = root
    self.entries = list(entries)
    self.classes = list(classes) if classes is not None else None

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> dict[str, Any]:
    e = self.entries[index]
    record: dict[str, Any] = {"id": e.id}
    for name, path in e.paths.items():
      record[name] = path.read_bytes()
    if e.text is not None:
      record["text"] = e.text
    if e.label is not None:
      record["label"] = e.label
    return record

  def __repr__(self) -> str:
    return f"ManifestSource(root={str(self.root)!r}, len={len(self)}, classes={self.classes})"


def _raise_if(problems: list[str], what: str) -> None:
  """Raises a ManifestError listing `problems` (the first few) if there are any."""
  if problems:
    more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
    raise ManifestError(f"{what}: {len(problems)} problem(s):\n  " +
                        "\n  ".join(problems[:_MAX_REPORTED]) + more)


def from_folder(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ManifestSource:
  """A source over `root/<class>/<image>`: classes are the sorted subfolder names.

  Files whose extension is not in `extensions` are ignored; a class folder with no images, and
  any file or folder that resolves outside `root`, is an error.
  """
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise ManifestError(f"data root {root} is not a folder")
  real_root = root.resolve()
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not classes:
    raise ManifestError(f"{root}: no class subfolders (expected root/<class>/<image files>)")
  exts = tuple(e.lower() for e in extensions)
  entries, problems = [], []
  for label, name in enumerate(classes):
    found = 0
    for path in sorted((root / name).rglob("*")):
      rel = path.relative_to(root).as_posix()
      if not path.resolve().is_relative_to(real_root):
        problems.append(f"{rel}: resolves to {path.resolve()}, outside the data root (a symlink?)")
        continue
      if path.is_file() and path.suffix.lower() in exts:
        entries.append(Entry(id=rel, paths={"image": path.resolve()}, label=label))
        found += 1
    if not found:
      problems.append(f"{name}/: no image files ({', '.join(exts)})")
  _raise_if(problems, str(root))
  return ManifestSource(root, entries, classes)


def _read_jsonl(path: pathlib.Path) -> tuple[list[tuple[int, dict]], list[str]]:
  """(line number, row) pairs of a JSONL file, and problems found."""
  rows, problems = [], []
  with path.open(encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append(f"line {number}: invalid JSON ({e.msg})")
        continue
      if not isinstance(row, dict):
        problems.append(f"line {number}: expected a JSON object, got {type(row).__name__}")
        continue
      rows.append((number, row))
  return rows, problems


def _read_csv(path: pathlib.Path) -> tuple[list[tuple[int, dict]], list[str]]:
  """(line number, row) pairs of a CSV file with a header line, and problems found."""
  rows, problems = [], []
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames:
      return [], ["line 1: no header line (expected columns among image, text, audio, label)"]
    for row in reader:
      if None in row or None in row.values():
        problems.append(f"line {reader.line_num}: {len(reader.fieldnames)} columns expected")
        continue
      rows.append((reader.line_num, row))
  return rows, problems


def _label_kind(label: Any) -> str:
  """'id' for non-negative ints and digit strings, 'name' for other strings, else 'bad'."""
  if isinstance(label, bool):
    return "bad"
  if (isinstance(label, int) and label >= 0) or (isinstance(label, str) and re.fullmatch(r"\d+", label.strip())):
    return "id"
  return "name" if isinstance(label, str) and label.strip() else "bad"


def load_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None,
                  classes: Sequence[str] | None = None) -> ManifestSource:
  """A source over a JSONL (`.jsonl`) or CSV (`.csv`) manifest, or over a class-folder tree.

  Args:
    path: the manifest file, or a folder of class subfolders (see `from_folder`).
    root: the data root paths are relative to; default: the manifest's folder.
    classes: class names by id, for string labels; default: the sorted names found.
  Raises:
    ManifestError: listing every problem with its line number (missing files, paths leaving the
      root, bad JSON, fields differing between lines, bad labels).
  """
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    return from_folder(path)
  if not path.is_file():
    raise ManifestError(f"no manifest at {path}")
  suffix = path.suffix.lower()
  if suffix not in (".jsonl", ".csv"):
    raise ManifestError(f"{path}: expected a .jsonl or .csv manifest, or a folder")
  rows, problems = (_read_jsonl if suffix == ".jsonl" else _read_csv)(path)
  root = pathlib.Path(root).expanduser() if root is not None else path.parent
  if not root.is_dir():
    raise ManifestError(f"data root {root} is not a folder")
  if not rows and not problems:
    problems.append("no records")
  fields = set(rows[0][1]) if rows else set()
  if rows and (not fields or fields - set(FIELDS) or fields == {"label"}):
    problems.append(f"line {rows[0][0]}: fields {sorted(fields)}; expected a subset of "
                    f"{list(FIELDS)} with at least one of image, text, audio")
  _raise_if(problems, str(path))

  labels = [r["label"] for _, r in rows if "label" in r]
  label_kinds = {_label_kind(v) for v in labels}
  if classes is None and "name" in label_kinds:
    classes = sorted({v.strip() for v in labels if _label_kind(v) == "name"})
  index = {c: i for i, c in enumerate(classes)} if classes is not None else None
  if len(label_kinds - {"bad"}) > 1:
    problems.append("labels mix class ids and class names; use one kind")

  entries = []
  for number, row in rows:
    where = f"line {number}"
    if set(row) != fields:
      problems.append(f"{where}: fields {sorted(row)} differ from line {rows[0][0]}'s {sorted(fields)}")
      continue
    paths = {}
    for name in PATH_FIELDS:
      if name in row:
        try:
          p = resolve_under(root, row[name])
        except ValueError as e:
          problems.append(f"{where}: {name}: {e}")
          continue
        if not p.is_file():
          problems.append(f"{where}: {name}: file not found: {row[name]!r} (under {root})")
          continue
        paths[name] = p
    text = row.get("text")
    if "text" in row and not isinstance(text, str):
      problems.append(f"{where}: text: expected a string, got {type(text).__name__}")
    label = None
    if "label" in row:
      kind = _label_kind(row["label"])
      if kind == "bad":
        problems.append(f"{where}: label: expected a class id or name, got {row['label']!r}")
      elif kind == "id":
        label = int(row["label"])
        if classes is not None and not 0 <= label < len(classes):
          problems.append(f"{where}: label: id {label} out of range for {len(classes)} classes")
      elif row["label"].strip() not in index:
        problems.append(f"{where}: label: unknown class {row['label']!r}; classes: {list(classes)}")
      else:
        label = index[row["label"].strip()]
    entries.append(Entry(id=f"{path.name}:{number}", paths=paths, text=text, label=label))
  _raise_if(problems, str(path))
  return ManifestSource(root, entries, classes)
