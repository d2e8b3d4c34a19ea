"""Random-access data sources: TFDS ArrayRecord datasets, the embedded digits, and npz files.

Every source ends up as a sequence of records `{'image': uint8 (H, W, C), 'label': int}`
with `len()` and random access, which is what the grain pipeline reads. TFDS
datasets are read with `tfds.data_source` (ArrayRecord, no TensorFlow); they must
have been prepared once with `python -m cnnjax.prepare NAME`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol, Sequence

import numpy as np

from cnnjax.errors import DataError

# Per-channel mean and standard deviation of the training images, in [0, 1] units.
# Standard published values; the digits and npz sources compute theirs from the data.
TFDS_DATASETS: dict[str, dict[str, Any]] = {
    "mnist": dict(eval_split="test", mean=(0.1307,), std=(0.3081,)),
    "fashion_mnist": dict(eval_split="test", mean=(0.2860,), std=(0.3530,)),
    "cifar10": dict(eval_split="test", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(eval_split="test", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "imagenet2012": dict(eval_split="validation", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
DATASET_NAMES = ("digits", "npz") + tuple(TFDS_DATASETS)
# Images used to estimate normalization statistics of sources without published ones.
STATS_SAMPLE = 10_000


class RandomAccessSource(Protocol):
  """What the pipeline needs from a source."""

  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train and an eval source with what the model and the preprocessing need to know."""

  name: str
  train: RandomAccessSource
  eval: RandomAccessSource
  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


class ArraySource:
  """In-memory images and labels with the record interface of a TFDS data source."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


def read_records(source: RandomAccessSource, indices: Sequence[int]) -> list[dict[str, Any]]:
  """Reads and decodes records one by one (ArrayRecord's batched read measured no faster on local files)."""
  return [source[int(i)] for i in indices]


def default_tfds_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def open_dataset(name: str, *, tfds_data_dir: str = "", train_split: str = "train",
                 eval_split: str = "", train_path: str = "", eval_path: str = "",
                 num_classes: int = 0) -> Dataset:
  """Opens a dataset by name: 'digits', 'npz', or a TFDS name in `TFDS_DATASETS`."""
  data_dir = tfds_data_dir or default_tfds_data_dir()
  if name == "npz":
    return _open_npz(train_path, eval_path, num_classes)
  if name == "digits":
    from cnnjax.data import digits  # pylint: disable=import-outside-toplevel
    digits.prepare(data_dir)
    dataset = _open_tfds("digits", data_dir, train_split, eval_split or "test", None, None)
    mean, std = _estimate_stats(dataset.train)
    return dataclasses.replace(dataset, mean=mean, std=std)
  if name not in TFDS_DATASETS:
    raise DataError(f"unknown dataset {name!r}; set data.name to one of {', '.join(DATASET_NAMES)}")
  known = TFDS_DATASETS[name]
  return _open_tfds(name, data_dir, train_split, eval_split or known["eval_split"],
                    known["mean"], known["std"])


def _open_tfds(name, data_dir, train_split, eval_split, mean, std) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  sources = {}
  for split in (train_split, eval_split):
    try:
      # download=False: an unprepared dataset fails at once instead of retrying a download.
      sources[split] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f"dataset {name!r} split {split!r} is not prepared in {data_dir} ({type(e).__name__}); "
          f"prepare it once with `python -m cnnjax.prepare {name} --data_dir={data_dir}` "
          f"on a machine with network access, or point data.tfds_data_dir at a prepared copy") from None
  info = tfds.builder(name, data_dir=data_dir).info
  image_shape = tuple(info.features["image"].shape)
  num_classes = info.features["label"].num_classes
  return Dataset(name, sources[train_split], sources[eval_split], num_classes, image_shape,
                 mean or (), std or ())


def _load_npz(path: str, role: str) -> tuple[np.ndarray, np.ndarray]:
  if not path:
    raise DataError(f"data.name=npz needs data.{role}_path: an .npz file with arrays 'image' and 'label'")
  if not os.path.exists(path):
    raise DataError(f"data.{role}_path {path!r} does not exist; give the path of an .npz file")
  try:
    with np.load(path) as arrays:
      missing = [key for key in ("image", "label") if key not in arrays]
      if missing:
        raise DataError(f"{path} lacks array(s) {missing} (has {sorted(arrays.files)}); "
                        "save it with np.savez(path, image=..., label=...)")
      images, labels = arrays["image"], arrays["label"]
  except (ValueError, OSError) as e:
    raise DataError(f"{path} is not a readable .npz file ({e}); write it with np.savez") from None
  if images.ndim != 4:
    hint = "add a channel axis with image[..., None]" if images.ndim == 3 else "store (N, H, W, C)"
    raise DataError(f"{path}: 'image' has shape {images.shape}, expected rank 4 (N, H, W, C); {hint}")
  if images.dtype != np.uint8:
    raise DataError(f"{path}: 'image' has dtype {images.dtype}, expected uint8 in 0..255; "
                    "convert with (x * 255).round().astype(np.uint8) if it is in [0, 1]")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{path}: 'label' has shape {labels.shape} and dtype {labels.dtype}, "
                    "expected integers of shape (N,)")
  if len(labels) != len(images):
    raise DataError(f"{path}: {len(images)} images but {len(labels)} labels; they must match")
  if len(labels) == 0:
    raise DataError(f"{path} holds no examples")
  return images, labels


def _open_npz(train_path: str, eval_path: str, num_classes: int) -> Dataset:
  train_images, train_labels = _load_npz(train_path, "train")
  eval_images, eval_labels = _load_npz(eval_path, "eval")
  if train_images.shape[1:] != eval_images.shape[1:]:
    raise DataError(f"train images are {train_images.shape[1:]} but eval images are "
                    f"{eval_images.shape[1:]}; both files need the same (H, W, C)")
  inferred = int(max(train_labels.max(), eval_labels.max())) + 1
  num_classes = num_classes or inferred
  for path, labels in ((train_path, train_labels), (eval_path, eval_labels)):
    if labels.min() < 0 or labels.max() >= num_classes:
      raise DataError(f"{path}: labels span [{labels.min()}, {labels.max()}], outside "
                      f"[0, {num_classes}); fix the labels or set data.num_classes")
  train = ArraySource(train_images, train_labels)
  mean, std = _estimate_stats(train)
  return Dataset("npz", train, ArraySource(eval_images, eval_labels), num_classes,
                 tuple(train_images.shape[1:]), mean, std)


def _estimate_stats(source: RandomAccessSource) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std in [0, 1] units, from (a fixed sample of) the training images."""
  count = min(len(source), STATS_SAMPLE)
  indices = np.linspace(0, len(source) - 1, count).round().astype(np.int64)
  images = np.stack([record["image"] for record in read_records(source, indices)]).astype(np.float64)
  images /= 255.0
  axes = tuple(range(images.ndim - 1))
  std = np.maximum(images.std(axis=axes), 1e-3)
  return tuple(float(v) for v in images.mean(axis=axes)), tuple(float(v) for v in std)
