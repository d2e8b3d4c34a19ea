"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset.

scikit-learn ships 1,797 8x8 grayscale digits (values 0-16) with the package, so
they need no download. They are written once into the TFDS data directory as a
real TFDS dataset (ArrayRecord files, PNG-encoded images, the same `Image` and
`ClassLabel` features as MNIST or CIFAR-10), so that they flow through exactly the
same reading code as every other dataset. Images are encoded with PIL, which is
why preparation needs no TensorFlow.

The train/test split is fixed: a permutation drawn once with seed 0, 1,437
training and 360 test images.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax.errors import DataError

NAME = "digits"
SPLIT_SEED = 0
NUM_TEST = 360
# scikit-learn stores pixel intensities as integers 0..16.
SKLEARN_MAX_INTENSITY = 16


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  import sklearn.datasets  # pylint: disable=import-outside-toplevel  (slow import, only when preparing)
  digits = sklearn.datasets.load_digits()
  images = np.round(digits.images * (255.0 / SKLEARN_MAX_INTENSITY)).astype(np.uint8)
  return images, digits.target.astype(np.int64)


def split_indices(num_examples: int) -> dict[str, np.ndarray]:
  """The fixed train/test split of the digits, as indices into scikit-learn's order."""
  permutation = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
  return {"train": np.sort(permutation[NUM_TEST:]), "test": np.sort(permutation[:NUM_TEST])}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (UCI optical recognition test set)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fixed 1,437/360 train/test split drawn with seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's bundled 8x8 handwritten digits, intensities scaled to 0-255.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from the installed scikit-learn package.
    images, labels = _digits_arrays()
    return {split: self._generate_examples(images[idx], labels[idx], idx)
            for split, idx in split_indices(len(labels)).items()}

  def _generate_examples(self, images, labels, ids):
    for image, label, example_id in zip(images, labels, ids):
      yield int(example_id), {"image": Image.fromarray(image), "label": int(label)}


def prepare(data_dir: str | None) -> None:
  """Writes the digits into `data_dir` unless they are already there (about a second)."""
  try:
    builder = Digits(data_dir=data_dir, file_format="array_record")
    prepared = builder.is_prepared()
  except Exception as error:  # pylint: disable=broad-except  (TFDS fails in many ways on damaged metadata)
    raise DataError(f"the digits in the TFDS data directory {data_dir} are damaged ({type(error).__name__}: "
                    f"{' '.join(str(error).split())[:120]}); move {os.path.join(data_dir or '', 'digits')} aside "
                    "and rerun to write them again, or set data.tfds_data_dir") from None
  if prepared:
    return
  if not sys.stderr.isatty():
    # The first run writes the digits: its log (a file, a pipe) gets no progress-bar debris.
    tfds.display_progress_bar(False)
  try:
    builder.download_and_prepare()
  except Exception as error:  # pylint: disable=broad-except
    # Another process (a second host of a multi-process run) may have finished first.
    if Digits(data_dir=data_dir, file_format="array_record").is_prepared():
      return
    if isinstance(error, OSError) or "Read-only" in str(error) or "Permission denied" in str(error):
      raise DataError(f"the digits cannot be written into the TFDS data directory {data_dir} "
                      f"({' '.join(str(error).split())[:120]}); set data.tfds_data_dir (or $TFDS_DATA_DIR) to a "
                      "writable directory") from None
    raise
