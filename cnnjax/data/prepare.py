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
  encoding by PIL, so no TensorFlow is needed. Every file is read whole and
  checked (`cnnjax.data.readers`: numeric arrays built from the bytes, sizes,
  labels in range, non-empty splits) before anything is written; the pickles
  are read by `readers.load_pickle`, which admits only what they hold.
* From a folder of images in torchvision's ImageFolder layout (`--source_dir`
  with any other name): `DIR/train/<class>/*.png|jpg|...`, and `DIR/test/<class>/`
  and/or `DIR/val/<class>/` (the `test` and `validation` splits); classes are the
  sorted folder names of `train/`, so label i is the i-th name, as torchvision
  numbers them. The layout is what names the format: `--source_dir` with a name
  of the list above reads that dataset's original files, with any other name an
  image folder. Images are decoded with PIL and stored as PNG (lossless), all in
  RGB, or in grayscale when every image is, converted from any mode keeping
  their contrast (`readers.image_array`); one that does not decode stops the
  preparation, and TFDS removes what it had written.

Each prepared dataset records its source in `SOURCE_FILE`; preparing the name
again from another source, or from files that changed, is refused in one line
rather than silently keeping (or replacing) the prepared one.

The digits need none of these: they come from scikit-learn (`cnnjax.data.digits`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax.data import digits, readers
from cnnjax.data.sources import OWN_DATASETS
from cnnjax.errors import DataError

PREPARABLE = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet2012", "oxford_iiit_pet",
              "imdb_reviews")
FROM_FILES = ("mnist", "fashion_mnist", "cifar10", "cifar100")

# The original MNIST-format file names (the same for Fashion-MNIST).
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# An idx header: a magic number (uint8 data, number of axes), then one size per axis, each a big-endian uint32.
IDX_WORD_BYTES = 4
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049
IDX_IMAGE_AXES, IDX_LABEL_AXES = 3, 1
IDX_IMAGE_SIZE, IDX_NUM_CLASSES = (28, 28), 10  # MNIST's and Fashion-MNIST's
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
REDOWNLOAD = "download the dataset again from its authors"
# Image files an image folder may hold (torchvision's list); other files are ignored, as torchvision does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# An image folder's sub-directories and the TFDS splits they become.
IMAGE_FOLDER_SPLITS = {"train": "train", "test": "test", "val": "validation", "validation": "validation"}
IMAGE_FOLDER_VERSION = "1.0.0"
BAD_IMAGE_ADVICE = "remove or replace it"
# What a prepared dataset was prepared from, beside its files (in the version directory).
SOURCE_FILE = "cnnjax_source.json"
NETWORK_SOURCE = {"source_dir": "", "files": 0, "fingerprint": "network"}
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


def _idx_header(f, magic: int, dims: int) -> tuple[int, ...]:
  """The sizes of an idx file's header (count first), checked to be `magic`'s: uint8 data of `dims` axes."""
  header = np.frombuffer(readers.read_exactly(f, (1 + dims) * IDX_WORD_BYTES, "the header"), ">u4")
  if int(header[0]) != magic:
    raise readers.BadFile(f"it is not an idx file of {dims}-axis uint8 data (magic number {int(header[0])}, "
                          f"expected {magic})")
  return tuple(int(n) for n in header[1:])


