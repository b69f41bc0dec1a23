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
leave it: absolute paths, URLs, `..` components and symlinks that resolve outside the root are
refused. Every problem found (missing files, bad lines) is reported at once, with line numbers.
The manifest, the folder and the data root may be in a bucket (`gs://bucket/data/train.jsonl`):
there each folder is listed once to find the files (not one request per file).
Labels are class ids (ints, or strings of digits) or class names, mapped to ids by `classes`
(default: the sorted names found).

A task reading other columns names them: `load_manifest(path, columns={"image": "filepath",
"captions": "title"})` maps each record field to its manifest column (JSONL key or CSV header).
Every line must then hold those columns (others are ignored); "image" and "audio" are file paths,
"label" a label, any other field a non-empty text or (JSONL) a non-empty list of texts, kept as
given (`captions`, `answers`). A class folder may hold audio clips instead of images
(`folder_field="audio"`). `verify_files(source)` reads every file's header and reports each file
that is not an image (or not audio) with its line; `check_media` is that check for one file (the
predictor's requests use it too, and decode an image whole).
"""

from __future__ import annotations

import codecs
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import pathlib
import re
from typing import Any, Callable, Sequence

from etils import epath

from mmjax import io_paths

FIELDS = ("image", "text", "audio", "label")
PATH_FIELDS = ("image", "audio")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
MEDIA_KINDS = {"image": "an image file (PNG, JPEG, ...)", "audio": "an audio file (WAV, FLAC, OGG)"}
_MAX_REPORTED = 20


class ManifestError(ValueError):
  """Problems in a manifest or folder; the message lists them with their line numbers."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One record to read.

  Attributes:
    id: where it came from, "<manifest>:<line>" or the file's path under the root.
    paths: field -> absolute file path or URL (image, audio).
    text: the text, if the manifest has it.
    label: the class id, if the manifest has labels.
    values: other fields read by `columns` (a text or a list of texts each).
  """

  id: str
  paths: dict[str, pathlib.Path | epath.Path]
  text: str | None = None
  label: int | None = None
  values: dict[str, Any] = dataclasses.field(default_factory=dict)


def _data_path(path: str | os.PathLike) -> pathlib.Path | epath.Path:
  """A local path (`~` expanded) as a `pathlib.Path`, a bucket URL as an `epath.Path` (another
  URL is a ValueError naming it)."""
  return io_paths.as_path(path) if io_paths.is_url(path) else pathlib.Path(path).expanduser()


def resolve_under(root: pathlib.Path | epath.Path, rel: str) -> pathlib.Path | epath.Path:
  """`root / rel` resolved, or a ValueError if `rel` is absolute, has `..`, or leaves `root`."""
  if not isinstance(rel, str) or not rel.strip():
    raise ValueError(f"path must be a non-empty string, got {rel!r}")
  if (os.path.isabs(rel) or rel.startswith("~") or re.match(r"^[A-Za-z]:[\\/]", rel)
      or io_paths.is_url(rel)):
    raise ValueError(f"absolute path {rel!r} is not allowed; give it relative to the data root")
  if ".." in re.split(r"[\\/]", rel):
    raise ValueError(f"path {rel!r} has a '..' component; it may not leave the data root")
  if io_paths.is_url(root):  # no symlinks in a bucket
    return root / rel
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
    record.update(e.values)
    return record

  def __repr__(self) -> str:
    return f"ManifestSource(root={str(self.root)!r}, len={len(self)}, classes={self.classes})"


def _raise_if(problems: list[str], what: str) -> None:
  """Raises a ManifestError listing `problems` (the first few) if there are any."""
  if problems:
    more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
    raise ManifestError(f"{what}: {len(problems)} problem(s):\n  " +
                        "\n  ".join(problems[:_MAX_REPORTED]) + more)


def _hidden(name: str) -> bool:
  """Whether a file or folder is another tool's leftover: hidden (`.DS_Store`, macOS's `._x.png`)
  or a macOS archive's `__MACOSX`."""
  return name.startswith(".") or name == "__MACOSX"


