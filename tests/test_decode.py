"""Encoded images decoded only as far as their crop needs (cnnjax.data.decode): the same crop windows as the
decoded-array path, pixels within the DCT scaling's differences, and a one-line error for broken bytes."""

import io

import numpy as np
import pytest
from PIL import Image

from cnnjax.data import Preprocess, ProcessSlice, open_dataset, train_dataset
from cnnjax.data.decode import EncodedImage, decode_window
from cnnjax.data.preprocess import CROP_DRAWS, crop_window, example_uniforms
from cnnjax.data.sources import EncodedImageSource
from cnnjax.errors import DataError
from cnnjax.lab.bench import datasets

# Mean absolute difference, in uint8 levels, allowed between a crop decoded at a coarser DCT scale and the
# same crop of the fully decoded image (both resampled bilinearly to the output size).
DCT_SCALE_LEVELS = 4.0


def jpeg(height, width, seed=0):
  rng = np.random.default_rng(seed)
  smooth = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
  encoded = io.BytesIO()
  smooth.resize((width, height), Image.BICUBIC).save(encoded, "JPEG", quality=95)
  return encoded.getvalue()


def test_a_window_decoded_at_a_coarser_scale_matches_the_full_decode():
  image = EncodedImage(jpeg(480, 640), 3)
  assert image.size == (480, 640)
  full = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
  for window, out in (((40, 60, 400, 500), 64), ((0, 0, 480, 640), 224), ((100, 200, 50, 80), 32)):
    top, left, height, width = window
    expected = np.asarray(Image.fromarray(full[top:top + height, left:left + width]).resize((out, out),
                                                                                               Image.BILINEAR))
    got = decode_window(image, window, out, out)
    assert got.shape == (out, out, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(float) - expected).mean() < DCT_SCALE_LEVELS, window
  grey = decode_window(EncodedImage(image.data, 1), (0, 0, 480, 640), 16, 16)
  assert grey.shape == (16, 16, 1)


def test_broken_bytes_are_a_one_line_data_error():
  with pytest.raises(DataError, match="cannot be decoded"):
    EncodedImage(b"not an image", 3).size  # pylint: disable=expression-not-assigned
  truncated = EncodedImage(jpeg(64, 64)[:200], 3)
  with pytest.raises(DataError, match="cannot be decoded"):
    decode_window(truncated, (0, 0, 64, 64), 32, 32)


def test_imagenet_is_read_encoded_with_the_crop_windows_of_the_decoded_path(tmp_path):
  data_dir = str(tmp_path / "tfds")
  datasets.prepare_imagenet_jpeg(data_dir, num_train=8, num_eval=2)
  dataset = open_dataset("imagenet2012", tfds_data_dir=data_dir)
  assert isinstance(dataset.train, EncodedImageSource)
  preprocess = Preprocess(image_size=64, mean=dataset.mean, std=dataset.std, random_resized_crop=True, seed=3)
  batch = train_dataset(dataset.train, preprocess, seed=3, batch=ProcessSlice(8), num_steps=1)[0]
  decoded = [dataset.train[int(index)]["image"] for index in batch["index"]]
  reference = preprocess.host_train({"image": decoded, "label": batch["label"]}, np.arange(8))
  assert batch["input"].shape == reference["input"].shape == (8, 64, 64, 3)
  assert np.abs(batch["input"].astype(float) - reference["input"]).mean() < DCT_SCALE_LEVELS
  uniforms = example_uniforms(3, np.arange(8), CROP_DRAWS, stream=1)
  for image, array, draws in zip(dataset.train.read_encoded(batch["index"])["image"], decoded, uniforms):
    assert crop_window(*image.size, draws) == crop_window(*array.shape[:2], draws)


def test_an_examples_header_is_parsed_once_for_its_window_and_its_decode(monkeypatch):
  opened = []
  original = Image.open
  monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or original(*a, **k))
  images = [EncodedImage(jpeg(480, 640, seed), 3) for seed in range(3)]
  preprocess = Preprocess(image_size=64, mean=(0.0,) * 3, std=(1.0,) * 3, random_resized_crop=True, seed=0)
  batch = preprocess.host_train({"image": images, "label": np.zeros(3, np.int64)}, np.arange(3))
  assert batch["input"].shape == (3, 64, 64, 3) and len(opened) == 3
  again = decode_window(images[0], (0, 0, 480, 640), 16, 16)  # a second decode opens the image anew
  assert again.shape == (16, 16, 3) and len(opened) == 4


def test_a_copy_or_pickle_of_an_image_carries_its_bytes_only():
  import copy  # pylint: disable=import-outside-toplevel
  import pickle  # pylint: disable=import-outside-toplevel
  image = EncodedImage(jpeg(480, 640), 3)
  assert image.size == (480, 640)  # opens the header
  for twin in (copy.copy(image), pickle.loads(pickle.dumps(image))):
    assert twin == image and "_header" not in twin.__dict__
    np.testing.assert_array_equal(decode_window(twin, (10, 20, 300, 400), 64, 64),
                                  decode_window(EncodedImage(image.data, 3), (10, 20, 300, 400), 64, 64))
