"""Preparing TFDS datasets once, so that training can read them with `tfds.data_source`.

Three ways, all writing the canonical TFDS layout (`DATA_DIR/NAME/VERSION/`,
the builder's features, ArrayRecord files) that training reads without TensorFlow:

* From the network, with TFDS's own builders (any dataset TFDS knows, e.g.
  `svhn_cropped`): `download_and_prepare`. In tfds 4.9 this needs TensorFlow
  (its downloader, extractor and PNG encoder call `tf.*`), which the `prepare`
  extra brings: `pip install -e '.[prepare]'`.
* From the original files already on disk (`--source_dir`, for machines without
  network): MNIST and Fashion-MNIST idx files, CIFAR-10 and CIFAR-100 in their
  binary or python (pickle) versions. The TFDS builder classes are reused for
  their metadata and features; only reading the files is replaced by NumPy and
  encoding by PIL, so no TensorFlow is needed. The pickles are read by
  `read_cifar_pickle`, which admits only what they hold.
* From a folder of images in torchvision's ImageFolder layout (`--source_dir`
  with any other name): `DIR/train/<class>/*.png|jpg|...`, and `DIR/test/<class>/`
  and/or `DIR/val/<class>/` (the `test` and `validation` splits); classes are the
  sorted folder names of `train/`, so label i is the i-th name, as torchvision
  numbers them. The layout is what names the format: `--source_dir` with a name
  of the list above reads that dataset's original files, with any other name an
  image folder. Images are decoded with PIL and stored as PNG (lossless), all in
  RGB, or in grayscale when every image is.

The digits need none of these: they come from scikit-learn (`cnnjax.data.digits`).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax.data import digits
from cnnjax.data.sources import OWN_DATASETS
from cnnjax.errors import DataError

PREPARABLE = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet2012", "oxford_iiit_pet",
              "imdb_reviews")
FROM_FILES = ("mnist", "fashion_mnist", "cifar10", "cifar100")

# The original MNIST-format file names (the same for Fashion-MNIST).
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGE_HEADER_BYTES, IDX_LABEL_HEADER_BYTES = 16, 8
CIFAR_IMAGE_BYTES = 32 * 32 * 3
CIFAR_IMAGE_SHAPE = (3, 32, 32)  # how a CIFAR record stores an image: channel planes
# The python (pickle) versions: their directory, meta file, and which pickled label list fills which TFDS
# label feature (and which name list names it).
CIFAR_PYTHON = {
    "cifar10": dict(directory="cifar-10-batches-py", meta="batches.meta",
                    labels={"label": (b"labels", b"label_names")}),
    "cifar100": dict(directory="cifar-100-python", meta="meta",
                     labels={"label": (b"fine_labels", b"fine_label_names"),
                             "coarse_label": (b"coarse_labels", b"coarse_label_names")}),
}
# The only globals a CIFAR pickle refers to: NumPy's array reconstruction (module renamed in NumPy 2).
CIFAR_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                        ("numpy", "ndarray"), ("numpy", "dtype")}
# Image files an image folder may hold (torchvision's list); other files are ignored, as torchvision does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# An image folder's sub-directories and the TFDS splits they become.
IMAGE_FOLDER_SPLITS = {"train": "train", "test": "test", "val": "validation", "validation": "validation"}
IMAGE_FOLDER_VERSION = "1.0.0"
# What a dataset prepared from an image folder may be called: a TFDS name of its own.
DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _existing_maybe_gzip(path: str) -> tuple[str, Any]:
  """(path or path.gz, the opener for it), whichever exists; DataError when neither does."""
  for candidate, opener in ((path, open), (path + ".gz", gzip.open)):
    if os.path.exists(candidate):
      return candidate, opener
  raise DataError(f"{path}[.gz] is missing; --source_dir must hold the original files of the dataset")


def _open_maybe_gzip(path: str):
  candidate, opener = _existing_maybe_gzip(path)
  return opener(candidate, "rb")


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


class _CifarUnpickler(pickle.Unpickler):
  """Unpickles a CIFAR python batch: dicts, lists, byte strings and numbers, and NumPy arrays, nothing else.

  A pickle names the functions it calls when loaded (`find_class`); any but
  NumPy's array reconstruction is refused, so a tampered file cannot run code.
  """

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in CIFAR_PICKLE_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"it asks to load {module}.{name}")


def read_cifar_pickle(path: str) -> dict[bytes, Any]:
  """The dict of a CIFAR python batch or meta file, read with `_CifarUnpickler`; DataError when the file is
  not one (including a pickle that would run code)."""
  try:
    with open(path, "rb") as f:
      # encoding='bytes': the files were written by Python 2, whose str are bytes.
      payload = _CifarUnpickler(f, encoding="bytes").load()
  except FileNotFoundError:
    raise DataError(f"{path} is missing; --source_dir must hold the dataset's original files") from None
  except Exception as e:  # pylint: disable=broad-except  (any failure to unpickle means a bad file)
    raise DataError(f"{path} is not a CIFAR python batch ({' '.join(str(e).split())[:160]}); refused without "
                    "running it: download the dataset again from its authors") from None
  if not isinstance(payload, dict) or not all(isinstance(key, bytes) for key in payload):
    raise DataError(f"{path} holds a {type(payload).__name__}, not the dict of a CIFAR python batch; download the "
                    "dataset again")
  return payload


def _cifar_python_batch(path: str, label_keys: dict[str, bytes]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(images (N, 32, 32, 3) uint8, {TFDS label feature: labels}) of one CIFAR python batch, checked."""
  batch = read_cifar_pickle(path)
  data = batch.get(b"data")
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_IMAGE_BYTES:
    raise DataError(f"{path}: b'data' is not a uint8 array of shape (N, {CIFAR_IMAGE_BYTES}); download the "
                    "dataset again")
  labels = {}
  for feature, key in label_keys.items():
    values = batch.get(key)
    if not isinstance(values, list) or len(values) != len(data) or not all(isinstance(v, int) for v in values):
      raise DataError(f"{path}: {key!r} is not a list of {len(data)} integer labels; download the dataset again")
    labels[feature] = np.asarray(values, np.int64)
  return data.reshape((-1,) + CIFAR_IMAGE_SHAPE).transpose(0, 2, 3, 1), labels


