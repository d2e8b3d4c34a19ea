"""Classifying image files with a trained run, as `python -m cnnjax.predict` does.

Each file is read with PIL and converted as the run's training images were
(`cnnjax.data.readers.image_array`: any mode to the run's channels, 16-bit
scaled to 8), brought to the size of the training images when its size differs
(shorter side, then centre crop), and passed through the run's eval
preprocessing (`Preprocess.host_eval`, then `Preprocess.finish` on the device,
as the eval step's `model_batch` does) and its model in eval mode. Class names
come from the run's `dataset.json`; a run that recorded none is answered with
class indices. A file that cannot be read as an image is reported and skipped.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cnnjax.data import readers
from cnnjax.data.preprocess import resize_shorter_and_center_crop
from cnnjax.data.resident import model_batch
from cnnjax.errors import ConfigError, printable
from cnnjax.train.restore import InferenceRun

# What a folder's files must end with to be read (a file named on the command line is always tried).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One file's top classes, best first: (class index, name or None, probability)."""

  path: str
  top: list[tuple[int, str | None, float]]

  def as_json(self) -> dict[str, Any]:
    return {"path": self.path, "top": [{"class": index, "name": name, "probability": probability}
                                       for index, name, probability in self.top]}


def image_files(paths: Sequence[str]) -> list[str]:
  """The files named, and the image files under each folder named (sorted, recursively). ConfigError for
  a path that does not exist, or when there is no file at all."""
  missing = [path for path in paths if not (os.path.isfile(path) or os.path.isdir(path))]
  if missing:
    raise ConfigError(f"{printable(missing[0])} is neither a file nor a folder; give image files or folders")
  files = []
  for path in paths:
    if not os.path.isdir(path):
      files.append(path)
      continue
    for root, folders, names in os.walk(path):
      folders.sort()
      files += [os.path.join(root, name) for name in sorted(names) if name.lower().endswith(IMAGE_SUFFIXES)]
  if not files:
    raise ConfigError(f"no image files (ending in {', '.join(IMAGE_SUFFIXES)}) in "
                      f"{', '.join(printable(path) for path in paths)}")
  return files


def check_classifier(run: InferenceRun) -> None:
  """ConfigError unless the run classifies images (not segmentation, volumes or text)."""
  if run.dataset.task != "classification" or len(run.input_shape) != 3:
    what = "volumes" if len(run.input_shape) == 4 else run.dataset.task
    raise ConfigError(f"the run in {run.workdir} is a {what} model; python -m cnnjax.predict classifies images "
                      "(use python -m cnnjax.evaluate to score it)")


def read_image(path: str, run: InferenceRun) -> np.ndarray:
  """The file as the run's training images were: uint8 (H, W, C) of their channels and size. Raises
  readers.BadFile naming what is wrong."""
  try:
    with Image.open(path) as image:
      image.load()
      pixels = readers.image_array(image, run.dataset.image_shape[-1])
  except readers.BadFile:
    raise
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise readers.BadFile(f"it is not an image PIL can read ({readers.short(e)})") from None
  height, width = run.dataset.image_shape[:2]
  if height is not None and pixels.shape[:2] != (height, width):
    if height != width:
      raise readers.BadFile(f"it is {pixels.shape[0]}x{pixels.shape[1]}, and the run's images are {height}x{width}; "
                            "resize it to that")
    pixels = resize_shorter_and_center_crop(pixels, height)
  return pixels


def logits_fn(run: InferenceRun) -> Any:
  """A jitted function from a host-stage batch to logits: the eval step's device stage and model."""
  variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
  apply = jax.jit(lambda variables, batch: run.model.apply(
      variables, model_batch(run.preprocess, batch, None)[0], train=False))
  return lambda batch: apply(variables, batch)


def predict(run: InferenceRun, images: Sequence[np.ndarray], *, top_k: int, batch_size: int
            ) -> list[list[tuple[int, str | None, float]]]:
  """Each image's `top_k` classes with their probabilities, best first (ties: the lower index)."""
  logits = logits_fn(run)
  names = run.dataset.class_names
  results = []
  for start in range(0, len(images), batch_size):
    chunk = list(images[start:start + batch_size])
    batch = run.preprocess.host_eval({"image": chunk, "label": np.zeros(len(chunk), np.int64)})
    probabilities = np.asarray(jax.nn.softmax(jnp.asarray(logits(batch), jnp.float32), -1))
    for row in probabilities:
      order = np.argsort(-row, kind="stable")[:top_k]
      results.append([(int(index), names[index] if names else None, float(row[index])) for index in order])
  return results


def classify(run: InferenceRun, files: Sequence[str], *, top_k: int,
             on_failure: Callable[[str, str], None]) -> tuple[list[Prediction], list[dict[str, str]]]:
  """The predictions for `files` (`image_files`), and {'path', 'error'} of each file that could not be
  read as an image (`on_failure(path, error)` is told at once). ConfigError for a run that does not
  classify images."""
  check_classifier(run)
  images, read, failed = [], [], []
  for path in files:
    try:
      images.append(read_image(path, run))
      read.append(path)
    except readers.BadFile as e:
      failed.append({"path": path, "error": str(e)})
      on_failure(path, str(e))
  tops = predict(run, images, top_k=min(top_k, run.dataset.num_classes),
                 batch_size=run.config.eval_batch_size or run.config.batch_size)
  return [Prediction(path, top) for path, top in zip(read, tops)], failed
