"""Dataset preparation offline: the TFDS builders run on small files in each dataset's original format,
image folders in torchvision's layout, and the CIFAR pickles read without running them."""

import glob
import gzip
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from cnnjax import train
from cnnjax.data import open_dataset
from cnnjax.data.prepare import prepare
from cnnjax.data.sources import STATS_FILE
from cnnjax.errors import DataError
from helpers import REPO_ROOT, experiment_config, run_cli, tiny


def write_cifar(directory, num_labels, counts, files):
  rng = np.random.default_rng(num_labels)
  written = {}
  for name, count in zip(files, counts):
    labels = rng.integers(0, 10, (count, num_labels)).astype(np.uint8)
    images = rng.integers(0, 256, (count, 3, 32, 32)).astype(np.uint8)
    np.concatenate([labels, images.reshape(count, -1)], axis=1).tofile(directory / name)
    written[name] = (labels, images.transpose(0, 2, 3, 1))
  return written


@pytest.mark.slow
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
  assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
  assert "`pip install -e '.[prepare]'`" in result.stderr and "--source_dir" in result.stderr


def test_digits_prepare_command(tmp_path):
  result = run_cli("cnnjax.prepare", "digits", f"--data_dir={tmp_path}", timeout=120)
  assert result.returncode == 0, result.stderr
  assert "1437 train / 360 eval examples" in result.stdout


def cifar_python_batch(labels: dict, images: np.ndarray) -> dict:
  """A batch as the CIFAR python version holds it: byte-string keys, label lists, (N, 3072) uint8 rows."""
  return {b"batch_label": b"a batch", b"filenames": [b"x.png"] * len(images),
          b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), **labels}


def write_pickle(path, payload) -> None:
  """Pickles as the CIFAR files hold it: written by Python 2, whose byte strings are stored raw, as protocol 3
  stores them (Python 3's protocol 2 would route them through _codecs.encode, which the files never use)."""
  with open(path, "wb") as f:
    pickle.dump(payload, f, protocol=3)


def test_cifar10_from_the_python_version(tmp_path):
  source = tmp_path / "src" / "cifar-10-batches-py"
  source.mkdir(parents=True)
  rng = np.random.default_rng(1)
  written = {}
  for name, count in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
    images = rng.integers(0, 256, (count, 32, 32, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, count).tolist()
    write_pickle(source / name, cifar_python_batch({b"labels": labels}, images))
    written[name] = (labels, images)
  write_pickle(source / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
  data_dir = str(tmp_path / "tfds")
  prepare("cifar10", data_dir=data_dir, source_dir=str(tmp_path / "src"))
  dataset = open_dataset("cifar10", tfds_data_dir=data_dir)
  assert (len(dataset.train), len(dataset.eval), dataset.num_classes) == (10, 3, 10)
  labels, images = written["test_batch"]
  for record in (dataset.eval[i] for i in range(3)):
    original = int(record["id"].decode().split("_")[1])
    np.testing.assert_array_equal(record["image"], images[original])
    assert int(record["label"]) == labels[original]
  with open(os.path.join(data_dir, "cifar10", "3.0.2", "label.labels.txt")) as f:
    assert f.read().split() == [f"class{i}" for i in range(10)]


def test_cifar100_from_the_python_version_keeps_fine_and_coarse_labels(tmp_path):
  source = tmp_path / "cifar-100-python"
  source.mkdir()
  rng = np.random.default_rng(2)
  fine, coarse = [5, 99], [1, 19]
  write_pickle(source / "train", cifar_python_batch({b"fine_labels": [3, 4, 5], b"coarse_labels": [0, 1, 2]},
                                                    rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)))
  write_pickle(source / "test", cifar_python_batch({b"fine_labels": fine, b"coarse_labels": coarse},
                                                   rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)))
  data_dir = str(tmp_path / "tfds")
  prepare("cifar100", data_dir=data_dir, source_dir=str(tmp_path))
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  stored = tfds.data_source("cifar100", split="test", data_dir=data_dir)
  assert sorted((int(r["coarse_label"]), int(r["label"])) for r in (stored[0], stored[1])) == sorted(zip(coarse, fine))