class _IdxFromFiles:
  """Mixin for the MNIST-family builders: read the idx files from a local directory."""

  def __init__(self, *, source_dir: str, **kwargs: Any):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def check_source(self) -> None:
    """DataError unless every original file is there (checked before TFDS starts writing)."""
    for names in IDX_FILES.values():
      for name in names:
        _existing_maybe_gzip(os.path.join(self._source_dir, name))

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    return {split: self._generate_examples(*(os.path.join(self._source_dir, name) for name in names))
            for split, names in IDX_FILES.items()}

  def _generate_examples(self, images_path, labels_path):  # pylint: disable=arguments-differ
    images, labels = read_idx(images_path, labels_path)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": Image.fromarray(image[..., 0]), "label": int(label)}


class _CifarFromFiles:
  """Mixin for the CIFAR builders: read the binary batches, or the python (pickle) ones, from a local
  directory (or its `cifar-10-batches-bin/`, `cifar-10-batches-py/`, ... sub-directory)."""

  def __init__(self, *, source_dir: str, **kwargs: Any):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def check_source(self) -> None:
    """DataError unless --source_dir holds either version (checked before TFDS starts writing)."""
    self._cifar_layout()

  def _cifar_layout(self) -> tuple[str, str]:
    """(directory, 'binary' or 'python') of the original files under --source_dir."""
    info, python = self._cifar_info, CIFAR_PYTHON[self.name]
    first_python = os.path.splitext(info.train_files[0])[0]
    for directory in (os.path.join(self._source_dir, info.prefix), os.path.join(self._source_dir, python["directory"]),
                      self._source_dir):
      if os.path.exists(os.path.join(directory, info.train_files[0])):
        return directory, "binary"
      if os.path.exists(os.path.join(directory, first_python)):
        return directory, "python"
    raise DataError(f"{self._source_dir} holds neither {self.name}'s binary version "
                    f"({os.path.join(info.prefix, info.train_files[0])}) nor its python version ({python['directory']}/{first_python}); "
                    "--source_dir must hold the dataset's original files")

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    info = self._cifar_info
    directory, version = self._cifar_layout()
    splits = (("train", "train_", info.train_files), ("test", "test_", info.test_files))
    if version == "python":
      return self._python_splits(directory, splits)
    for key, names_file in zip(info.label_keys, info.label_files):
      path = os.path.join(directory, names_file)
      if os.path.exists(path):
        with open(path) as f:
          self.info.features[key].names = [name for name in f.read().split("\n") if name]
    return {split: self._generate_examples(prefix, [os.path.join(directory, f) for f in files])
            for split, prefix, files in splits}

  def _python_splits(self, directory: str, splits) -> dict[str, Any]:
    """Reads (and checks) every pickle before anything is written, then generates from the arrays."""
    python = CIFAR_PYTHON[self.name]
    label_keys = {feature: keys[0] for feature, keys in python["labels"].items()}
    meta_path = os.path.join(directory, python["meta"])
    if os.path.exists(meta_path):
      meta = read_cifar_pickle(meta_path)
      for feature, (_, names_key) in python["labels"].items():
        names = meta.get(names_key)
        if isinstance(names, list) and all(isinstance(n, bytes) for n in names):
          self.info.features[feature].names = [n.decode() for n in names]
    generators = {}
    for split, prefix, files in splits:
      batches = [_cifar_python_batch(os.path.join(directory, os.path.splitext(f)[0]), label_keys) for f in files]
      images = np.concatenate([b[0] for b in batches])
      labels = {feature: np.concatenate([b[1][feature] for b in batches]) for feature in label_keys}
      generators[split] = self._generate_from_arrays(prefix, images, labels)
    return generators

  def _generate_from_arrays(self, split_prefix, images, labels):
    for index, image in enumerate(images):
      record = {feature: int(values[index]) for feature, values in labels.items()}
      record["id"] = f"{split_prefix}{index:05d}"
      record["image"] = Image.fromarray(image)
      yield index, record

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


