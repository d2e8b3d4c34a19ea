"""Layers of the notes: conv options against the size formula, pooling kinds, maxout, the augmentation layer
against the host pipeline, the fixed filter bank against SciPy, and every named activation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from cnnjax import imageops
from cnnjax.analysis.arithmetic import conv_output_size, conv_params, pool_output_size
from cnnjax.data import Augment
from cnnjax.nn import (CLASSIC_KERNELS, AdaptiveAvgPool, FilterBank, GlobalPool, Maxout, RandomAugment, conv,
                       depthwise_conv, get_activation, pool)
from cnnjax.train import count_params


def apply(module, x, **kwargs):
  variables = module.init(jax.random.PRNGKey(0), x, **kwargs)
  return module.apply(variables, x, **kwargs), variables


@pytest.mark.parametrize("padding", ["valid", "same", "full", 1, "circular"])
@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (1, 1, 1), (4, 3, 1)])
def test_conv_output_size_matches_the_formula(padding, kernel, stride, dilation):
  size, channels, features = 11, 3, 4
  layer = conv(features, kernel, strides=stride, padding=padding, dilation=dilation)
  x = jnp.ones((1, size, size, channels))
  variables = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x))
  y = jax.eval_shape(layer.apply, variables, x)
  expected = conv_output_size(size, kernel, stride, padding, dilation)
  assert y.shape == (1, expected, expected, features)
  assert count_params(variables["params"]) == conv_params(channels, features, kernel)


def test_full_padding_grows_valid_shrinks_same_keeps():
  assert [conv_output_size(6, 3, padding=p) for p in ("valid", "same", "full")] == [4, 6, 8]
  # Dilation 2 makes a 3-tap kernel span 5 pixels.
  assert conv_output_size(9, 3, dilation=2) == 5


@pytest.mark.parametrize("shape,kernel", [((1, 10, 4), 3), ((1, 6, 7, 8, 2), (3, 3, 3))])
def test_1d_and_3d_convolutions(shape, kernel):
  y, variables = apply(conv(5, kernel, padding="valid", ndim=len(shape) - 2), jnp.ones(shape))
  kernel = (kernel,) * (len(shape) - 2) if isinstance(kernel, int) else kernel
  spatial = tuple(conv_output_size(s, k) for s, k in zip(shape[1:-1], kernel))
  assert y.shape == (1,) + spatial + (5,)
  assert count_params(variables["params"]) == conv_params(shape[-1], 5, kernel)


def test_groups_and_depthwise_see_only_their_channels():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 5, 4))
  y, variables = apply(depthwise_conv(4, 3, padding="same", use_bias=False), x)
  assert count_params(variables["params"]) == conv_params(4, 4, 3, groups=4, bias=False) == 36
  # Changing channel 0 changes output channel 0 only.
  layer = depthwise_conv(4, 3, padding="same", use_bias=False)
  y2 = layer.apply(variables, x.at[..., 0].add(1.0))
  changed = np.abs(np.asarray(y2 - y)).reshape(-1, 4).max(0) > 0
  assert changed.tolist() == [True, False, False, False]
  _, grouped = apply(conv(6, 3, groups=2), x)
  assert count_params(grouped["params"]) == conv_params(4, 6, 3, groups=2) == 6 * (9 * 2 + 1)


def test_conv_option_errors_name_the_fix():
  with pytest.raises(ValueError, match="unknown padding"):
    conv(4, 3, padding="mirror")
  with pytest.raises(ValueError, match="do not split into 3 groups"):
    conv(4, 3, groups=3)


def test_max_avg_min_pooling_and_formula():
  x = jnp.array([[5, 2, 3, 4], [2, 1, 0, 1], [3, 7, 9, 5], [1, 4, 1, 8]], jnp.float32)[None, :, :, None]
  # The notes' example: 2x2 max pooling with stride 2 keeps 5, 4, 7, 9.
  np.testing.assert_array_equal(pool(x, "max", 2)[0, :, :, 0], [[5, 4], [7, 9]])
  np.testing.assert_array_equal(pool(x, "min", 2)[0, :, :, 0], [[1, 0], [1, 1]])
  np.testing.assert_allclose(pool(x, "avg", 2)[0, :, :, 0], [[2.5, 2.0], [3.75, 5.75]])
  for window, stride in ((2, 2), (3, 1), (3, 2)):
    out = pool(jnp.ones((1, 9, 9, 1)), "max", window, stride)
    assert out.shape[1] == pool_output_size(9, window, stride) == (9 - window) // stride + 1


def test_ceil_mode_matches_pytorch_rule_and_avg_counts_only_inputs():
  # GoogLeNet's first pool: 112 -> 56 with ceil_mode (55 without).
  assert pool(jnp.ones((1, 112, 112, 1)), "max", 3, 2, ceil_mode=True).shape[1] == 56 == \
      pool_output_size(112, 3, 2, ceil_mode=True)
  assert pool_output_size(112, 3, 2) == 55
  # An average window that ceil_mode extends past the input averages only the input pixels.
  np.testing.assert_allclose(pool(jnp.ones((1, 5, 5, 1)), "avg", 2, 2, ceil_mode=True), 1.0)


def test_global_and_adaptive_pooling():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
  np.testing.assert_allclose(GlobalPool("avg").apply({}, x), x.mean((1, 2)), rtol=1e-6)
  assert AdaptiveAvgPool(3).apply({}, x).shape == (2, 3, 3, 3)
  np.testing.assert_allclose(AdaptiveAvgPool(3).apply({}, x)[:, 0, 0], x[:, :2, :2].mean((1, 2)), rtol=1e-5)
  assert AdaptiveAvgPool(6).apply({}, x) is x  # already the target size: untouched
  # A 1x1 map spread over 7x7 (VGG at 32x32) repeats the value.
  np.testing.assert_allclose(AdaptiveAvgPool(7).apply({}, x[:, :1, :1]), np.broadcast_to(x[:, :1, :1], (2, 7, 7, 3)))


def test_maxout_is_the_max_of_two_affine_maps():
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
  y, variables = apply(Maxout(3), x)
  kernel, bias = variables["params"]["affine"]["kernel"], variables["params"]["affine"]["bias"]
  first = x @ kernel[:, 0::2] + bias[0::2]
  second = x @ kernel[:, 1::2] + bias[1::2]
  np.testing.assert_allclose(y, np.maximum(first, second), rtol=1e-5, atol=1e-6)
  assert count_params(variables["params"]) == 2 * (4 + 1) * 3


def test_named_activations_follow_the_notes():
  x = jnp.array([-2.0, 0.5])
  expected = {"identity": [-2.0, 0.5], "relu": [0.0, 0.5], "leaky_relu": [-0.2, 0.5],
              "sigmoid": 1 / (1 + np.exp(-np.array([-2.0, 0.5]))), "tanh": np.tanh([-2.0, 0.5]),
              "elu": [np.exp(-2.0) - 1, 0.5], "softmax": np.exp([-2.0, 0.5]) / np.exp([-2.0, 0.5]).sum()}
  for name, values in expected.items():
    np.testing.assert_allclose(get_activation(name)(x), values, rtol=1e-6, err_msg=name)


def test_augmentation_layer_equals_the_pipeline_for_the_same_draws():
  images = np.random.default_rng(0).uniform(0, 255, (3, 9, 9, 2)).astype(np.float32)
  draws = np.array([[0.4, 0, 3, 1], [-1.0, 2, 2, 0], [0.0, 4, 1, 1]], np.float64)
  host = Augment(crop_padding=2, flip=True, rotation_degrees=20.0).apply(images, draws)
  device = imageops.rotate_batch(jnp.asarray(images), jnp.asarray(draws[:, 0] * 20.0, jnp.float32), xp=jnp)
  device = imageops.crop_batch(device, 2, jnp.asarray(draws[:, 1:3], jnp.int32), xp=jnp)
  device = imageops.flip_batch(device, jnp.asarray(draws[:, 3] > 0), xp=jnp)
  np.testing.assert_allclose(device, host, atol=2e-3)


def test_augmentation_layer_is_random_in_training_and_identity_in_eval():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  layer = RandomAugment(crop_padding=2, flip=True, rotation_degrees=10.0)
  assert layer.init(jax.random.PRNGKey(0), x) == {}
  np.testing.assert_array_equal(layer.apply({}, x, train=False), x)
  first = layer.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  again = layer.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  other = layer.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(first, again)
  assert first.shape == x.shape and not np.allclose(first, other)


def test_masks_follow_images_with_nearest_rotation_and_their_own_fill():
  mask = np.zeros((1, 7, 7), np.int32)
  mask[0, 2:5, 1:3] = 2
  turned = imageops.rotate_batch(mask, np.array([90.0]), order="nearest", fill=1)
  assert set(np.unique(turned).tolist()) <= {0, 1, 2} and (turned == 2).sum() == (mask == 2).sum()
  shifted = imageops.crop_batch(mask, 2, np.array([[0, 0]]), fill=1)
  assert shifted[0, 0, 0] == 1 and shifted[0, 4, 3] == 2


@pytest.mark.parametrize("boundary,scipy_mode", [("zeros", "constant"), ("reflect", "reflect")])
def test_filter_bank_matches_scipy_and_has_no_parameters(boundary, scipy_mode):
  image = np.random.default_rng(0).uniform(0, 1, (1, 12, 10, 2)).astype(np.float32)
  bank = FilterBank(boundary=boundary)
  out, variables = apply(bank, jnp.asarray(image))
  assert count_params(variables.get("params", {})) == 0
  names = list(CLASSIC_KERNELS)
  assert out.shape == (1, 12, 10, 2 * len(names))
  for channel in range(2):
    for index, name in enumerate(names):
      expected = scipy.ndimage.correlate(image[0, :, :, channel], CLASSIC_KERNELS[name], mode=scipy_mode)
      np.testing.assert_allclose(out[0, :, :, channel * len(names) + index], expected, atol=1e-5, err_msg=name)


def test_classic_kernels_are_the_notes_tables():
  sums = {name: float(kernel.sum()) for name, kernel in CLASSIC_KERNELS.items()}
  assert sums == pytest.approx({"identity": 1, "edge_4": 0, "edge_8": 0, "sharpen": 1, "box_blur": 1,
                                "gaussian_blur_3x3": 1, "gaussian_blur_5x5": 1})
  assert CLASSIC_KERNELS["gaussian_blur_5x5"][2, 2] * 256 == 36 and CLASSIC_KERNELS["edge_8"][1, 1] == 8
