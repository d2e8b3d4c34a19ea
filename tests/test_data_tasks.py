"""Segmentation and text data: the synthetic shapes, masks that move with their images, the pet trimaps,
the tokenizer and vocabulary, and which preprocessing each kind of data refuses."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnjax.data import Augment, Preprocess, ProcessSlice, eval_dataset, open_dataset, shapes, train_dataset
from cnnjax.data.sources import MaskSource
from cnnjax.data.text import PAD, UNKNOWN, Vocabulary, tokenize
from cnnjax.errors import ConfigError, DataError
from mock_tfds_realistic_main import as_data_source


def identity_preprocess(**kwargs):
  return Preprocess(image_size=0, mean=(0.0,), std=(1 / 255.0,), **kwargs)


def test_shapes_are_deterministic_and_masks_mark_the_drawn_shapes():
  images, masks = shapes.generate_shapes(40, seed=3)
  again, _ = shapes.generate_shapes(40, seed=3)
  np.testing.assert_array_equal(images, again)
  assert images.shape == (40, 32, 32, 3) and masks.shape == (40, 32, 32)
  assert set(np.unique(masks).tolist()) == {0, 1, 2, 3}
  brightness = images.max(-1)
  assert brightness[masks > 0].mean() > brightness[masks == 0].mean() + 50  # shapes are bright, background dark
  volumes, solid_masks = shapes.generate_solids(8, seed=0)
  assert volumes.shape == (8, 16, 16, 16, 1) and set(np.unique(solid_masks).tolist()) == {0, 1, 2}


def test_synthetic_datasets_open_as_segmentation():
  dataset = open_dataset("shapes")
  assert (dataset.task, dataset.num_classes, dataset.image_shape) == ("segmentation", 4, (32, 32, 3))
  assert (len(dataset.train), len(dataset.eval)) == (1000, 200)
  assert not np.array_equal(dataset.train.images[:200], dataset.eval.images)  # different seeds
  volumes = open_dataset("shapes3d")
  assert volumes.model_input_shape(0) == (16, 16, 16, 1) and volumes.num_classes == 3


def test_masks_follow_their_images_through_augmentation():
  """Images that spell out their own mask (value 60 x class) must still do so after augmentation."""
  _, masks = shapes.generate_shapes(16, seed=1)
  images = np.repeat((masks * 60)[..., None], 3, axis=-1).astype(np.uint8)
  source = shapes.SegmentationArraySource(images, masks)
  exact = identity_preprocess(augment=Augment(crop_padding=4, flip=True), task="segmentation", mask_fill=0)
  batch = train_dataset(source, exact, seed=0, batch=ProcessSlice(16), num_steps=1)[0]
  inputs, labels = exact.finish(batch)
  assert labels.shape == (16, 32, 32) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.round(inputs[..., 0] / 60).astype(np.int32), labels)
  assert not np.array_equal(labels, masks[batch["index"]])  # something moved
  rotated = identity_preprocess(augment=Augment(rotation_degrees=30), task="segmentation", mask_fill=0)
  inputs, labels = rotated.finish(train_dataset(source, rotated, seed=0, batch=ProcessSlice(16), num_steps=1)[0])
  agreement = np.mean(np.round(inputs[..., 0] / 60).astype(np.int32) == labels)
  assert agreement > 0.95  # bilinear images and nearest masks differ only along edges


def test_eval_segmentation_batches_are_not_augmented():
  dataset = open_dataset("shapes")
  preprocess = identity_preprocess(augment=Augment(crop_padding=4, flip=True), task="segmentation")
  batch = next(iter(eval_dataset(dataset.eval, preprocess, batch=ProcessSlice(8))))
  np.testing.assert_array_equal(batch["label"], dataset.eval.masks[:8])


def test_pet_trimaps_become_classes_and_resize_with_their_images():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    dataset = open_dataset("oxford_iiit_pet")
    assert (dataset.task, dataset.num_classes, dataset.background_class) == ("segmentation", 3, 1)
    record = dataset.train[0]
    assert record["mask"].shape == record["image"].shape[:2] and set(np.unique(record["mask"])) <= {0, 1, 2}
    preprocess = Preprocess(image_size=24, mean=dataset.mean, std=dataset.std, task="segmentation",
                            mask_fill=dataset.background_class, augment=Augment(crop_padding=3, flip=True))
    batch = train_dataset(dataset.train, preprocess, seed=0, batch=ProcessSlice(4), num_steps=1)[0]
  assert batch["input"].shape == (4, 24, 24, 3) and batch["label"].shape == (4, 24, 24)
  assert set(np.unique(batch["label"]).tolist()) <= {0, 1, 2}
  with pytest.raises(DataError, match=r"mask values \[7\] are not among \(1, 2, 3\)"):
    MaskSource([{"image": np.zeros((2, 2, 3)), "segmentation_mask": np.full((2, 2, 1), 7)}], "pets",
               "segmentation_mask", (1, 2, 3))[0]


def test_tokenizer_and_vocabulary_are_deterministic():
  assert tokenize("A <br />great film, don't MISS it!") == ["a", "great", "film", "don't", "miss", "it"]
  texts = ["b a c", "a c", "c d", b"a"]
  vocabulary = Vocabulary.build(texts, size=5)
  assert vocabulary.words == ("a", "c", "b")  # counts 3, 3, 1: ties alphabetical, then most frequent first
  assert len(vocabulary) == 5
  np.testing.assert_array_equal(vocabulary.encode("c zzz a", 5), [3, UNKNOWN, 2, PAD, PAD])
  np.testing.assert_array_equal(vocabulary.encode("a a a a", 2), [2, 2])
  with pytest.raises(DataError, match="vocab_size"):
    Vocabulary.build(texts, size=2)


def test_imdb_reviews_become_fixed_length_token_batches():
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    dataset = open_dataset("imdb_reviews", vocab_size=8, max_length=12)
    assert (dataset.task, dataset.num_classes, dataset.vocab_size) == ("text", 2, 8)
    assert dataset.model_options == {"vocab_size": 8} and dataset.model_input_shape(0) == (12,)
    preprocess = Preprocess(image_size=0, mean=(), std=(), task="text")
    batch = train_dataset(dataset.train, preprocess, seed=0, batch=ProcessSlice(4), num_steps=1)[0]
  assert batch["input"].shape == (4, 12) and batch["input"].dtype == np.int32
  assert batch["input"].max() < 8 and batch["label"].shape == (4,)


@pytest.mark.parametrize("name,kwargs,message", [
    ("shapes3d", dict(image_size=32), "holds volumes"),
    ("shapes3d", dict(image_size=0, augmented=True), "holds volumes"),
    ("shapes", dict(image_size=0, random_resized_crop=True), "does not move masks"),
])
def test_preprocessing_that_cannot_apply_is_a_config_error(name, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    open_dataset(name).model_input_shape(**kwargs)