def read_idx(images_path: str, labels_path: str, image_size: tuple[int, int] = IDX_IMAGE_SIZE,
             num_classes: int = IDX_NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
  """Reads an MNIST-format (idx) image file and label file into (N, H, W, 1) uint8 and (N,) int64, checked:
  magic numbers, image size, as many labels as images, every byte the headers claim and no more, labels
  in [0, num_classes). DataError naming the file otherwise."""
  with readers.refusing(images_path, DataError, REDOWNLOAD), _open_maybe_gzip(images_path) as f:
    count, rows, cols = _idx_header(f, IDX_IMAGES_MAGIC, IDX_IMAGE_AXES)
    if (rows, cols) != tuple(image_size):
      raise readers.BadFile(f"its images are {rows}x{cols}, where this dataset's are "
                            f"{image_size[0]}x{image_size[1]}")
    images = readers.array_from_bytes(readers.read_exactly(f, count * rows * cols, f"{count} images"),
                                      np.uint8, (count, rows, cols, 1))
    readers.check_at_end(f, f"{count} images")
    readers.check_examples(count, "it")
  with readers.refusing(labels_path, DataError, REDOWNLOAD), _open_maybe_gzip(labels_path) as f:
    (label_count,) = _idx_header(f, IDX_LABELS_MAGIC, IDX_LABEL_AXES)
    if label_count != count:
      raise readers.BadFile(f"it holds {label_count} labels for the {count} images of {images_path}")
    labels = readers.array_from_bytes(readers.read_exactly(f, count, f"{count} labels"), np.uint8, (count,))
    readers.check_at_end(f, f"{count} labels")
    readers.check_labels(labels, num_classes, "it")
  return images, labels.astype(np.int64)


def read_cifar_binary(path: str, label_classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(labels (N, len(label_classes)) int64, images (N, 32, 32, 3) uint8) of a CIFAR binary batch: per
  record, one byte per label feature, then 3x32x32 planes. Labels are checked against each feature's
  number of classes; DataError naming the file otherwise."""
  record = len(label_classes) + CIFAR_IMAGE_BYTES
  with readers.refusing(path, DataError, REDOWNLOAD):
    size = os.path.getsize(path)
    if size % record:
      raise readers.BadFile(f"it is {size} bytes, not a whole number of {record}-byte CIFAR records")
    with open(path, "rb") as f:
      data = readers.array_from_bytes(readers.read_exactly(f, size, "its records"), np.uint8,
                                      (size // record, record))
    labels = data[:, :len(label_classes)].astype(np.int64)
    for column, num_classes in enumerate(label_classes):
      readers.check_labels(labels[:, column], num_classes, "it")
  images = data[:, len(label_classes):].reshape((-1,) + CIFAR_IMAGE_SHAPE).transpose(0, 2, 3, 1)
  return labels, np.ascontiguousarray(images)


def read_cifar_pickle(path: str) -> dict[bytes, Any]:
  """The dict of a CIFAR python batch or meta file, read by `readers.load_pickle` (which builds its arrays
  itself and runs nothing); DataError when the file is not one."""
  if not os.path.exists(path):
    raise DataError(f"{path} is missing; --source_dir must hold the dataset's original files")
  try:
    payload = readers.load_pickle(path)
  except Exception as e:  # pylint: disable=broad-except  (any failure to unpickle means a bad file)
    why = str(e) if isinstance(e, readers.BadFile) else readers.short(e)
    raise DataError(f"{path} is not a CIFAR python batch ({why}); refused without running it: "
                    f"{REDOWNLOAD}") from None
  if not isinstance(payload, dict) or not all(isinstance(key, bytes) for key in payload):
    raise DataError(f"{path} holds a {type(payload).__name__}, not the dict of a CIFAR python batch; "
                    f"{REDOWNLOAD}")
  return payload


def _labels_list(values: Any, count: int, num_classes: int) -> np.ndarray:
  """A pickled label list (or 1-D integer array) of `count` labels in [0, num_classes), as int64."""
  if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iu":
    values = values.tolist()
  if not isinstance(values, list) or len(values) != count or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise readers.BadFile(f"its labels are not a list of {count} integers")
  outside = [v for v in values if not 0 <= v < num_classes]
  if outside:
    raise readers.BadFile(f"it holds {len(outside)} label(s) outside [0, {num_classes}) (e.g. {outside[0]})")
  return np.asarray(values, np.int64)


def _cifar_python_batch(path: str, label_keys: dict[str, tuple[bytes, int]]
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(images (N, 32, 32, 3) uint8, {TFDS label feature: labels}) of one CIFAR python batch, checked;
  `label_keys` gives each feature's key in the pickle and its number of classes."""
  batch = read_cifar_pickle(path)
  data = batch.get(b"data")
  with readers.refusing(path, DataError, REDOWNLOAD):
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
        or data.shape[1] != CIFAR_IMAGE_BYTES):
      raise readers.BadFile(f"b'data' is not a uint8 array of shape (N, {CIFAR_IMAGE_BYTES})")
    labels = {feature: _labels_list(batch.get(key), len(data), num_classes)
              for feature, (key, num_classes) in label_keys.items()}
  return np.ascontiguousarray(data.reshape((-1,) + CIFAR_IMAGE_SHAPE).transpose(0, 2, 3, 1)), labels


def _class_names(path: str, names: Any, num_classes: int) -> list[str]:
  """Class names read from a dataset's meta file: as many as it has classes, as text."""
  if isinstance(names, list) and all(isinstance(n, bytes) for n in names):
    names = [n.decode("utf-8") for n in names]
  if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) and n for n in names):
    raise readers.BadFile(f"it does not name the {num_classes} classes of the dataset")
  return names