class RunsACommand:
  """Pickled, this calls os.system when loaded: what a tampered download could hold."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class RunsCode:
  """Pickled, this calls exec on Python source when loaded."""

  def __reduce__(self):
    return (exec, ("open('SENTINEL', 'w').close()",))


@pytest.mark.parametrize("payload", ["os_system", "exec", "batch_with_code"])
def test_a_cifar_pickle_that_would_run_code_is_refused_in_one_line(tmp_path, payload):
  source = tmp_path / "cifar-10-batches-py"
  source.mkdir()
  sentinel = tmp_path / "ran"
  images = np.zeros((1, 32, 32, 3), np.uint8)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    write_pickle(source / name, cifar_python_batch({b"labels": [0]}, images))
  tampered = {"os_system": RunsACommand(f"touch {sentinel}"), "exec": RunsCode(),
              "batch_with_code": cifar_python_batch({b"labels": [0], b"extra": RunsACommand(f"touch {sentinel}")},
                                                    images)}[payload]
  write_pickle(source / "data_batch_3", tampered)
  data_dir = tmp_path / "tfds"
  result = run_cli("cnnjax.prepare", "cifar10", f"--source_dir={tmp_path}", f"--data_dir={data_dir}", timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  assert "data_batch_3 is not a CIFAR python batch" in lines[0] and "refused without running it" in lines[0]
  assert not sentinel.exists() and not os.path.exists(os.path.join(REPO_ROOT, "SENTINEL"))
  assert not glob.glob(str(data_dir / "cifar10" / "3.0.2" / "*.array_record*"))


def test_cifar_source_dir_without_either_version_says_what_it_looks_for(tmp_path):
  with pytest.raises(DataError, match="holds neither cifar10's binary version .* nor its python version"):
    prepare("cifar10", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path))


@pytest.mark.parametrize("name,message", [
    ("cifar10", "holds neither cifar10's binary version (cifar-10-batches-bin/data_batch_1.bin)"),
    ("mnist", "train-images-idx3-ubyte[.gz] is missing"),
])
def test_missing_original_files_are_one_line_before_tfds_writes_anything(tmp_path, name, message):
  data_dir = tmp_path / "tfds"
  result = run_cli("cnnjax.prepare", name, f"--source_dir={tmp_path}", f"--data_dir={data_dir}", timeout=120)
  assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
  assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout.strip(), result.stderr + result.stdout
  assert not data_dir.exists() or not any(data_dir.rglob("*.array_record*"))


def write_image_folder(root, classes, sizes=None, mode="RGB") -> dict:
  """root/<split>/<class>/<i>.png (and one .jpg), random pixels; {(split, class): [arrays of the PNGs]}."""
  rng = np.random.default_rng(3)
  written = {}
  for split, count in (("train", 3), ("val", 2)):
    for cls in classes:
      folder = root / split / cls
      folder.mkdir(parents=True)
      for i in range(count):
        height, width = (sizes or {}).get((split, cls, i), (12, 10))
        shape = (height, width, 3) if mode == "RGB" else (height, width)
        array = rng.integers(0, 256, shape).astype(np.uint8)
        Image.fromarray(array, mode).save(folder / f"{i}.png")
        written.setdefault((split, cls), []).append(array.reshape(height, width, -1))
      (folder / "notes.txt").write_text("not an image: ignored, as torchvision ignores it")
  return written


def test_an_image_folder_prepares_offline_and_trains_by_name(tmp_path):
  source = tmp_path / "pets"
  written = write_image_folder(source, ["dog", "cat", "axolotl"])
  data_dir = str(tmp_path / "tfds")
  result = run_cli("cnnjax.prepare", "my_pets", f"--source_dir={source}", f"--data_dir={data_dir}", timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "prepared my_pets" in result.stdout and "9 train / 6 eval examples, 3 classes, images (12, 10, 3)" in \
      result.stdout
  # No progress-bar debris when the output is not a terminal.
  assert "\r" not in result.stderr + result.stdout and "it/s" not in result.stderr, result.stderr[-2000:]
  dataset = open_dataset("my_pets", tfds_data_dir=data_dir)
  classes = ["axolotl", "cat", "dog"]  # sorted, as torchvision numbers them
  stored = sorted((int(dataset.eval[i]["label"]), dataset.eval[i]["image"].tobytes()) for i in range(6))
  assert stored == sorted((classes.index(cls), array.tobytes()) for (split, cls), arrays in written.items()
                          if split == "val" for array in arrays)
  # Normalization statistics from the training split, cached beside the dataset.
  pixels = np.concatenate([a.reshape(-1, 3) for (split, _), arrays in written.items() if split == "train"
                           for a in arrays]) / 255.0
  np.testing.assert_allclose(dataset.mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(dataset.std, pixels.std(0), rtol=1e-6)
  with open(os.path.join(data_dir, "my_pets", "1.0.0", STATS_FILE)) as f:
    assert json.load(f)["train"]["mean"] == list(dataset.mean)
  config = tiny(experiment_config("simple_cnn_digits"), **{
      "batch_size": 3, "num_train_steps": 2, "data.name": "my_pets", "data.tfds_data_dir": data_dir,
      "data.rotation_degrees": 0.0})
  summary = train.run(config, str(tmp_path / "run"))
  assert summary["step"] == 2 and summary["eval_examples"] == 6


def test_an_image_folder_of_grayscale_images_of_varying_sizes(tmp_path):
  source = tmp_path / "scans"
  write_image_folder(source, ["a", "b"], sizes={("train", "a", 0): (7, 9)}, mode="L")
  data_dir = str(tmp_path / "tfds")
  prepare("scans", data_dir=data_dir, source_dir=str(source))
  dataset = open_dataset("scans", tfds_data_dir=data_dir)
  assert dataset.image_shape == (None, None, 1) and len(dataset.mean) == 1
  assert {dataset.train[i]["image"].shape for i in range(len(dataset.train))} == {(7, 9, 1), (12, 10, 1)}


@pytest.mark.parametrize("case,message", [
    ("tfds_name", "name the image folder's dataset otherwise than 'svhn_cropped'"),
    ("own_name", "name the image folder's dataset otherwise than 'shapes'"),
    ("no_train", "has no train/ folder, so it is not an image folder"),
    ("eval_only_class", "class 'eel' has no folder in"),
    ("empty_class", "holds no images"),
    ("bad_image", "is not a readable image"),
])
@pytest.mark.slow
def test_image_folder_mistakes_are_one_line_errors(tmp_path, case, message):
  source = tmp_path / "images"
  write_image_folder(source, ["cat", "dog"])
  name = {"tfds_name": "svhn_cropped", "own_name": "shapes"}.get(case, "my_images")
  if case == "no_train":
    os.rename(source / "train", source / "training")
  if case == "eval_only_class":
    (source / "val" / "eel").mkdir()
  if case == "empty_class":
    (source / "train" / "eel").mkdir()
  if case == "bad_image":
    (source / "train" / "cat" / "9.jpg").write_bytes(b"not a jpeg")
  result = run_cli("cnnjax.prepare", name, f"--source_dir={source}", f"--data_dir={tmp_path / 'tfds'}", timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-2000:]
  assert not (tmp_path / "tfds" / name).exists()


@pytest.mark.parametrize("name,advice", [
    ("cifar10", "--source_dir=DIR"),
    ("svhn_cropped", "pip install -e '.[prepare]'"),
    ("my_images", "torchvision's ImageFolder layout"),
])
def test_an_unprepared_dataset_is_one_line_naming_the_offline_route(tmp_path, name, advice):
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={tmp_path / 'run'}",
                   f"--config.data.name={name}", f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  # Nothing before it: no TFDS warning about variant folders.
  assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
  assert result.stderr.startswith(f"error: dataset {name!r} is not prepared") and advice in result.stderr
