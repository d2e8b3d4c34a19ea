"""Models: pinned trainable parameter counts for every registered name, output shapes, injection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.models import MODELS, build_model
from cnnjax.train import count_params

CIFAR = (32, 32, 3)
IMAGENET = (224, 224, 3)
# name -> (input shape, classes, trainable parameters). Published counts where they exist:
# torchvision for the ImageNet ResNets, He et al. 2015 for the CIFAR ResNets, LeCun et al. 1998.
PINNED = {
    "mlp": (CIFAR, 10, 394_634),  # (3072 + 1) x 128 + (128 + 1) x 10
    "simple_cnn": (CIFAR, 10, 545_290),
    "lenet5": ((32, 32, 1), 10, 61_706),
    "resnet20": (CIFAR, 10, 269_722),
    "resnet32": (CIFAR, 10, 464_154),
    "resnet44": (CIFAR, 10, 658_586),
    "resnet56": (CIFAR, 10, 853_018),
    "resnet110": (CIFAR, 10, 1_727_962),
    "resnet18": (IMAGENET, 1000, 11_689_512),
    "resnet34": (IMAGENET, 1000, 21_797_672),
    "resnet50": (IMAGENET, 1000, 25_557_032),
    "resnet101": (IMAGENET, 1000, 44_549_160),
    "resnet152": (IMAGENET, 1000, 60_192_808),
}


def abstract_params(name: str, input_shape, num_classes: int, **kwargs):
  model = build_model(name, num_classes=num_classes, **kwargs)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape)), train=False))
  return variables


def test_every_registered_model_has_a_pinned_count():
  assert sorted(MODELS) == sorted(PINNED), (
      f"unpinned: {sorted(set(MODELS) - set(PINNED))}, stale: {sorted(set(PINNED) - set(MODELS))}")


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_parameter_count(name):
  input_shape, num_classes, expected = PINNED[name]
  assert count_params(abstract_params(name, input_shape, num_classes)["params"]) == expected


def test_lenet5_layer_sizes_follow_the_paper():
  """32 -> 28 after C1 (5x5 valid), 14 after S2, 10 after C3, 5 after S4, 1 after C5."""
  model = build_model("lenet5", num_classes=10)
  x = jnp.zeros((2, 32, 32, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  shapes = {k: v["__call__"][0].shape for k, v in state["intermediates"].items() if k in ("c1", "c3", "c5")}
  assert shapes == {"c1": (2, 28, 28, 6), "c3": (2, 10, 10, 16), "c5": (2, 1, 1, 120)}


@pytest.mark.parametrize("name,input_shape", [("mlp", (8, 8, 1)), ("simple_cnn", (16, 16, 1)),
                                              ("lenet5", (32, 32, 1)), ("resnet20", (16, 16, 3))])
def test_forward_shapes_and_train_mode_updates_batch_stats(name, input_shape):
  model = build_model(name, num_classes=7)
  x = jax.random.normal(jax.random.PRNGKey(1), (4,) + input_shape)
  variables = model.init(jax.random.PRNGKey(0), x)
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (4, 7) and logits.dtype == jnp.float32
  if "batch_stats" in variables:
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(2)})
    before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("kind,expect_batch_stats", [("batch", True), ("group", False), ("layer", False),
                                                     ("none", False)])
def test_norm_is_injected_without_touching_model_code(kind, expect_batch_stats):
  variables = abstract_params("resnet20", (32, 32, 3), 10, norm_kind=kind)
  assert ("batch_stats" in variables) == expect_batch_stats
  params = count_params(variables["params"])
  if kind == "none":
    assert params == 269_722 - 2 * (16 * 7 + 32 * 6 + 64 * 6)  # every BatchNorm's scale and bias gone


def test_activation_and_dtype_options():
  model = build_model("lenet5", num_classes=10, activation="relu", dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  assert model.apply(variables, x).dtype == jnp.float32


def test_unknown_model_option_is_a_clear_error():
  with pytest.raises(TypeError, match="does not accept"):
    build_model("resnet20", num_classes=10, dropout_rate=0.5)