def _under(folder: pathlib.Path | epath.Path) -> list[pathlib.Path | epath.Path]:
  """Every file and folder under `folder`, sorted (a bucket has no recursive glob: folder by folder)."""
  if not io_paths.is_url(folder):
    return sorted(folder.rglob("*"))
  found = []
  for p in folder.iterdir():
    found += [p] + (_under(p) if p.is_dir() else [])
  return sorted(found)


def _file_check(root: pathlib.Path | epath.Path) -> Callable[[Any], bool]:
  """`is_file` for paths under `root`; in a bucket, a lookup in its folder's listing (each folder
  listed once, not one request per file)."""
  if not io_paths.is_url(root):
    return lambda p: p.is_file()
  listed: dict[str, set[str]] = {}

  def is_file(p):
    folder = os.fspath(p.parent)
    if folder not in listed:
      listed[folder] = {c.name for c in p.parent.iterdir()} if p.parent.is_dir() else set()
    return p.name in listed[folder]

  return is_file


def from_folder(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, *,
                field: str = "image", classes: Sequence[str] | None = None) -> ManifestSource:
  """A source over `root/<class>/<file>`: classes are the sorted subfolder names.

  Files whose extension is not in `extensions` are ignored, and so are hidden files and folders
  (names starting with ".", such as macOS's `._1.png`) and `__MACOSX`; a class folder with no such
  files, and any file or folder that resolves outside `root`, is an error.

  Args:
    field: the record field the files' bytes go to ("image"; "audio" with `AUDIO_EXTENSIONS`).
    classes: class names by id (e.g. the training split's, for an evaluation folder): a subfolder
      not among them is an error; default: the sorted subfolder names.
  """
  root = _data_path(root)
  if not root.is_dir():
    raise ManifestError(f"data root {root} is not a folder")
  local = not io_paths.is_url(root)
  real_root = root.resolve() if local else root
  found_classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
  if not found_classes:
    raise ManifestError(f"{root}: no class subfolders (expected root/<class>/<{field} files>)")
  if classes is None:
    classes = found_classes
  unknown = [c for c in found_classes if c not in classes]
  if unknown:
    raise ManifestError(f"{root}: class folder(s) {unknown} are not among the classes {list(classes)}")
  ids = {c: i for i, c in enumerate(classes)}
  exts = tuple(e.lower() for e in extensions)
  entries, problems = [], []
  for name in found_classes:
    label = ids[name]
    found = 0
    for path in _under(root / name):
      rel = path.relative_to(root).as_posix()
      if any(_hidden(part) for part in rel.split("/")[1:]):
        continue
      if local and not path.resolve().is_relative_to(real_root):
        problems.append(f"{rel}: resolves to {path.resolve()}, outside the data root (a symlink?)")
        continue
      if path.is_file() and path.suffix.lower() in exts:
        entries.append(Entry(id=rel, paths={field: path.resolve() if local else path}, label=label))
        found += 1
    if not found:
      problems.append(f"{name}/: no {field} files ({', '.join(exts)})")
  _raise_if(problems, str(root))
  return ManifestSource(root, entries, classes)


def _read_text(path: pathlib.Path | epath.Path) -> str:
  """The manifest's text: UTF-8, with or without the BOM that Excel and Notepad write; other
  bytes are a ManifestError naming the line and byte."""
  data = path.read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:  # e.start counts from after the BOM
    body = data.removeprefix(codecs.BOM_UTF8)
    line = body.count(b"\n", 0, e.start) + 1
    raise ManifestError(f"{path}: line {line}: byte 0x{body[e.start]:02x} is not UTF-8; save the "
                        "manifest as UTF-8 (Excel: 'CSV UTF-8')") from None