class ImageFolderLayout:
  """The images of a torchvision ImageFolder directory: per split, (path, label) pairs; the sorted classes;
  the image shape ((None, None, C) when sizes vary) and channels (3, or 1 when every image is grayscale)."""

  def __init__(self, root: str):
    self.root = root
    train_dir = os.path.join(root, "train")
    self.classes = sorted(name for name in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, name)))
    if not self.classes:
      raise DataError(f"{train_dir} has no class folders; an image folder holds train/<class>/*.png|jpg")
    self.splits: dict[str, list[tuple[str, int]]] = {}
    for folder, split in IMAGE_FOLDER_SPLITS.items():
      directory = os.path.join(root, folder)
      if not os.path.isdir(directory):
        continue
      if split in self.splits:
        raise DataError(f"{root} has both val/ and validation/; keep one")
      self.splits[split] = self._files(directory)
    sizes, modes = set(), set()
    for files in self.splits.values():
      for path, _ in files:
        try:
          with Image.open(path) as image:
            sizes.add(image.size)
            modes.add(image.mode)
        except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds for a bad file)
          raise DataError(f"{path} is not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
                          "; remove or replace it") from None
    self.channels = 1 if modes <= {"L", "1", "I;16", "I", "F"} else 3
    (width, height), = sizes if len(sizes) == 1 else ((None, None),)
    self.shape = (height, width, self.channels)

  def _files(self, directory: str) -> list[tuple[str, int]]:
    files = []
    for name in sorted(os.listdir(directory)):
      class_dir = os.path.join(directory, name)
      if not os.path.isdir(class_dir):
        continue
      if name not in self.classes:
        raise DataError(f"{class_dir}: class {name!r} has no folder in {os.path.join(self.root, 'train')}; "
                        "every class needs training images")
      images = [os.path.join(class_dir, f) for f in sorted(os.listdir(class_dir))
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(class_dir, f))]
      if not images and directory.endswith("train"):
        raise DataError(f"{class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
      files.extend((path, self.classes.index(name)) for path in images)
    return files

  def read(self, path: str) -> Image.Image:
    """The image at `path` in the dataset's mode (RGB, or L for grayscale datasets)."""
    with Image.open(path) as image:
      return image.convert("L" if self.channels == 1 else "RGB")


def is_image_folder(directory: str) -> bool:
  return os.path.isdir(os.path.join(directory, "train"))


def _image_folder_builder(name: str, layout: ImageFolderLayout) -> type:
  """A TFDS builder named `name` that writes the image folder as a dataset of `image` and `label`."""

  class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images in torchvision's ImageFolder layout."""

    VERSION = tfds.core.Version(IMAGE_FOLDER_VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
          builder=self, description=f"Images from the folder {layout.root} (torchvision's ImageFolder layout).",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=layout.shape, dtype=np.uint8),
              "label": tfds.features.ClassLabel(names=layout.classes)}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager  # The files are local.
      return {split: self._generate_examples(files) for split, files in layout.splits.items()}

    def _generate_examples(self, files):  # pylint: disable=arguments-differ
      for index, (path, label) in enumerate(files):
        yield index, {"image": layout.read(path), "label": label}

  ImageFolderBuilder.name = name
  return ImageFolderBuilder