def _split_arrays(builder: Any, generators: dict[str, tuple[str, np.ndarray, dict[str, np.ndarray]]]) -> dict:
  """TFDS split generators over arrays read (and checked) whole before anything is written."""
  for split, (_, images, _) in generators.items():
    if not len(images):
      raise DataError(f"the {split} split of {builder.name} in --source_dir={builder.source_dir} holds no "
                      f"examples; {REDOWNLOAD}")
  return {split: builder.generate_from_arrays(prefix, images, labels)
          for split, (prefix, images, labels) in generators.items()}


class _FromFiles:
  """What the builders reading local original files share: the directory, and generating from arrays."""

  def __init__(self, *, source_dir: str, **kwargs: Any):
    self.source_dir = source_dir
    super().__init__(**kwargs)

  def generate_from_arrays(self, split_prefix: str, images: np.ndarray, labels: dict[str, np.ndarray]):
    for index, image in enumerate(images):
      record = {feature: int(values[index]) for feature, values in labels.items()}
      if split_prefix:
        record["id"] = f"{split_prefix}{index:05d}"
      record["image"] = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      yield index, record

  def _num_classes(self, feature: str) -> int:
    return self.info.features[feature].num_classes


class _IdxFromFiles(_FromFiles):
  """Mixin for the MNIST-family builders: read the idx files from a local directory."""

  def check_source(self) -> None:
    """DataError unless every original file is there (checked before TFDS starts writing)."""
    self.source_files()

  def source_files(self) -> list[str]:
    return [_existing_maybe_gzip(os.path.join(self.source_dir, name))[0]
            for names in IDX_FILES.values() for name in names]

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    image_size = tuple(self.info.features["image"].shape[:2])
    arrays = {}
    for split, names in IDX_FILES.items():
      images, labels = read_idx(*(os.path.join(self.source_dir, name) for name in names), image_size=image_size,
                                num_classes=self._num_classes("label"))
      arrays[split] = ("", images, {"label": labels})
    return _split_arrays(self, arrays)