def _read_jsonl(path: pathlib.Path | epath.Path) -> tuple[list[tuple[int, dict]], list[str]]:
  """(line number, row) pairs of a JSONL file, and problems found."""
  rows, problems = [], []
  with io.StringIO(_read_text(path), newline=None) as f:  # universal newlines, as open()
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


def _read_csv(path: pathlib.Path | epath.Path) -> tuple[list[tuple[int, dict]], list[str]]:
  """(line number, row) pairs of a CSV file with a header line, and problems found."""
  rows, problems = [], []
  with io.StringIO(_read_text(path), newline="") as f:
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


def _text_value(value: Any) -> bool:
  """Whether `value` is a non-empty text or a non-empty list of non-empty texts."""
  if isinstance(value, str):
    return bool(value.strip())
  return (isinstance(value, list) and bool(value)
          and all(isinstance(v, str) and v.strip() for v in value))


def _select_columns(rows: list[tuple[int, dict]], columns: dict[str, str]) -> tuple[list[tuple[int, dict]], list[str]]:
  """`rows` with each record field read from its column, and the lines that lack a column."""
  out, problems = [], []
  for number, row in rows:
    missing = [f"{col!r} (the {name})" for name, col in columns.items() if col not in row]
    if missing:
      problems.append(f"line {number}: no column {', '.join(missing)}; it has {sorted(row)}")
      continue
    out.append((number, {name: row[col] for name, col in columns.items()}))
  return out, problems


def load_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None,
                  classes: Sequence[str] | None = None, *, columns: dict[str, str] | None = None,
                  folder_field: str = "image") -> ManifestSource:
  """A source over a JSONL (`.jsonl`) or CSV (`.csv`) manifest, or over a class-folder tree.

  Args:
    path: the manifest file, or a folder of class subfolders (see `from_folder`); local or a
      bucket URL.
    root: the data root paths are relative to; default: the manifest's folder.
    classes: class names by id, for string labels; default: the sorted names found.
    columns: record field -> manifest column, when the records are not the default fields (see
      the module docstring); every line must hold these columns.
    folder_field: for a class folder, what its files are: "image" or "audio" (`from_folder`).
  Raises:
    ManifestError: listing every problem with its line number (missing files, paths leaving the
      root, bad JSON, fields differing between lines, bad labels, missing columns).
  """
  path = _data_path(path)
  if path.is_dir():
    extra = sorted(set(columns or ()) - {folder_field, "label"})
    if extra:
      raise ManifestError(f"{path}: a class folder gives records {folder_field!r} and 'label'; "
                          f"fields {extra} need a manifest")
    exts = AUDIO_EXTENSIONS if folder_field == "audio" else IMAGE_EXTENSIONS
    return from_folder(path, exts, field=folder_field, classes=classes)
  if not path.is_file():
    raise ManifestError(f"no manifest at {path}")
  suffix = path.suffix.lower()
  if suffix not in (".jsonl", ".csv"):
    raise ManifestError(f"{path}: expected a .jsonl or .csv manifest, or a folder")
  rows, problems = (_read_jsonl if suffix == ".jsonl" else _read_csv)(path)
  root = _data_path(root) if root is not None else path.parent
  if not root.is_dir():
    raise ManifestError(f"data root {root} is not a folder")
  if not rows and not problems:
    problems.append("no records")
  if columns is not None:
    columns = dict(columns)
    if not columns or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in columns.items()):
      raise ManifestError(f"{path}: columns: expected a non-empty dict of record field -> column "
                          f"name, got {columns!r}")
    rows, missing = _select_columns(rows, columns)  # reported with the lines' other problems
  else:
    missing = []
  fields = set(columns) if columns is not None else set(rows[0][1]) if rows else set()
  if columns is None and rows and (not fields or fields - set(FIELDS) or fields == {"label"}):
    problems.append(f"line {rows[0][0]}: fields {sorted(fields)}; expected a subset of "
                    f"{list(FIELDS)} with at least one of image, text, audio")
    _raise_if(problems, str(path))  # every other line would be reported against these fields

  labels = [r["label"] for _, r in rows if "label" in r]
  label_kinds = {_label_kind(v) for v in labels}
  if classes is None and "name" in label_kinds:
    classes = sorted({v.strip() for v in labels if _label_kind(v) == "name"})
  index = {c: i for i, c in enumerate(classes)} if classes is not None else None
  if len(label_kinds - {"bad"}) > 1:
    problems.append("labels mix class ids and class names; use one kind")

  is_file = _file_check(root)
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
        if not is_file(p):
          problems.append(f"{where}: {name}: file not found: {row[name]!r} (under {root})")
          continue
        paths[name] = p
    text = row.get("text")
    if "text" in row and not isinstance(text, str):
      problems.append(f"{where}: text: expected a string, got {type(text).__name__}")
    values = {k: v for k, v in row.items() if k not in (*PATH_FIELDS, *FIELDS)}
    for name, value in values.items():
      if not _text_value(value):
        problems.append(f"{where}: {name} (column {columns[name]!r}): expected a non-empty text or "
                        f"a non-empty list of texts, got {value!r}")
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
    entries.append(Entry(id=f"{path.name}:{number}", paths=paths, text=text, label=label, values=values))
  # In line order: the lines that did not read (bad JSON, missing columns) among the others.
  line = lambda p: int(re.match(r"line (\d+)", p).group(1)) if re.match(r"line \d+", p) else 0
  _raise_if(sorted(problems + missing, key=line), str(path))
  return ManifestSource(root, entries, classes)


