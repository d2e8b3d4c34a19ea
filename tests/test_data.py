"""Data: digits builder, npz source and its errors, mock TFDS, augmentation determinism, epochs, eval masking."""

import collections
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax.data import (ArraySource, Augment, Preprocess, ProcessSlice, eval_dataset, open_dataset,
                         train_dataset)
from cnnjax.data import digits, sources
from cnnjax.data.preprocess import crop_batch, resize_batch, resize_matrix, rotate_batch
from cnnjax.errors import DataError


def identity_preprocess(**kwargs):
  return Preprocess(image_size=0, mean=(0.0,), std=(1 / 255.0,), **kwargs)


def test_digits_is_a_real_tfds_dataset_with_a_fixed_split(tfds_data_dir):
  dataset = open_dataset("digits", tfds_data_dir=tfds_data_dir)
  assert (len(dataset.train), len(dataset.eval), dataset.num_classes) == (1437, 360, 10)
  assert dataset.image_shape == (8, 8, 1)
  record = dataset.train[0]
  assert record["image"].dtype == np.uint8 and record["image"].shape == (8, 8, 1)
  # Same split as the builder's definition, disjoint and complete.
  split = digits.split_indices(1797)
  assert set(split["train"]).isdisjoint(split["test"]) and len(split["train"]) + len(split["test"]) == 1797
  builder = tfds.builder("digits", data_dir=tfds_data_dir)
  assert builder.info.features["image"].shape == (8, 8, 1)


def write_npz(path, n=20, shape=(6, 6, 1), classes=3, **overrides):
  arrays = {"image": np.random.default_rng(0).integers(0, 256, (n,) + shape).astype(np.uint8),
            "label": np.arange(n) % classes}
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return str(path)


def test_npz_source(tmp_path):
  train = write_npz(tmp_path / "train.npz")
  evaluation = write_npz(tmp_path / "eval.npz", n=7)
  dataset = open_dataset("npz", train_path=train, eval_path=evaluation)
  assert (len(dataset.train), len(dataset.eval), dataset.num_classes, dataset.image_shape) == (20, 7, 3, (6, 6, 1))


@pytest.mark.parametrize("overrides,message", [
    ({"label": None}, "lacks array"),
    ({"image": np.zeros((20, 6, 6), np.uint8)}, "rank 4"),
    ({"image": np.zeros((20, 6, 6, 1), np.float32)}, "expected uint8"),
    ({"label": np.zeros(19, np.int64)}, "20 images but 19 labels"),
    ({"label": np.full(20, 5)}, "outside"),
    ({"label": np.zeros(20, np.float32)}, "expected integers"),
])
def test_npz_errors_name_the_problem(tmp_path, overrides, message):
  train = write_npz(tmp_path / "train.npz", **overrides)
  evaluation = write_npz(tmp_path / "eval.npz")
  with pytest.raises(DataError, match=message):
    open_dataset("npz", train_path=train, eval_path=evaluation, num_classes=3)


def test_unprepared_tfds_dataset_fails_fast_with_instructions(tmp_path):
  with pytest.raises(DataError, match="python -m cnnjax.prepare cifar10"):
    open_dataset("cifar10", tfds_data_dir=str(tmp_path))