class _CifarFromFiles(_FromFiles):
  """Mixin for the CIFAR builders: read the binary batches, or the python (pickle) ones, from a local
  directory (or its `cifar-10-batches-bin/`, `cifar-10-batches-py/`, ... sub-directory). Every file is read
  and checked before anything is written."""

  def check_source(self) -> None:
    """DataError unless --source_dir holds either version (checked before TFDS starts writing)."""
    self._cifar_layout()

  def source_files(self) -> list[str]:
    directory, _ = self._cifar_layout()
    return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                  if os.path.isfile(os.path.join(directory, name)))

  def _cifar_layout(self) -> tuple[str, str]:
    """(directory, 'binary' or 'python') of the original files under --source_dir."""
    info, python = self._cifar_info, CIFAR_PYTHON[self.name]
    first_python = os.path.splitext(info.train_files[0])[0]
    for directory in (os.path.join(self.source_dir, info.prefix), os.path.join(self.source_dir, python["directory"]),
                      self.source_dir):
      if os.path.exists(os.path.join(directory, info.train_files[0])):
        return directory, "binary"
      if os.path.exists(os.path.join(directory, first_python)):
        return directory, "python"
    raise DataError(f"{self.source_dir} holds neither {self.name}'s binary version "
                    f"({os.path.join(info.prefix, info.train_files[0])}) nor its python version ({python['directory']}/{first_python}); "
                    "--source_dir must hold the dataset's original files")

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    info = self._cifar_info
    directory, version = self._cifar_layout()
    splits = (("train", "train_", info.train_files), ("test", "test_", info.test_files))
    if version == "python":
      return _split_arrays(self, self._python_splits(directory, splits))
    for key, names_file in zip(info.label_keys, info.label_files):
      path = os.path.join(directory, names_file)
      if os.path.exists(path):
        with readers.refusing(path, DataError, REDOWNLOAD), open(path, encoding="utf-8") as f:
          names = [name for name in f.read().split("\n") if name]
          self.info.features[key].names = _class_names(path, names, self._num_classes(key))
    label_classes = [self._num_classes(key) for key in info.label_keys]
    arrays = {}
    for split, prefix, files in splits:
      paths = [os.path.join(directory, f) for f in files]
      missing = [path for path in paths if not os.path.exists(path)]
      if missing:
        raise DataError(f"{missing[0]} is missing; --source_dir must hold the dataset's binary version")
      batches = [read_cifar_binary(path, label_classes) for path in paths]
      labels = np.concatenate([b[0] for b in batches])
      arrays[split] = (prefix, np.concatenate([b[1] for b in batches]),
                       {key: labels[:, column] for column, key in enumerate(info.label_keys)})
    return _split_arrays(self, arrays)

  def _python_splits(self, directory: str, splits) -> dict[str, Any]:
    """Reads (and checks) every pickle: {split: (id prefix, images, {feature: labels})}."""
    python = CIFAR_PYTHON[self.name]
    label_keys = {feature: (keys[0], self._num_classes(feature)) for feature, keys in python["labels"].items()}
    meta_path = os.path.join(directory, python["meta"])
    if os.path.exists(meta_path):
      meta = read_cifar_pickle(meta_path)
      with readers.refusing(meta_path, DataError, REDOWNLOAD):
        for feature, (_, names_key) in python["labels"].items():
          self.info.features[feature].names = _class_names(meta_path, meta.get(names_key),
                                                           self._num_classes(feature))
    arrays = {}
    for split, prefix, files in splits:
      batches = [_cifar_python_batch(os.path.join(directory, os.path.splitext(f)[0]), label_keys) for f in files]
      arrays[split] = (prefix, np.concatenate([b[0] for b in batches]),
                       {feature: np.concatenate([b[1][feature] for b in batches]) for feature in label_keys})
    return arrays


