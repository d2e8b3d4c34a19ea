"""Dataset preparation offline: the TFDS builders run on small files in each dataset's original format."""

import gzip
import importlib.util

import numpy as np
import pytest

from cnnjax import train
from cnnjax.data import open_dataset
from cnnjax.data.prepare import prepare
from cnnjax.errors import DataError
from helpers import experiment_config, run_cli, tiny


def write_cifar(directory, num_labels, counts, files):
  rng = np.random.default_rng(num_labels)
  written = {}
  for name, count in zip(files, counts):
    labels = rng.integers(0, 10, (count, num_labels)).astype(np.uint8)
    images = rng.integers(0, 256, (count, 3, 32, 32)).astype(np.uint8)
    np.concatenate([labels, images.reshape(count, -1)], axis=1).tofile(directory / name)
    written[name] = (labels, images.transpose(0, 2, 3, 1))
  return written


def test_cifar10_from_original_binary_files(tmp_path):
  source = tmp_path / "src" / "cifar-10-batches-bin"
  source.mkdir(parents=True)
  train_files = [f"data_batch_{i}.bin" for i in range(1, 6)]
  written = write_cifar(source, 1, [2, 2, 2, 2, 2, 3], train_files + ["test_batch.bin"])
  (source / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)))
  data_dir = str(tmp_path / "tfds")
  prepare("cifar10", data_dir=data_dir, source_dir=str(tmp_path / "src"))
  dataset = open_dataset("cifar10", tfds_data_dir=data_dir)
  assert (len(dataset.train), len(dataset.eval), dataset.num_classes) == (10, 3, 10)
  labels, images = written["test_batch.bin"]
  # TFDS stores examples in a shuffled order; the id names the original position.
  for record in (dataset.eval[i] for i in range(3)):
    original = int(record["id"].decode().split("_")[1])
    np.testing.assert_array_equal(record["image"], images[original])
    assert int(record["label"]) == int(labels[original, 0])
  # Training reads the prepared ArrayRecord files like any TFDS dataset.
  config = tiny(experiment_config("resnet20_cifar10"), **{
      "batch_size": 2, "num_train_steps": 2, "data.tfds_data_dir": data_dir, "model.name": "resnet20"})
  summary = train.run(config, str(tmp_path / "run"))
  assert summary["step"] == 2 and summary["eval_examples"] == 3


def test_cifar100_keeps_fine_and_coarse_labels(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  written = write_cifar(source, 2, [4, 2], ["train.bin", "test.bin"])
  data_dir = str(tmp_path / "tfds")
  prepare("cifar100", data_dir=data_dir, source_dir=str(source))
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = tfds.data_source("cifar100", split="test", data_dir=data_dir)
  stored = sorted((int(r["coarse_label"]), int(r["label"])) for r in (source[0], source[1]))
  assert stored == sorted((int(c), int(f)) for c, f in written["test.bin"][0])


def test_mnist_from_gzipped_idx_files(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  rng = np.random.default_rng(0)
  for split, count in (("train", 5), ("t10k", 3)):
    images = rng.integers(0, 256, (count, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    header = np.array([2051, count, 28, 28], ">u4").tobytes()
    with gzip.open(source / f"{split}-images-idx3-ubyte.gz", "wb") as f:
      f.write(header + images.tobytes())
    with gzip.open(source / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
      f.write(np.array([2049, count], ">u4").tobytes() + labels.tobytes())
  data_dir = str(tmp_path / "tfds")
  prepare("mnist", data_dir=data_dir, source_dir=str(source))
  dataset = open_dataset("mnist", tfds_data_dir=data_dir)
  assert (len(dataset.train), len(dataset.eval), dataset.image_shape) == (5, 3, (28, 28, 1))
  stored = sorted((int(r["label"]), r["image"][..., 0].tobytes()) for r in (dataset.eval[i] for i in range(3)))
  assert stored == sorted((int(label), image.tobytes()) for label, image in zip(labels, images))


def test_missing_source_files_are_named(tmp_path):
  with pytest.raises(DataError, match="is missing"):
    prepare("mnist", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="checks the message shown when TensorFlow is absent")
def test_network_preparation_without_tensorflow_is_one_clear_line(tmp_path):
  result = run_cli("cnnjax.prepare", "cifar10", f"--data_dir={tmp_path}", timeout=60)
  assert result.returncode == 2
  assert "pip install 'cnnjax[prepare]'" in result.stderr.splitlines()[-1]


def test_digits_prepare_command(tmp_path):
  result = run_cli("cnnjax.prepare", "digits", f"--data_dir={tmp_path}", timeout=120)
  assert result.returncode == 0, result.stderr
  assert "1437 train / 360 eval examples" in result.stdout
