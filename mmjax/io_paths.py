"""Local paths and bucket URLs (`gs://`, `s3://`, ...) through one API: `etils.epath.Path`.

A workdir, a checkpoint folder, a manifest or a tokenizer file may be either. The local-path
calls of `os` and `pathlib` would quietly turn a URL into a local folder
(`os.path.abspath("gs://b/run")` is `<cwd>/gs:/b/run`), so the library goes through these.
Buckets have no append and no rename: an object appears whole when its upload ends, so a write
there is already atomic, and a file that grows (metrics.jsonl) is rewritten whole.
URLs are served by fsspec (`gcsfs` for `gs://`); Orbax writes arrays there through tensorstore.
"""

from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """True for a bucket URL such as `gs://bucket/run`; False for a local path."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a URL as it is, a local path absolute with `~` expanded.

  A URL of a scheme epath does not serve (`https://`) is a ValueError naming it.
  """
  try:
    p = epath.Path(path)
  except KeyError:  # epath's lookup of the URL's scheme
    raise ValueError(f"{os.fspath(path)!r}: unsupported URL; expected a local path or a bucket URL "
                     "(gs://bucket/..., s3://bucket/...)") from None
  return p if is_url(p) else p.expanduser().resolve()


def write_atomic(path: PathLike, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to `path` so that a reader never sees part of it (locally: a
  temporary file renamed over it)."""
  path = epath.Path(path)
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_url(path):
    path.write_bytes(data)
    return
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_bytes(data)
  tmp.replace(path)
