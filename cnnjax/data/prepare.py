"""Preparing TFDS datasets once, so that training can read them with `tfds.data_source`.

Two ways, both writing the canonical TFDS layout (`DATA_DIR/NAME/VERSION/`, the
builder's own features, ArrayRecord files) that training reads without TensorFlow:

* From the network, with TFDS's own builders: `download_and_prepare`. In tfds
  4.9 this needs TensorFlow (its downloader, extractor and PNG encoder call
  `tf.*`), which the `prepare` extra brings: `pip install 'cnnjax[prepare]'`.
* From the original files already on disk (`--source_dir`, for machines without
  network): MNIST and Fashion-MNIST idx files, the CIFAR-10 and CIFAR-100 binary
  versions. The TFDS builder classes are reused for their metadata and features;
  only reading the files is replaced by NumPy and encoding by PIL, so no
  TensorFlow is needed.

The digits need neither: they come from scikit-learn (`cnnjax.data.digits`).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax.data import digits
from cnnjax.errors import DataError

PREPARABLE = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet2012", "oxford_iiit_pet",
              "imdb_reviews")
FROM_FILES = ("mnist", "fashion_mnist", "cifar10", "cifar100")

# The original MNIST-format file names (the same for Fashion-MNIST).
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGE_HEADER_BYTES, IDX_LABEL_HEADER_BYTES = 16, 8
CIFAR_IMAGE_BYTES = 32 * 32 * 3


def _open_maybe_gzip(path: str):
  for candidate, opener in ((path, open), (path + ".gz", gzip.open)):
    if os.path.exists(candidate):
      return opener(candidate, "rb")
  raise DataError(f"{path}[.gz] is missing; --source_dir must hold the original files of the dataset")


def read_idx(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads an MNIST-format (idx) image file and label file into (N, H, W, 1) uint8 and (N,) int64."""
  with _open_maybe_gzip(images_path) as f:
    header = np.frombuffer(f.read(IDX_IMAGE_HEADER_BYTES), ">u4")
    count, rows, cols = (int(v) for v in header[1:4])
    images = np.frombuffer(f.read(count * rows * cols), np.uint8).reshape(count, rows, cols, 1)
  with _open_maybe_gzip(labels_path) as f:
    f.read(IDX_LABEL_HEADER_BYTES)
    labels = np.frombuffer(f.read(count), np.uint8).astype(np.int64)
  return images, labels


def read_cifar_binary(path: str, num_labels: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (labels, image HWC uint8) from a CIFAR binary batch: label bytes then 3x32x32 planes."""
  record = num_labels + CIFAR_IMAGE_BYTES
  data = np.fromfile(path, np.uint8)
  if data.size % record:
    raise DataError(f"{path} is {data.size} bytes, not a whole number of {record}-byte CIFAR records")
  for row in data.reshape(-1, record):
    yield row[:num_labels].astype(np.int64), row[num_labels:].reshape(3, 32, 32).transpose(1, 2, 0)


class _IdxFromFiles:
  """Mixin for the MNIST-family builders: read the idx files from a local directory."""

  def __init__(self, *, source_dir: str, **kwargs: Any):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    return {split: self._generate_examples(*(os.path.join(self._source_dir, name) for name in names))
            for split, names in IDX_FILES.items()}

  def _generate_examples(self, images_path, labels_path):  # pylint: disable=arguments-differ
    images, labels = read_idx(images_path, labels_path)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": Image.fromarray(image[..., 0]), "label": int(label)}


class _CifarFromFiles:
  """Mixin for the CIFAR builders: read the binary batches from a local directory."""

  def __init__(self, *, source_dir: str, **kwargs: Any):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _cifar_dir(self) -> str:
    nested = os.path.join(self._source_dir, self._cifar_info.prefix)
    return nested if os.path.isdir(nested) else self._source_dir

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    info, directory = self._cifar_info, self._cifar_dir()
    for key, names_file in zip(info.label_keys, info.label_files):
      path = os.path.join(directory, names_file)
      if os.path.exists(path):
        with open(path) as f:
          self.info.features[key].names = [name for name in f.read().split("\n") if name]
    return {split: self._generate_examples(prefix, [os.path.join(directory, f) for f in files])
            for split, prefix, files in (("train", "train_", info.train_files),
                                         ("test", "test_", info.test_files))}

  def _generate_examples(self, split_prefix, filepaths):  # pylint: disable=arguments-differ
    label_keys = self._cifar_info.label_keys
    index = 0
    for path in filepaths:
      if not os.path.exists(path):
        raise DataError(f"{path} is missing; --source_dir must hold the dataset's binary version")
      for labels, image in read_cifar_binary(path, len(label_keys)):
        record = {key: int(value) for key, value in zip(label_keys, labels)}
        record["id"] = f"{split_prefix}{index:05d}"
        record["image"] = Image.fromarray(image)
        yield index, record
        index += 1


def _from_files_builder(name: str) -> type:
  """The TFDS builder of `name`, reading local original files; same name, version and features."""
  stock = tfds.builder_cls(name)
  mixin = _CifarFromFiles if name.startswith("cifar") else _IdxFromFiles
  return type(f"{stock.__name__}FromFiles", (mixin, stock), {"name": name}, skip_registration=True)


def prepare(name: str, *, data_dir: str, source_dir: str = "", manual_dir: str = "") -> str:
  """Prepares `name` in `data_dir`; returns the directory written."""
  if name not in PREPARABLE:
    raise DataError(f"cannot prepare {name!r}; choose one of {', '.join(PREPARABLE)}")
  if name == "digits":
    digits.prepare(data_dir)
    return os.path.join(data_dir, "digits")
  if source_dir:
    if name not in FROM_FILES:
      raise DataError(f"--source_dir works for {', '.join(FROM_FILES)}; prepare {name} from the network "
                      "or with --manual_dir")
    if not os.path.isdir(source_dir):
      raise DataError(f"--source_dir={source_dir} is not a directory")
    builder = _from_files_builder(name)(source_dir=source_dir, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir
  if importlib.util.find_spec("tensorflow") is None:
    raise DataError(
        f"preparing {name} from the network encodes images with TensorFlow (tfds 4.9): install it with "
        f"`pip install 'cnnjax[prepare]'`, or pass --source_dir with the original files")
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=download_config)
  return builder.data_dir
