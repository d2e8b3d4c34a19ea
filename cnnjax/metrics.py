"""Run outputs: metrics.jsonl, TensorBoard event files, curves.png, summary.json, the parameter checksum,
eval results from summed eval outputs, and progress reporting.

Only the writing process (process 0 of a multi-process run) writes files; the
others pass `enabled=False`.

TensorBoard event files are written with the `tensorboard` package's own record
writer and protos (no TensorFlow): the package is needed anyway to look at them,
and its `EventAccumulator` reads them back in the tests, so one dependency does
both (tensorboardX would be a second writer beside it). Each invocation of a run
writes a new event file; when a run resumes, the older files are rewritten to
hold exactly the points that `metrics.jsonl` keeps, so that every (tag, step)
is in the directory once, for TensorBoard and for any other reader.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import tqdm
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.summary.writer.record_writer import RecordWriter

logger = logging.getLogger("cnnjax")

# TensorBoard reads every file of a directory whose name holds this mark.
EVENT_FILE_MARK = "tfevents"
EVENT_FILE_PREFIX = f"events.out.{EVENT_FILE_MARK}"
# Keys of a metrics record that are not curves: where the point is, and the eval split's example count.
NOT_SCALARS = ("step", "split", "examples")
# An event file record: uint64 length, uint32 masked CRC of it, the data, uint32 masked CRC of the data.
RECORD_HEADER = struct.Struct("<QI")
RECORD_FOOTER = struct.Struct("<I")
# Numbers the event files this process writes, so that two written in one directory in one second differ.
_event_file_serial = itertools.count()
CURVES_FILE = "curves.png"
CURVES_PANEL_INCHES = (4.0, 3.6)  # each of the three panels: width, height
CURVES_DPI = 100


def param_checksum(params: Any) -> str:
  """sha256 of the parameters' bytes (float32, little-endian) in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf), dtype="<f4").tobytes())
  return digest.hexdigest()


def param_l2(params: Any) -> float:
  """The L2 norm of all parameters together."""
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(params))))


def eval_result(totals: dict[str, Any]) -> dict[str, float]:
  """Loss and accuracy from summed eval outputs; for segmentation also the mean IoU."""
  count = max(totals["count"], 1.0)
  result = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count,
            "examples": int(totals["examples"])}
  if "class_union" in totals:
    result["mean_iou"] = mean_iou(totals["class_intersection"], totals["class_union"])
  return result


def mean_iou(intersection: np.ndarray, union: np.ndarray) -> float:
  """The mean over classes of intersection / union, leaving out classes absent from both the truth and the
  predictions (union 0), whose IoU is undefined."""
  present = np.asarray(union) > 0
  return float(np.mean(np.asarray(intersection)[present] / np.asarray(union)[present])) if present.any() else 0.0