def _from_files_builder(name: str) -> type:
  """The TFDS builder of `name`, reading local original files; same name, version and features."""
  stock = tfds.builder_cls(name)
  mixin = _CifarFromFiles if name.startswith("cifar") else _IdxFromFiles
  return type(f"{stock.__name__}FromFiles", (mixin, stock), {"name": name}, skip_registration=True)


def _tfds_knows(name: str) -> bool:
  try:
    tfds.builder_cls(name)
    return True
  except Exception:  # pylint: disable=broad-except  (DatasetNotFoundError and malformed names)
    return False


def prepare(name: str, *, data_dir: str, source_dir: str = "", manual_dir: str = "") -> str:
  """Prepares `name` in `data_dir`; returns the directory written."""
  if name == "digits":
    digits.prepare(data_dir)
    return os.path.join(data_dir, "digits")
  if source_dir:
    if not os.path.isdir(source_dir):
      raise DataError(f"--source_dir={source_dir} is not a directory")
    if name in FROM_FILES:
      builder = _from_files_builder(name)(source_dir=source_dir, data_dir=data_dir, file_format="array_record")
      builder.check_source()
    elif is_image_folder(source_dir):
      if not DATASET_NAME.match(name) or name in OWN_DATASETS or _tfds_knows(name):
        raise DataError(f"name the image folder's dataset otherwise than {name!r}: a new lower-case name "
                        "(letters, digits, _) that is neither a TFDS dataset nor one of cnnjax's")
      builder = _image_folder_builder(name, ImageFolderLayout(source_dir))(data_dir=data_dir,
                                                                           file_format="array_record")
    else:
      raise DataError(f"--source_dir={source_dir} has no train/ folder, so it is not an image folder "
                      f"(DIR/train/<class>/*.png|jpg); original files are read for {', '.join(FROM_FILES)} only")
    builder.download_and_prepare()
    return builder.data_dir
  if name not in PREPARABLE and not _tfds_knows(name):
    raise DataError(f"TFDS knows no dataset {name!r}; give a TFDS name (e.g. {', '.join(PREPARABLE[1:4])}, "
                    "svhn_cropped), or --source_dir with an image folder (DIR/train/<class>/*.png|jpg)")
  if importlib.util.find_spec("tensorflow") is None:
    offline = (f", or pass --source_dir with the original files ({', '.join(FROM_FILES)})" if name in FROM_FILES
               else "")
    raise DataError(
        f"preparing {name} from the network encodes images with TensorFlow (tfds 4.9): install it with "
        f"`pip install -e '.[prepare]'` in this checkout{offline}")
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=download_config)
  return builder.data_dir
