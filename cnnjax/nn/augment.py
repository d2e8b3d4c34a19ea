"""The notes' augmentation layer ("augmentation_layer -> Input -> Conv2D ..."): random rotation, crop and flip
inside the model, active at train time only.

It applies the same arithmetic as the input pipeline's `cnnjax.data.Augment`
(both call `cnnjax.imageops`), in the same order (rotation, crop from a
zero-padded image, horizontal flip), but draws on the accelerator from a flax
RNG stream. The default stream is 'dropout', which the train step already
feeds with a key folded per step and per device, so a model with this layer
trains through the usual step with no change; evaluation (`train=False`) passes
images through untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax import imageops


def augment_images(images: jax.Array, key: jax.Array, *, crop_padding: int = 0, flip: bool = False,
                   rotation_degrees: float = 0.0) -> jax.Array:
  """Augments a batch (B, H, W, C) with per-example draws from `key`."""
  batch = images.shape[0]
  angle_key, crop_key, flip_key = jax.random.split(key, 3)
  if rotation_degrees:
    angles = jax.random.uniform(angle_key, (batch,), minval=-1.0, maxval=1.0) * rotation_degrees
    images = imageops.rotate_batch(images, angles, xp=jnp)
  if crop_padding:
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * crop_padding + 1)
    images = imageops.crop_batch(images, crop_padding, offsets, xp=jnp)
  if flip:
    images = imageops.flip_batch(images, jax.random.bernoulli(flip_key, shape=(batch,)), xp=jnp)
  return images


class RandomAugment(nn.Module):
  """Random rotation in [-rotation_degrees, rotation_degrees], crop after zero padding, and flip; train only."""

  crop_padding: int = 0
  flip: bool = False
  rotation_degrees: float = 0.0
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if not train or not (self.crop_padding or self.flip or self.rotation_degrees):
      return x
    return augment_images(x, self.make_rng(self.rng_collection), crop_padding=self.crop_padding,
                          flip=self.flip, rotation_degrees=self.rotation_degrees)
