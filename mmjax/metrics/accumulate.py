"""Metric accumulators: per-batch sufficient statistics, merged across batches and hosts.

An accumulator's state has three parts:

- `sums`: name -> float64/int64 numpy array of fixed shape, added on merge (counts, totals, BLEU
  n-gram matches, a confusion matrix);
- `rows`: name -> list of arrays concatenated along axis 0 on merge (embeddings for retrieval);
- `records`: a list of JSON-serialisable items concatenated on merge (captions for CIDEr-D, whose
  document frequencies need the whole corpus).

`merge(other)` combines two accumulators of the same kind and configuration. `gather()` is the
cross-host merge: a collective that every process must call, after which every process holds the
state of all of them (in process order). It serialises the state to bytes (numpy .npz, never
pickle) and exchanges them with `jax.experimental.multihost_utils.process_allgather`, so float64
sums keep their precision whatever `jax_enable_x64` says. With one process it does nothing.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def _allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's `payload`, in process order (a collective)."""
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int32)))
  sizes = sizes.reshape(-1)
  longest = int(sizes.max())
  if longest == 0:
    return [b""] * len(sizes)
  buf = np.zeros(longest, np.uint8)
  buf[:len(payload)] = np.frombuffer(payload, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), longest)
  return [gathered[p, :int(sizes[p])].tobytes() for p in range(len(sizes))]


def select_items(items: Sequence[Any], mask) -> list[Any]:
  """The items whose `mask` entry is True (all of them when mask is None)."""
  if mask is None:
    return list(items)
  mask = np.asarray(mask, bool)
  if mask.shape != (len(items),):
    raise ValueError(f"mask: expected shape ({len(items)},), got {mask.shape}")
  return [x for x, keep in zip(items, mask) if keep]


class Accumulator:
  """Base class of mergeable metric state; subclasses add `update` and `compute`.

  Subclasses set their configuration attributes before calling `super().__init__()`, list them
  in `_config()` (merging needs equal configurations), and return their zeroed sums from
  `_zero_sums()`.

  Attributes:
    sums: name -> numpy array, added on merge.
    rows: name -> list of arrays, concatenated on merge.
    records: JSON-serialisable items, concatenated on merge.
  """

  def __init__(self):
    self.reset()

  def _zero_sums(self) -> dict[str, np.ndarray]:
    return {}

  def _config(self) -> tuple:
    return (type(self).__name__,)

  def reset(self) -> None:
    """Empties the state."""
    self.sums = self._zero_sums()
    self.rows: dict[str, list[np.ndarray]] = {}
    self.records: list[Any] = []

  def compute(self) -> dict[str, Any]:
    raise NotImplementedError

  def _add_rows(self, **arrays: np.ndarray) -> None:
    for name, value in arrays.items():
      self.rows.setdefault(name, []).append(np.asarray(value))

  def row(self, name: str) -> np.ndarray | None:
    """The concatenation of the rows stored under `name`, or None when there are none."""
    parts = self.rows.get(name)
    return np.concatenate(parts, axis=0) if parts else None

  def merge(self, other: "Accumulator") -> "Accumulator":
    """Adds `other`'s state to this one (in place) and returns self."""
    if type(other) is not type(self) or other._config() != self._config():
      raise ValueError(f"merge: cannot merge {other._config()} into {self._config()}")
    self._merge_state(other.sums, other.rows, other.records)
    return self

  def _merge_state(self, sums: dict[str, np.ndarray], rows: dict[str, list[np.ndarray]], records: list) -> None:
    for name, value in sums.items():
      if name not in self.sums or self.sums[name].shape != value.shape:
        raise ValueError(f"merge: sum {name!r} of shape {value.shape} does not match this accumulator")
      self.sums[name] = self.sums[name] + value
    for name, parts in rows.items():
      self.rows.setdefault(name, []).extend(parts)
    self.records.extend(records)

  def to_bytes(self) -> bytes:
    """The state as an .npz payload (no pickle)."""
    arrays = {f"sum/{k}": v for k, v in self.sums.items()}
    arrays.update({f"row/{k}": self.row(k) for k in self.rows if self.rows[k]})
    arrays["records"] = np.frombuffer(json.dumps(self.records).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()

  def merge_bytes(self, payload: bytes) -> "Accumulator":
    """Merges a state written by `to_bytes` of an accumulator with the same configuration."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
      sums = {k[4:]: data[k] for k in data.files if k.startswith("sum/")}
      rows = {k[4:]: [data[k]] for k in data.files if k.startswith("row/")}
      records = json.loads(data["records"].tobytes().decode())
    self._merge_state(sums, rows, records)
    return self

  def gather(self) -> "Accumulator":
    """Replaces the state by the merge of every process's state (a collective); returns self."""
    if jax.process_count() == 1:
      return self
    payloads = _allgather_bytes(self.to_bytes())
    merged = copy.copy(self)
    merged.reset()
    for payload in payloads:
      merged.merge_bytes(payload)
    self.sums, self.rows, self.records = merged.sums, merged.rows, merged.records
    return self


class MeanBase(Accumulator):
  """Weighted mean as (total, count) sums; `compute()` gives {name: total / count}."""

  def __init__(self, name: str):
    self.name = name
    super().__init__()

  def _zero_sums(self) -> dict[str, np.ndarray]:
    return {"total": np.zeros((), np.float64), "count": np.zeros((), np.float64)}

  def _config(self) -> tuple:
    return super()._config() + (self.name,)

  def _add(self, values, weights=None) -> None:
    values = np.asarray(values, np.float64).reshape(-1)
    if weights is None:
      weights = np.ones_like(values)
    weights = np.asarray(weights, np.float64).reshape(-1)
    if weights.shape != values.shape:
      raise ValueError(f"weights: expected {values.shape[0]} weights (one per value), got {weights.shape[0]}")
    self.sums["total"] = self.sums["total"] + np.sum(np.where(weights != 0, values * weights, 0.0))
    self.sums["count"] = self.sums["count"] + np.sum(weights)

  def compute(self) -> dict[str, float]:
    count = float(self.sums["count"])
    return {self.name: float(self.sums["total"]) / count if count else 0.0}


class Mean(MeanBase):
  """Weighted mean of any per-example values (a loss, a score, an exact-match flag)."""

  def update(self, values, weights=None) -> None:
    """Adds values (any shape, flattened) with optional equally-shaped weights or bool mask."""
    self._add(values, weights)
