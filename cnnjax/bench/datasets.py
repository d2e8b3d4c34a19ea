"""Synthetic datasets for the input-pipeline benchmark, in each dataset's real format.

The pipeline benchmark must read what training reads, without a download: random
images are written in CIFAR-10's binary format and MNIST's idx format and
prepared into real TFDS ArrayRecord datasets (PNG-encoded, so decoding is
measured), then read with the data recipe of the matching experiment. ImageNet
needs a manual download, so its kind reads random arrays from an npz file (no
decoding) with ImageNet's augmentation (random resized crop, flip).
"""

from __future__ import annotations

import gzip
import os

import ml_collections
import numpy as np

from cnnjax import config as config_lib
from cnnjax.data import prepare as prepare_lib

CIFAR_SIDE, MNIST_SIDE = 32, 28
CIFAR_CLASSES, MNIST_CLASSES, IMAGENET_CLASSES = 10, 10, 1000
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
# ImageNet images are resized so the crop covers about 7/8 of the side, as at evaluation.
IMAGENET_SOURCE_SCALE = 8 / 7
IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC = 2051, 2049
# ImageNet-sized arrays are large: this many are enough to time batches (they repeat).
IMAGENET_EXAMPLES = 256
# Steps of the timed stream: more than any timing window reads, for any batch size.
PIPELINE_STEPS = 10 ** 8


def _write_cifar_binary(directory: str, num_examples: int, rng: np.random.Generator) -> None:
  os.makedirs(directory, exist_ok=True)
  per_file = max(1, num_examples // len(CIFAR_TRAIN_FILES))
  for name in CIFAR_TRAIN_FILES + ("test_batch.bin",):
    labels = rng.integers(0, CIFAR_CLASSES, (per_file, 1), dtype=np.uint8)
    pixels = rng.integers(0, 256, (per_file, 3 * CIFAR_SIDE * CIFAR_SIDE), dtype=np.uint8)
    np.concatenate([labels, pixels], axis=1).tofile(os.path.join(directory, name))


def _write_idx(directory: str, num_examples: int, rng: np.random.Generator) -> None:
  os.makedirs(directory, exist_ok=True)
  for prefix in ("train", "t10k"):
    images = rng.integers(0, 256, (num_examples, MNIST_SIDE, MNIST_SIDE), dtype=np.uint8)
    labels = rng.integers(0, MNIST_CLASSES, num_examples, dtype=np.uint8)
    with gzip.open(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
      f.write(np.array([IDX_IMAGE_MAGIC, num_examples, MNIST_SIDE, MNIST_SIDE], ">u4").tobytes() + images.tobytes())
    with gzip.open(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
      f.write(np.array([IDX_LABEL_MAGIC, num_examples], ">u4").tobytes() + labels.tobytes())


def pipeline_config(kind: str, *, batch: int, image_size: int, root: str, num_examples: int,
                    seed: int = 0) -> ml_collections.ConfigDict:
  """A config whose data section reads a synthetic `kind` dataset ('cifar', 'mnist', 'imagenet')."""
  rng = np.random.default_rng(seed)
  tfds_dir = os.path.join(root, "tfds")
  config = config_lib.base_config()
  config.batch_size = batch
  config.num_train_steps = PIPELINE_STEPS
  config.data.tfds_data_dir = tfds_dir
  if kind == "cifar":
    source = os.path.join(root, "cifar_source")
    if not os.path.isdir(source):
      _write_cifar_binary(source, num_examples, rng)
      prepare_lib.prepare("cifar10", data_dir=tfds_dir, source_dir=source)
    config.model.name = "resnet20"
    config.data.name = "cifar10"
    config.data.crop_padding = 4  # the resnet20_cifar10 recipe
    config.data.flip = True
  elif kind == "mnist":
    source = os.path.join(root, "mnist_source")
    if not os.path.isdir(source):
      _write_idx(source, num_examples, rng)
      prepare_lib.prepare("mnist", data_dir=tfds_dir, source_dir=source)
    config.model.name = "lenet5"
    config.data.name = "mnist"
    config.data.image_size = image_size
    config.data.rotation_degrees = 8.0  # the lenet5_digits recipe
  elif kind == "imagenet":
    side = round(image_size * IMAGENET_SOURCE_SCALE)
    path = os.path.join(root, f"imagenet_{side}.npz")
    if not os.path.exists(path):
      count = min(num_examples, IMAGENET_EXAMPLES)
      np.savez(path, image=rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8),
               label=rng.integers(0, IMAGENET_CLASSES, count))
    config.model.name = "resnet50"
    config.data.name = "npz"
    config.data.train_path = config.data.eval_path = path
    config.data.image_size = image_size
    config.data.random_resized_crop = True  # the resnet50_imagenet recipe
    config.data.flip = True
  else:
    raise ValueError(f"unknown input kind {kind!r}; choose cifar, mnist or imagenet")
  return config