def prepare_fake_tfds(name: str, data_dir: str, splits: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
  """Writes a small prepared copy of the TFDS dataset `name` (its own builder, features and version; random
  32x32 RGB images), as `python -m cnnjax.prepare` would from the network; returns each split's images."""
  rng = np.random.default_rng(seed)
  images = {split: rng.integers(0, 256, (count, 32, 32, 3)).astype(np.uint8) for split, count in splits.items()}

  class Offline(tfds.builder_cls(name), skip_registration=True):
    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._examples(split) for split in splits}

    def _examples(self, split):
      for index, image in enumerate(images[split]):
        yield index, {"id": f"{split}{index}", "image": Image.fromarray(image), "label": index % 10}

  Offline.name = name
  Offline(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return images


def test_any_prepared_tfds_classification_dataset_opens_by_name(tmp_path):
  data_dir = str(tmp_path / "tfds")
  images = prepare_fake_tfds("svhn_cropped", data_dir, {"train": 12, "test": 4, "extra": 3})
  dataset = open_dataset("svhn_cropped", tfds_data_dir=data_dir)
  assert (len(dataset.train), len(dataset.eval), dataset.num_classes, dataset.image_shape) == (12, 4, 10, (32, 32, 3))
  pixels = images["train"].reshape(-1, 3) / 255.0
  np.testing.assert_allclose(dataset.mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(dataset.std, pixels.std(0), rtol=1e-6)
  # Computed once, then read from the cache beside the dataset (here: a planted value that must come back).
  cache = os.path.join(data_dir, "svhn_cropped", "3.1.0", sources.STATS_FILE)
  with open(cache) as f:
    stored = json.load(f)
  stored["train"]["mean"] = [0.25, 0.5, 0.75]
  with open(cache, "w") as f:
    json.dump(stored, f)
  assert open_dataset("svhn_cropped", tfds_data_dir=data_dir).mean == (0.25, 0.5, 0.75)
  # Other splits are statistics of their own; the eval split can be any other split.
  other = open_dataset("svhn_cropped", tfds_data_dir=data_dir, train_split="extra", eval_split="train[:2]")
  np.testing.assert_allclose(other.mean, (images["extra"].reshape(-1, 3) / 255.0).mean(0), rtol=1e-6)
  assert len(other.eval) == 2


def test_a_tfds_dataset_that_is_not_image_classification_is_refused(tmp_path):
  class Brightness(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images with a number to regress, not a class."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(4, 4, 1)), "brightness": tfds.features.Scalar(np.float32)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(), "test": self._generate_examples()}

    def _generate_examples(self):
      for index in range(2):
        yield index, {"image": Image.fromarray(np.full((4, 4), index, np.uint8)), "brightness": float(index)}

  Brightness.name = "brightness"
  Brightness(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  with pytest.raises(DataError, match="'brightness' is not image classification .*brightness: Scalar"):
    open_dataset("brightness", tfds_data_dir=str(tmp_path))


def test_mock_tfds_source_flows_through_the_pipeline():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    dataset = open_dataset("cifar10")
    assert dataset.num_classes == 10 and dataset.image_shape == (32, 32, 3)
    preprocess = Preprocess(image_size=0, mean=dataset.mean, std=dataset.std,
                            augment=Augment(crop_padding=4, flip=True))
    batch = train_dataset(dataset.train, preprocess, seed=0, batch=ProcessSlice(4), num_steps=3)[1]
  assert batch["input"].shape == (4, 32, 32, 3) and batch["input"].dtype == np.uint8
  assert batch["draws"].shape == (4, 4) and batch["draws"].dtype == np.float32
  assert batch["label"].dtype == np.int32


def make_source(n):
  images = (np.arange(n)[:, None, None, None] * np.ones((1, 4, 4, 1))).astype(np.uint8)
  return ArraySource(images, np.arange(n) % 10)


def test_every_example_once_per_epoch_across_processes():
  n, global_batch, processes = 23, 6, 3
  source = make_source(n)
  steps = 4 * n // global_batch + 1
  stream = []
  for step in range(steps):
    for p in range(processes):
      part = train_dataset(source, identity_preprocess(), seed=5,
                           batch=ProcessSlice(global_batch, p, processes), num_steps=steps)[step]
      stream.extend(part["index"].tolist())
  for epoch in range(len(stream) // n):
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
  # Epochs are shuffled differently.
  assert stream[:n] != stream[n:2 * n]


def test_eval_covers_every_example_exactly_once_with_masked_padding():
  n = 10
  for processes in (1, 2):
    counts = collections.Counter()
    for p in range(processes):
      for batch in eval_dataset(make_source(n), identity_preprocess(), batch=ProcessSlice(4, p, processes)):
        counts.update(batch["index"][batch["mask"] > 0].tolist())
        assert batch["input"].shape[0] == 4 // processes
    assert counts == collections.Counter(range(n))


def test_augmentation_is_deterministic_per_example_and_seed():
  source = make_source(16)
  preprocess = identity_preprocess(augment=Augment(crop_padding=2, flip=True, rotation_degrees=10), seed=3)
  whole = train_dataset(source, preprocess, seed=3, batch=ProcessSlice(8), num_steps=2)[1]
  halves = [train_dataset(source, preprocess, seed=3, batch=ProcessSlice(8, p, 2), num_steps=2)[1]
            for p in range(2)]
  finished = preprocess.finish(whole)[0]
  np.testing.assert_array_equal(finished, np.concatenate([preprocess.finish(h)[0] for h in halves]))
  other_preprocess = identity_preprocess(augment=preprocess.augment, seed=4)
  other = train_dataset(source, other_preprocess, seed=3, batch=ProcessSlice(8), num_steps=2)[1]
  assert not np.array_equal(finished, other_preprocess.finish(other)[0])


def test_resize_preserves_constants_and_upsamples_digits_to_lenet_size():
  np.testing.assert_allclose(resize_matrix(8, 32).sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(resize_batch(np.full((1, 8, 8, 1), 7.0, np.float32), 32), 7.0, rtol=1e-5)
  assert resize_batch(np.zeros((2, 8, 8, 1), np.float32), 32).shape == (2, 32, 32, 1)


def test_crop_flip_rotation_primitives():
  images = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
  np.testing.assert_array_equal(crop_batch(images, 1, np.array([[1, 1], [1, 1]])), images)
  shifted = crop_batch(images, 1, np.array([[0, 0], [2, 2]]))
  assert shifted[0, 0, 0, 0] == 0 and shifted[0, 1, 1, 0] == images[0, 0, 0, 0]
  np.testing.assert_allclose(rotate_batch(images, np.zeros(2)), images, atol=1e-5)
  # A quarter turn moves the top-left corner to a neighbouring corner.
  turned = rotate_batch(images, np.full(2, 90.0))
  np.testing.assert_allclose(sorted(turned[0, [0, 0, -1, -1], [0, -1, 0, -1], 0]),
                             sorted(images[0, [0, 0, -1, -1], [0, -1, 0, -1], 0]), atol=1e-4)