def write_json(path: str, payload: dict[str, Any]) -> None:
  """Writes JSON atomically (a temporary file renamed into place)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def scalars(record: dict[str, Any]) -> dict[str, float]:
  """The curves of one metrics record, as TensorBoard tags: `train/loss`, `eval/accuracy`, `eval/mean_iou`, ..."""
  split = record.get("split", "train")
  return {f"{split}/{key}": float(value) for key, value in record.items()
          if key not in NOT_SCALARS and isinstance(value, (int, float, np.number)) and not isinstance(value, bool)}


def read_events(path: str) -> Iterator[bytes]:
  """The serialized events of an event file, up to its end or to a record torn by a crash."""
  with open(path, "rb") as f:
    while True:
      header = f.read(RECORD_HEADER.size)
      if len(header) < RECORD_HEADER.size:
        return
      length, length_crc = RECORD_HEADER.unpack(header)
      if masked_crc32c(header[:8]) != length_crc:
        return
      data, footer = f.read(length), f.read(RECORD_FOOTER.size)
      if len(data) < length or len(footer) < RECORD_FOOTER.size or \
          masked_crc32c(data) != RECORD_FOOTER.unpack(footer)[0]:
        return
      yield data


class EventLog:
  """TensorBoard event files in a run's directory: a new file per invocation, each (tag, step) once.

  Points are plain scalar summaries (`simple_value`), which TensorBoard's scalar
  dashboard, its EventAccumulator and other readers all understand. Files are
  written synchronously and flushed after every point, so a run killed at any
  moment leaves whole records (at most its last one torn, which readers skip).
  """

  def __init__(self, directory: str, *, enabled: bool):
    self.directory, self.enabled = directory, enabled
    self._file = None

  def _writer(self):
    """This invocation's event file, created on its first point (a version record first, as TensorBoard's)."""
    if self._file is None:
      os.makedirs(self.directory, exist_ok=True)
      name = (f"{EVENT_FILE_PREFIX}.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
              f"{next(_event_file_serial)}")
      self._file = RecordWriter(open(os.path.join(self.directory, name), "wb"))  # pylint: disable=consider-using-with
      self._file.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
    return self._file

  def write(self, record: dict[str, Any]) -> None:
    """Adds the record's curves at its step."""
    self._write_values(int(record["step"]), scalars(record))

  def _write_values(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled or not values:
      return
    event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()]))
    writer = self._writer()
    writer.write(event.SerializeToString())
    writer.flush()

  def event_files(self) -> list[str]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(os.path.join(self.directory, name) for name in os.listdir(self.directory)
                  if name.startswith(EVENT_FILE_PREFIX) and os.path.isfile(os.path.join(self.directory, name)))

  def keep_only(self, records: Sequence[dict[str, Any]]) -> None:
    """Makes the event files hold exactly the curves of `records` (what `metrics.jsonl` keeps), each once.

    Points of earlier invocations past the restored step, or repeated, are
    dropped from their files (rewritten atomically, keeping their names and
    wall times); points of `records` that no file holds (a run killed between
    writing `metrics.jsonl` and its event file) are added to this invocation's file.
    """
    if not self.enabled:
      return
    wanted = {(tag, int(record["step"])) for record in records for tag in scalars(record)}
    seen: set[tuple[str, int]] = set()
    for path in self.event_files():
      kept, changed = [], False
      for data in read_events(path):
        event = event_pb2.Event.FromString(data)
        if not event.HasField("summary"):
          kept.append(data)
          continue
        values = [v for v in event.summary.value if (v.tag, event.step) in wanted and (v.tag, event.step) not in seen]
        seen.update((v.tag, event.step) for v in values)
        if len(values) != len(event.summary.value):
          changed = True
          if not values:
            continue
          del event.summary.value[:]
          event.summary.value.extend(values)
          data = event.SerializeToString()
        kept.append(data)
      if changed or os.path.getsize(path) != sum(RECORD_HEADER.size + len(d) + RECORD_FOOTER.size for d in kept):
        # A name without the mark, so that TensorBoard never reads a half-written copy.
        tmp = os.path.join(self.directory, ".events-rewrite.tmp")
        with open(tmp, "wb") as f:
          writer = RecordWriter(f)
          for data in kept:
            writer.write(data)
        os.replace(tmp, path)
    for record in records:
      step = int(record["step"])
      self._write_values(step, {tag: value for tag, value in scalars(record).items() if (tag, step) not in seen})

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class MetricsWriter:
  """Appends one JSON object per logged point to `metrics.jsonl`, and its curves to TensorBoard event
  files in the same directory; each (split, step) point once."""

  def __init__(self, path: str, *, enabled: bool):
    self.path, self.enabled = path, enabled
    self._logged: set[tuple[str, int]] = set()
    self.events = EventLog(os.path.dirname(path) or ".", enabled=enabled)

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
    self.events.write(clean)

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (written by a run that died before its next checkpoint), and lines
    that are not whole records (a write torn by a full disk or a crash), with a warning; the event
    files then hold the same points."""
    if not self.enabled:
      return
    if not os.path.exists(self.path):
      self.events.keep_only([])
      return
    kept, records, torn = [], [], 0
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
          records.append(record)
          self._logged.add(point)
    if torn:
      logger.warning("%s: dropped %d line(s) that were not whole records (a torn write)", self.path, torn)
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self.events.keep_only(records)

  def records(self) -> list[dict[str, Any]]:
    """Every whole record of the log, in order."""
    if not os.path.exists(self.path):
      return []
    records = []
    with open(self.path, errors="replace") as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:
          continue
    return records

  def write_curves(self) -> None:
    """Draws `curves.png` beside the log from every point it holds."""
    if self.enabled:
      write_curves(self.records(), os.path.join(os.path.dirname(self.path) or ".", CURVES_FILE))

  def close(self) -> None:
    self.events.close()


def figure_row(columns: int, panel_inches: tuple[float, float], title: str = "") -> tuple[Any, list[Any]]:
  """A figure of `columns` panels side by side, each `panel_inches` (width, height); (figure, axes list).

  Matplotlib's object interface with the Agg canvas, not pyplot: a partitioned
  sweep trains (and draws) in several threads at once, pyplot's global state is
  not thread-safe, and figures made here need no closing.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=(panel_inches[0] * columns, panel_inches[1]))
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, columns, squeeze=False)
  if title:
    figure.suptitle(title)
  return figure, list(axes[0])


def save_figure(figure: Any, path: str, dpi: int) -> None:
  """Lays the figure out and writes it as PNG, atomically (a reader never sees half a file)."""
  figure.tight_layout()
  tmp = f"{path}.tmp.png"
  figure.savefig(tmp, dpi=dpi)
  os.replace(tmp, path)


def write_curves(records: Sequence[dict[str, Any]], path: str) -> None:
  """Loss and accuracy (train and eval) and the learning rate against the step, as one PNG (atomically)."""

  def series(split: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((int(r["step"]), float(r[key])) for r in records
                    if r.get("split") == split and isinstance(r.get(key), (int, float)) and math.isfinite(r[key]))
    return [p[0] for p in points], [p[1] for p in points]

  figure, panels = figure_row(3, CURVES_PANEL_INCHES)
  for axes, key, title in ((panels[0], "loss", "loss"), (panels[1], "accuracy", "accuracy")):
    for split, style in (("train", "-"), ("eval", "o-")):
      steps, values = series(split, key)
      if steps:
        axes.plot(steps, values, style, label=split)
    axes.set_title(title)
    axes.set_xlabel("step")
    if axes.has_data():
      axes.legend()
  steps, values = series("train", "learning_rate")
  panels[2].plot(steps, values)
  panels[2].set_title("learning rate")
  panels[2].set_xlabel("step")
  save_figure(figure, path, CURVES_DPI)


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
