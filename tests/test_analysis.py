"""CNN arithmetic: the notes' worked numbers, the formulas against every layer of real models, receptive
fields against published values and against a perturbation measurement, and the summary CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cnnjax.analysis import (conv_macs, conv_output_size, conv_params, dense_params, pool_output_size,
                             profile_model, profile_registered, same_padding)
from cnnjax.models import build_model
from cnnjax.nn import conv
from helpers import run_cli
from model_helpers import quick_variables
from test_models import INPUT_DTYPES, PINNED


class OneConv(nn.Module):
  """A single convolution, to profile the notes' worked examples."""

  features: int
  kernel: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    return conv(self.features, self.kernel, name="conv")(x)


def layer(profile, name):
  return next(row for row in profile.layers if row.name == name)


@pytest.mark.parametrize("input_shape,filters,expected", [((4, 4, 1), 1, 36), ((6, 6, 3), 1, 432),
                                                          ((6, 6, 3), 2, 864)])
def test_the_notes_worked_multiplications(input_shape, filters, expected):
  """3x3 over 4x4: (2x2)x(3x3) = 36; 3x3x3 over 6x6x3: (4x4)x(3x3x3) = 432, 864 with two filters."""
  out = conv_output_size(input_shape[0], 3)
  assert conv_macs((out, out), filters, 3, input_shape[-1]) == expected
  profile = profile_model(OneConv(filters), input_shape)
  assert profile.macs == expected and profile.output_shape == (out, out, filters)


def test_inception_5x5_branch_cost_and_its_1x1_reduction():
  direct = conv_macs((28, 28), 32, 5, 192)
  assert direct == (28 * 28 * 32) * (5 * 5 * 192) == 120_422_400  # "about 120 million"
  reduced = conv_macs((28, 28), 16, 1, 192) + conv_macs((28, 28), 32, 5, 16)
  assert reduced == 12_443_648 and 0.09 < reduced / direct < 0.11  # "about a tenth"
  # The same numbers read off GoogLeNet's module 3a with the paper's 5x5 kernel (28x28x192 in).
  profile = profile_registered("googlenet", (224, 224, 3), 1000, wide_kernel=5)
  reduce_row = layer(profile, "inception3a/branch3_reduce/conv")
  conv_row = layer(profile, "inception3a/branch3_conv/conv")
  assert reduce_row.input_shape == (28, 28, 192) and conv_row.output_shape == (28, 28, 32)
  assert reduce_row.macs + conv_row.macs == reduced


def test_lenet5_sizes_and_the_32x32x3_scenario():
  assert conv_output_size(32, 5) == 28 and pool_output_size(28, 2, 2) == 14 and conv_output_size(14, 5) == 10
  profile = profile_registered("lenet5", (32, 32, 1), 10)
  assert layer(profile, "c1").output_shape == (28, 28, 6) and layer(profile, "c3").output_shape == (10, 10, 16)
  assert dense_params(32 * 32 * 3, 128) == (3072 + 1) * 128 == 393_344
  assert conv_params(3, 32, 3) == 32 * (3 * 3 * 3 + 1) == 896
  assert layer(profile_registered("mlp", (32, 32, 3), 10), "hidden0").params == 393_344
  assert profile_model(OneConv(32), (32, 32, 3)).params == 896
  assert same_padding(3) == 1 and conv_output_size(32, 3, padding=same_padding(3)) == 32


def check_layer_formulas(profile):
  checked = 0
  for row in profile.layers:
    spec = row.spec
    if "kernel" in spec and not spec["transposed"]:
      paddings = spec["padding"] if isinstance(spec["padding"], list) else [spec["padding"]] * len(spec["kernel"])
      expected = tuple(conv_output_size(size, k, s, tuple(p) if isinstance(p, list) else p, d)
                       for size, k, s, p, d in zip(row.input_shape, spec["kernel"], spec["strides"], paddings,
                                                   spec["dilation"]))
      assert row.output_shape[:-1] == expected, row
      assert row.params == conv_params(row.input_shape[-1], row.output_shape[-1], spec["kernel"],
                                       groups=spec["groups"], bias=spec["bias"]), row
      checked += 1
    if "pool" in spec:
      paddings = [low for low, high in spec["padding"]] if isinstance(spec["padding"], list) else [0] * len(
          spec["window"])
      expected = tuple(pool_output_size(size, f, s, p, spec["ceil_mode"])
                       for size, f, s, p in zip(row.input_shape, spec["window"], spec["strides"], paddings))
      assert row.output_shape[:-1] == expected, row
      checked += 1
  return checked


