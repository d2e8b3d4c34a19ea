"""Run outputs: metrics.jsonl, summary.json, the parameter checksum, and progress reporting.

Only the writing process (process 0 of a multi-process run) writes files; the
others pass `enabled=False`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import tqdm

logger = logging.getLogger("cnnjax")


def param_checksum(params: Any) -> str:
  """sha256 of the parameters' bytes (float32, little-endian) in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf), dtype="<f4").tobytes())
  return digest.hexdigest()


def param_l2(params: Any) -> float:
  """The L2 norm of all parameters together."""
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(params))))


def write_json(path: str, payload: dict[str, Any]) -> None:
  """Writes JSON atomically (a temporary file renamed into place)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class MetricsWriter:
  """Appends one JSON object per logged point to `metrics.jsonl`; each (split, step) point once."""

  def __init__(self, path: str, *, enabled: bool):
    self.path, self.enabled = path, enabled
    self._logged: set[tuple[str, int]] = set()

  def write(self, record: dict[str, Any]) -> None:
    """Appends `record`, unless its (split, step) point is already in the log (a resumed run that
    repeats its final evaluation)."""
    if not self.enabled:
      return
    point = (record.get("split"), int(record["step"]))
    if point in self._logged:
      return
    clean = {k: (float(v) if isinstance(v, (np.floating, np.integer)) and k != "step" else v)
             for k, v in record.items()}
    clean["step"] = int(record["step"])
    with open(self.path, "a") as f:
      f.write(json.dumps(clean, sort_keys=True) + "\n")
    self._logged.add(point)

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (written by a run that died before its next checkpoint), and lines
    that are not whole records (a write torn by a full disk or a crash), with a warning."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept, torn = [], 0
    with open(self.path, errors="replace") as f:
      for line in f:
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          point = (record.get("split"), int(record["step"]))
        except (ValueError, TypeError, KeyError, AttributeError):
          torn += 1
          continue
        if point[1] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
          self._logged.add(point)
    if torn:
      logger.warning("%s: dropped %d line(s) that were not whole records (a torn write)", self.path, torn)
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)


class Progress:
  """A tqdm bar on a terminal; plain log lines otherwise (CI logs, files)."""

  def __init__(self, *, total: int, initial: int, enabled: bool, allow_bar: bool):
    """enabled: report at all (process 0 only); allow_bar: a bar when stderr is a terminal."""
    self.enabled = enabled
    self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) \
        if enabled and allow_bar and sys.stderr.isatty() else None

  def update(self, step: int, steps: int, metrics: dict[str, float], examples_per_second: float) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(steps)
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{examples_per_second:.0f}")
    else:
      logger.info("step %d: loss %.4f accuracy %.4f (%.0f examples/s)", step, metrics["loss"],
                  metrics["accuracy"], examples_per_second)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      logger.info("%s", text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