class ImageFolderLayout:
  """The images of a torchvision ImageFolder directory: per split, (path, label) pairs; the sorted classes;
  the image shape ((None, None, C) when sizes vary) and channels (3, or 1 when every image is grayscale)."""

  def __init__(self, root: str):
    self.root = root
    with readers.refusing(root, DataError, "make the folder and its files readable"):
      self._scan()

  def _scan(self) -> None:
    train_dir = os.path.join(self.root, "train")
    self.classes = sorted(name for name in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, name)))
    if not self.classes:
      raise DataError(f"{train_dir} has no class folders; an image folder holds train/<class>/*.png|jpg")
    for name in self.classes:
      # Class names are stored as UTF-8 text, one per line: a name that cannot be (a file system's
      # undecodable bytes, which Python holds as unprintable surrogates; a newline) would fail half-way or
      # shift every later name.
      if readers.printable(name) != name:
        raise DataError(f"{readers.printable(os.path.join(train_dir, name))}: a class folder's name must be "
                        "printable UTF-8 text (no control characters or undecodable bytes); rename it")
    self.splits: dict[str, list[tuple[str, int]]] = {}
    for folder, split in IMAGE_FOLDER_SPLITS.items():
      directory = os.path.join(self.root, folder)
      if not os.path.isdir(directory):
        continue
      if split in self.splits:
        raise DataError(f"{self.root} has both val/ and validation/; keep one")
      self.splits[split] = self._files(directory)
    sizes, modes = set(), set()
    for files in self.splits.values():
      for path, _ in files:
        with readers.refusing(path, DataError, BAD_IMAGE_ADVICE, "image"), Image.open(path) as image:
          sizes.add(image.size)
          modes.add(image.mode)
    self.channels = readers.image_channels(modes)
    (width, height), = sizes if len(sizes) == 1 else ((None, None),)
    self.shape = (height, width, self.channels)

  def _files(self, directory: str) -> list[tuple[str, int]]:
    files = []
    for name in sorted(os.listdir(directory)):
      class_dir = os.path.join(directory, name)
      if not os.path.isdir(class_dir):
        continue
      if name not in self.classes:
        raise DataError(f"{readers.printable(class_dir)}: class {name!r} has no folder in {os.path.join(self.root, 'train')}; "
                        "every class needs training images")
      images = []
      for entry in sorted(os.listdir(class_dir)):
        path = os.path.join(class_dir, entry)
        if not entry.lower().endswith(IMAGE_EXTENSIONS) or os.path.isdir(path):
          continue
        if not os.path.isfile(path):
          # A link to nothing (or a device, a pipe): skipping it would silently leave an image out.
          raise DataError(f"{readers.printable(path)} is not a readable file (a broken symbolic link?); restore "
                          "its target or remove it")
        images.append(path)
      if not images and directory.endswith("train"):
        raise DataError(f"{readers.printable(class_dir)} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
      files.extend((path, self.classes.index(name)) for path in images)
    return files

  @property
  def files(self) -> list[str]:
    """Every image path, split by split."""
    return [path for files in self.splits.values() for path, _ in files]

  def read(self, path: str) -> Image.Image:
    """The image at `path` in the dataset's mode (RGB, or L for grayscale datasets), decoded whole and
    converted by `readers.image_array` (16-bit images scaled, not clipped); DataError for a file that
    does not decode (truncated, damaged)."""
    with readers.refusing(path, DataError, BAD_IMAGE_ADVICE, "image"), Image.open(path) as image:
      pixels = readers.image_array(image, self.channels)
      if (None not in self.shape[:2]) and pixels.shape[:2] != self.shape[:2]:
        raise readers.BadFile(f"it is {pixels.shape[1]}x{pixels.shape[0]}, not the "
                              f"{self.shape[1]}x{self.shape[0]} it was when the folder was scanned")
    return Image.fromarray(pixels[..., 0] if self.channels == 1 else pixels)


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


def check_data_dir(data_dir: str) -> None:
  """DataError unless `data_dir` is (or can become) a directory this process may write."""
  existing = os.path.abspath(data_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise DataError(f"the TFDS data directory {data_dir} is (or lies under) the file {existing}; pass --data_dir "
                    "(or set $TFDS_DATA_DIR) to a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise DataError(f"the TFDS data directory {data_dir} cannot be written ({existing} is read-only for this "
                    "user); pass --data_dir (or set $TFDS_DATA_DIR) to a writable directory")


def source_record(source_dir: str, files: Sequence[str]) -> dict[str, Any]:
  """What a dataset was prepared from: the source directory, and a fingerprint of the files read (their
  paths, sizes and modification times: what changes when a file is replaced or edited, without reading
  every byte again)."""
  root = os.path.abspath(source_dir)
  entries = []
  for path in sorted(files):
    stat = os.stat(path)
    entries.append([os.path.relpath(os.path.abspath(path), root), stat.st_size, stat.st_mtime_ns])
  digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
  return {"source_dir": root, "files": len(entries), "fingerprint": digest}


def _describe(record: dict[str, Any] | None) -> str:
  if not record:
    return "a source it did not record (an earlier cnnjax, or the network)"
  if not record.get("source_dir"):
    return "the network"
  return f"{record['source_dir']} ({record.get('files')} files)"


def _recorded_source(builder: Any) -> dict[str, Any] | None:
  path = os.path.join(builder.data_dir, SOURCE_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
    return record if isinstance(record, dict) else None
  except (OSError, ValueError):
    return None


def _is_prepared(builder: Any) -> bool:
  try:
    return builder.is_prepared()
  except Exception as e:  # pylint: disable=broad-except  (damaged metadata fails in many ways)
    raise DataError(f"{builder.name} in {builder.data_dir} is damaged ({readers.short(e)}); move that directory "
                    "aside and prepare it again") from None


def _prepare_recording_source(builder: Any, record: dict[str, Any], **kwargs: Any) -> str:
  """Prepares with `builder` unless it is already prepared from the same source, and records the source.

  A dataset prepared from another source, or from this one before its files
  changed, is refused in one line rather than silently kept (TFDS would skip a
  prepared dataset) or silently replaced (which would lose it).
  """
  if _is_prepared(builder):
    existing = _recorded_source(builder)
    # A dataset prepared without a record by TFDS itself came from the network.
    if existing == record or (existing is None and record == NETWORK_SOURCE):
      return builder.data_dir
    changed = bool(existing) and existing.get("source_dir") == record["source_dir"]
    now = (f"{record['source_dir']} has changed since ({record['files']} files now)" if changed else
           f"preparing it from {_describe(record)} would replace it")
    raise DataError(f"{builder.name} is already prepared in {builder.data_dir} from {_describe(existing)}; {now}: "
                    "move that directory aside (nothing is deleted for you) and rerun, or prepare under another "
                    "name")
  builder.download_and_prepare(**kwargs)
  path = os.path.join(builder.data_dir, SOURCE_FILE)
  with open(f"{path}.{os.getpid()}.tmp", "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(f"{path}.{os.getpid()}.tmp", path)
  return builder.data_dir


def prepare(name: str, *, data_dir: str, source_dir: str = "", manual_dir: str = "") -> str:
  """Prepares `name` in `data_dir` and records its source there (`SOURCE_FILE`); returns the directory
  written. Refuses, in one line, a dataset already prepared from another source or from files that have
  changed since."""
  check_data_dir(data_dir)
  if name == "digits":
    if source_dir:
      raise DataError("the digits come with scikit-learn and read no files: drop --source_dir (or, for a folder "
                      "of digit images, prepare it under a name of its own)")
    digits.prepare(data_dir)
    return os.path.join(data_dir, "digits")
  if source_dir:
    if not os.path.isdir(source_dir):
      raise DataError(f"--source_dir={source_dir} is not a directory")
    if name in FROM_FILES:
      builder = _from_files_builder(name)(source_dir=source_dir, data_dir=data_dir, file_format="array_record")
      builder.check_source()
      files = builder.source_files()
    elif is_image_folder(source_dir):
      if not DATASET_NAME.match(name) or name in OWN_DATASETS or _tfds_knows(name):
        raise DataError(f"name the image folder's dataset otherwise than {name!r}: a new lower-case name "
                        "(letters, digits, _) that is neither a TFDS dataset nor one of cnnjax's")
      layout = ImageFolderLayout(source_dir)
      builder = _image_folder_builder(name, layout)(data_dir=data_dir, file_format="array_record")
      files = layout.files
    else:
      raise DataError(f"--source_dir={source_dir} has no train/ folder, so it is not an image folder "
                      f"(DIR/train/<class>/*.png|jpg); original files are read for {', '.join(FROM_FILES)} only")
    return _prepare_recording_source(builder, source_record(source_dir, files))
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
  return _prepare_recording_source(builder, NETWORK_SOURCE, download_config=download_config)