@pytest.mark.parametrize("name,input_shape,options", [
    ("alexnet", (224, 224, 3), {}), ("googlenet", (224, 224, 3), {}), ("vgg11_bn", (64, 64, 3), {}),
    ("resnet18", (224, 224, 3), {}), ("unet", (32, 32, 3), {"features": (8, 16, 32)}),
    ("unet3d", (16, 16, 16, 1), {}), ("text_cnn", (100,), {}), ("lenet5", (32, 32, 1), {}),
])
def test_size_and_parameter_formulas_hold_for_every_layer(name, input_shape, options):
  profile = profile_registered(name, input_shape, 10, **options)
  assert check_layer_formulas(profile) >= 3
  assert sum(row.params for row in profile.layers) == profile.params


def test_formulas_hold_for_dilation_groups_full_and_strided_padding():
  class Options(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = conv(8, 3, padding="full", name="full")(x)
      x = conv(8, 3, padding=2, dilation=2, groups=4, name="dilated_grouped")(x)
      x = conv(6, 5, strides=3, padding="valid", name="strided")(x)
      return conv(6, 4, strides=2, padding="same", name="same_strided")(x)

  profile = profile_model(Options(), (23, 19, 4))
  assert check_layer_formulas(profile) == 4
  assert layer(profile, "full").output_shape == (25, 21, 8)


@pytest.mark.parametrize("name,input_shape,layer_name,size", [
    ("lenet5", (32, 32, 1), "c5", 32), ("alexnet", (224, 224, 3), "pool3", 195),
    ("vgg16", (224, 224, 3), "pool5", 212), ("resnet18", (224, 224, 3), "stage4_block2/norm2", 435),
])
def test_receptive_fields_match_published_values(name, input_shape, layer_name, size):
  """Araujo, Norris and Sim (Distill 2019) list 195 (AlexNet), 212 (VGG-16) and 435 (ResNet-18)."""
  field = layer(profile_registered(name, input_shape, 10), layer_name).receptive_field
  assert field.size == (size, size) and not field.is_global


RAISE = 1e3  # a perturbation far larger than any activation, so that it passes every max pool of its sign


def perturbed_rows(input_shape, tokens: bool):
  """Row 0: a random input; then, for each input row r, the input with row r raised (then lowered) by RAISE.

  Token inputs cannot be raised: row r's token is replaced by the last vocabulary entry, whose
  embedding the caller sets to +-RAISE.
  """
  rows = input_shape[0]
  key = jax.random.PRNGKey(0)
  if tokens:
    base = jax.random.randint(key, (1,) + input_shape, 1, 10)
    hit = jnp.arange(rows)[:, None] == jnp.arange(rows)[None, :]
    return jnp.concatenate([base, jnp.where(hit, -1, base)])
  base = jax.random.normal(key, (1,) + input_shape)
  hit = (jnp.arange(rows)[:, None] == jnp.arange(rows)[None, :]).reshape((rows, rows) + (1,) * (len(input_shape) - 1))
  return jnp.concatenate([base, base + RAISE * hit, base - RAISE * hit])


def measured_extent(model, variables, batch, path):
  """How many input rows, from the first to the last, change the central unit of layer `path`."""

  @jax.jit
  def outputs(x):
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    node = state["intermediates"]
    for part in path.split("/"):
      node = node[part]
    return node["__call__"][0]

  out = outputs(batch)
  center = tuple(s // 2 for s in out.shape[1:-1])
  unit = np.asarray(out[(slice(None),) + center])
  changed = np.abs(unit[1:] - unit[0]).max(-1) > 1e-3 * (1 + np.abs(unit[0]).max())
  rows = batch.shape[1]
  changed = changed.reshape(-1, rows).any(0)  # raised or lowered
  hits = np.nonzero(changed)[0]
  return int(hits.max() - hits.min() + 1)


@pytest.mark.parametrize("name,input_shape,options,exact", [
    # Linear paths (identity activations, average pools, strided shortcuts): every row in the field counts.
    ("resnet20", (64, 64, 3), {"norm_kind": "none", "activation": "identity"}, True),
    ("lenet5", (32, 32, 1), {"activation": "identity"}, True),
    # Max pools pass only what wins the window, so a measurement can only fall short of the field.
    ("unet", (32, 32, 1), {"features": (4, 8, 16), "activation": "identity"}, False),
    ("text_cnn", (120,), {"vocab_size": 30, "embed_dim": 4, "features": (4, 4), "pool_size": 3}, False),
])
def test_receptive_fields_match_a_perturbation_measurement(name, input_shape, options, exact):
  """Raising one input row changes the central unit only where the traced field says it can."""
  tokens = name == "text_cnn"
  profile = profile_registered(name, input_shape, 3, **options)
  model = build_model(name, num_classes=3, **options)
  variables = quick_variables(model, jnp.zeros((1,) + input_shape, jnp.int32 if tokens else jnp.float32))
  if tokens:
    variables["params"]["embedding"]["embedding"][-1] = RAISE
  batch = perturbed_rows(input_shape, tokens)
  checked = 0
  for row in profile.layers:
    field = row.receptive_field
    if row.kind not in ("Conv", "ConvTranspose", "MaxPool", "AvgPool") or field.size[0] > input_shape[0] // 2:
      continue
    measured = measured_extent(model, variables, batch, row.name)
    assert measured == field.size[0] if exact else measured <= field.size[0], (row.name, measured, field)
    checked += 1
  assert checked >= 3


def test_unet_field_follows_the_recursion_by_hand():
  """3x3 convs add 2 jumps, pools add one and double the jump, 2x2/2 up-convolutions halve it:
  5, 6 | 10, 14, 16 | 24, 32, 36 | 52, 68, 76 | 108, 140 | 156, 172 | 180, 188 | 192, 196 | 198, 200."""
  profile = profile_registered("unet", (64, 64, 1), 2)
  sizes = {row.name: row.receptive_field.size[0] for row in profile.layers}
  assert [sizes[n] for n in ("down0/conv2", "pool0", "bottleneck/conv2", "upconv3", "up3/conv2", "classifier")] \
      == [5, 6, 140, 140, 172, 200]
  jumps = {row.name: row.receptive_field.jump[0] for row in profile.layers}
  assert [jumps[n] for n in ("bottleneck/conv2", "upconv3", "upconv0")] == [16, 8, 1]


def test_summary_cli_prints_a_table_and_json():
  table = run_cli("cnnjax.summary", "vgg16", "--input_shape=224,224,3", "--num_classes=1000", timeout=120)
  assert table.returncode == 0, table.stderr
  assert "138,357,544" in table.stdout and "212x212 (jump 32x32)" in table.stdout
  result = run_cli("cnnjax.summary", "googlenet", "--input_shape=224,224,3", "--num_classes=1000", "--json",
                   timeout=120)
  summary = json.loads(result.stdout)
  assert summary["params"] == 6_624_904 and summary["output_shape"] == [1000] and summary["macs"] > 0
  assert {"name", "output_shape", "params", "macs", "receptive_field"} <= set(summary["layers"][0])
  error = run_cli("cnnjax.summary", "alexnet", "--input_shape=32,32,3", "--num_classes=10", timeout=120)
  assert error.returncode == 2 and error.stderr.strip().startswith("error: alexnet cannot take")


@pytest.mark.slow
def test_every_registered_model_profiles_with_its_pinned_count():
  for name, (input_shape, num_classes, count) in PINNED.items():
    profile = profile_model(build_model(name, num_classes=num_classes), input_shape,
                            input_dtype=INPUT_DTYPES.get(name, jnp.float32))
    assert profile.params == count, name
    assert profile.layers and profile.macs > 0, name
