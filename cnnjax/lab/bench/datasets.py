"""Synthetic datasets for the input-pipeline benchmark, in each dataset's real format.

The pipeline benchmark must read what training reads, without a download: random
images are written in CIFAR-10's binary format and MNIST's idx format and
prepared into real TFDS ArrayRecord datasets (PNG-encoded, so decoding is
measured), then read with the data recipe of the matching experiment. ImageNet
needs a manual download, so its kind reads random arrays from an npz file (no
decoding) with ImageNet's augmentation (random resized crop, flip).

`imagenet_jpeg` is ImageNet as training reads it: a real TFDS `imagenet2012`
ArrayRecord dataset (the stock builder's name, version and features) holding
JPEGs of ILSVRC-2012's common sizes, decoded by TFDS and then cropped, resized
to 224 and flipped by the `resnet50_imagenet` recipe. The pictures are smooth
random colour fields with pixel noise, so that each JPEG holds about as many
pixels and bytes as an average ImageNet photo and costs about as much to
decode; `jpeg_dataset_stats` says what was written.
"""

from __future__ import annotations

import gzip
import io
import os

import ml_collections
import numpy as np
from PIL import Image

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
# Synthetic ImageNet JPEGs: ILSVRC-2012's most common training image sizes (width, height), smooth colour
# fields with a random control point every JPEG_SMOOTHNESS pixels plus Gaussian pixel noise, at quality
# JPEG_QUALITY. Measured here: 187,000 pixels and 103 KB per file on average; ILSVRC-2012's training
# images average about 470x390 pixels (183,000) and 108 KB (138 GB over 1.28 M files).
IMAGENET_JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (500, 500))
JPEG_SMOOTHNESS = 25
JPEG_NOISE_STD = 20.0
JPEG_QUALITY = 90
IMAGENET_JPEG_TRAIN, IMAGENET_JPEG_EVAL = 1024, 64
# Stand-in ImageNets of other sizes keep one eval JPEG per this many training ones.
JPEG_EVAL_FRACTION = IMAGENET_JPEG_TRAIN // IMAGENET_JPEG_EVAL
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
  elif kind == "imagenet_jpeg":
    prepare_imagenet_jpeg(tfds_dir, num_train=num_examples, seed=seed)
    config = config_lib.imagenet_config("resnet50", learning_rate=0.1, decay_epochs=(30, 60))
    config.batch_size = batch
    config.num_train_steps = PIPELINE_STEPS
    config.data.tfds_data_dir = tfds_dir
    config.data.image_size = image_size
  else:
    raise ValueError(f"unknown input kind {kind!r}; choose cifar, mnist, imagenet or imagenet_jpeg")
  return config


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
  """One ImageNet-like JPEG (see IMAGENET_JPEG_SIZES): a smooth colour field with pixel noise."""
  width, height = IMAGENET_JPEG_SIZES[rng.integers(len(IMAGENET_JPEG_SIZES))]
  controls = rng.integers(0, 256, (height // JPEG_SMOOTHNESS + 2, width // JPEG_SMOOTHNESS + 2, 3), dtype=np.uint8)
  field = np.asarray(Image.fromarray(controls).resize((width, height), Image.BICUBIC), np.float32)
  pixels = np.clip(field + rng.normal(0.0, JPEG_NOISE_STD, field.shape), 0, 255).astype(np.uint8)
  encoded = io.BytesIO()
  Image.fromarray(pixels).save(encoded, "JPEG", quality=JPEG_QUALITY)
  return encoded.getvalue()


class _SyntheticImagenet:
  """Mixin for TFDS's imagenet2012 builder: JPEGs from `synthetic_jpeg` instead of the ILSVRC tar files."""

  def __init__(self, *, num_train: int, num_eval: int, seed: int, **kwargs):
    self._counts, self._seed = {"train": num_train, "validation": num_eval}, seed
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download or read.
    return {split: self._generate_examples(split, count) for split, count in self._counts.items()}

  def _generate_examples(self, split, count):  # pylint: disable=arguments-differ
    rng = np.random.default_rng((self._seed, len(split)))
    for index in range(count):
      yield index, {"image": io.BytesIO(synthetic_jpeg(rng)), "label": int(rng.integers(IMAGENET_CLASSES)),
                    "file_name": f"synthetic_{split}_{index:06d}.JPEG"}


def prepare_imagenet_jpeg(data_dir: str, *, num_train: int = IMAGENET_JPEG_TRAIN,
                          num_eval: int = IMAGENET_JPEG_EVAL, seed: int = 0) -> str:
  """Writes the synthetic `imagenet2012` into `data_dir` once (kept if there); returns its directory."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  stock = tfds.builder_cls("imagenet2012")
  builder_cls = type("SyntheticImagenet2012", (_SyntheticImagenet, stock), {"name": "imagenet2012"},
                     skip_registration=True)
  builder = builder_cls(num_train=num_train, num_eval=num_eval, seed=seed, data_dir=data_dir,
                        file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
  return builder.data_dir


def jpeg_dataset_stats(data_dir: str, split: str = "train") -> dict[str, float]:
  """Examples, mean JPEG bytes and mean pixels of a prepared `imagenet2012` split (read without decoding)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = tfds.data_source("imagenet2012", split=split, data_dir=data_dir, download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  sizes, pixels = [], []
  for index in range(len(source)):
    encoded = source[index]["image"]
    sizes.append(len(encoded))
    with Image.open(io.BytesIO(encoded)) as image:
      pixels.append(image.width * image.height)
  return {"examples": len(source), "mean_jpeg_bytes": float(np.mean(sizes)), "mean_pixels": float(np.mean(pixels))}