def check_media(kind: str, path: str | os.PathLike, where: str, data: bytes | None = None, *,
                whole: bool = True) -> None:
  """Raises a ValueError naming `where` and `path` unless the file is a readable `kind`.

  An "image" must have an image header and, with `whole`, decode whole (a file cut short fails);
  "audio" must have a header soundfile reads and at least one sample. `data`, when given, is the
  file's bytes (already read); else `path` (local or a bucket URL) is opened.
  """
  if kind not in MEDIA_KINDS:
    raise ValueError(f"kind: expected one of {sorted(MEDIA_KINDS)}, got {kind!r}")
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import soundfile  # pylint: disable=g-import-not-at-top

  frames = None
  try:
    with io.BytesIO(data) if data is not None else _data_path(path).open("rb") as f:
      if kind == "image":
        with PIL.Image.open(f) as image:
          if whole:
            image.load()
      else:
        frames = soundfile.info(f).frames
  except Exception as e:  # pylint: disable=broad-except  (PIL and soundfile raise several kinds)
    why = re.sub(r" ?<_io\.[^>]*>", "", str(e))  # the file object's repr says nothing the path does not
    raise ValueError(f"{where}: {os.fspath(path)!r} is not {MEDIA_KINDS[kind]}: "
                     f"{type(e).__name__}: {why}") from None
  if frames == 0:
    raise ValueError(f"{where}: {os.fspath(path)!r} holds no audio samples (a header only)")


def verify_files(source: ManifestSource, threads: int = 16) -> None:
  """Raises a ManifestError listing every file `check_media` refuses (no image header, audio
  soundfile cannot read or without samples), each with its record's id (manifest line or file).
  Headers only: decoding every image would cost an epoch of decoding at every start; an image cut
  short fails when the pipeline decodes it."""

  def check(entry: Entry) -> list[str]:
    problems = []
    for name, path in entry.paths.items():
      try:
        if name in MEDIA_KINDS:
          check_media(name, path, f"{entry.id}: {name}", whole=False)
      except ValueError as e:
        problems.append(str(e))
    return problems

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    problems = [p for found in pool.map(check, source.entries) for p in found]
  _raise_if(problems, str(source.root))
