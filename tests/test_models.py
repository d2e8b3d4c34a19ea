"""Models: pinned trainable parameter counts for every registered name, output shapes, injection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.models import MODELS, build_model
from cnnjax.train import count_params
from model_helpers import quick_variables

CIFAR = (32, 32, 3)
IMAGENET = (224, 224, 3)
# name -> (input shape without the batch, classes, trainable parameters). Published counts where they
# exist: torchvision for the ImageNet ResNets, AlexNet, VGG and GoogLeNet (without auxiliary heads),
# He et al. 2015 for the CIFAR ResNets, LeCun et al. 1998.
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
    "plain20": (CIFAR, 10, 269_722),  # the shortcuts of ResNet-20 (option A) have no parameters
    "plain56": (CIFAR, 10, 853_018),
    "alexnet": (IMAGENET, 1000, 61_100_840),
    "vgg11": (IMAGENET, 1000, 132_863_336),
    "vgg11_bn": (IMAGENET, 1000, 132_868_840),
    "vgg13": (IMAGENET, 1000, 133_047_848),
    "vgg13_bn": (IMAGENET, 1000, 133_053_736),
    "vgg16": (IMAGENET, 1000, 138_357_544),
    "vgg16_bn": (IMAGENET, 1000, 138_365_992),
    "vgg19": (IMAGENET, 1000, 143_667_240),
    "vgg19_bn": (IMAGENET, 1000, 143_678_248),
    "googlenet": (IMAGENET, 1000, 6_624_904),
    "unet": ((64, 64, 1), 2, 31_030_658),  # the paper's 1-channel, 2-class set-up, 'same' padding
    "unet3d": ((16, 16, 16, 1), 3, 5_602_595),
    # 20,000 x 128 embedding + 2 x (5 x 128 x 128 + 128) + (128 + 1) x 2
    "text_cnn": ((256,), 2, 2_724_354),
}
# Models whose input is not a float image.
INPUT_DTYPES = {"text_cnn": jnp.int32}


def abstract_params(name: str, input_shape, num_classes: int, **kwargs):
  model = build_model(name, num_classes=num_classes, **kwargs)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape), INPUT_DTYPES.get(name)),
                         train=False))
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
@pytest.mark.slow
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


def test_googlenet_paper_kernel_and_branch_widths():
  """torchvision's "5x5" branch is 3x3; wide_kernel=5 restores the paper's, 380,928 parameters more."""
  paper = count_params(abstract_params("googlenet", IMAGENET, 1000, wide_kernel=5)["params"])
  branch_5x5 = [(16, 32), (32, 96), (16, 48), (24, 64), (24, 64), (32, 64), (32, 128), (32, 128), (48, 128)]
  assert paper - 6_624_904 == sum(r * f * (25 - 9) for r, f in branch_5x5)
  model = build_model("googlenet", num_classes=1000)
  variables = abstract_params("googlenet", IMAGENET, 1000)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1,) + IMAGENET)), variables)
  assert out.shape == (1, 1000)


@pytest.mark.parametrize("name,input_shape,options,output_shape", [
    ("unet", (16, 16, 2), dict(features=(4, 8, 16), norm_kind="batch"), (3, 16, 16, 5)),
    ("unet3d", (8, 8, 8, 1), dict(features=(2, 4)), (3, 8, 8, 8, 5)),
])
def test_unet_gives_per_pixel_logits_of_the_input_size(name, input_shape, options, output_shape):
  model = build_model(name, num_classes=5, **options)
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + input_shape)
  variables = quick_variables(model, x)
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == output_shape and logits.dtype == jnp.float32
  assert "batch_stats" in updates


def test_unet_input_errors_name_the_fix():
  model = build_model("unet", num_classes=2, features=(4, 8, 16))
  with pytest.raises(ValueError, match="must divide by 4"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 18, 16, 1)))
  with pytest.raises(ValueError, match="use unet3d"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 8, 1)))


def test_text_cnn_reads_token_ids():
  model = build_model("text_cnn", num_classes=2, vocab_size=50, embed_dim=8, features=(6, 6), kernel_size=3)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 20), 1, 50)
  variables = quick_variables(model, tokens)
  logits = model.apply(variables, tokens)
  assert logits.shape == (3, 2)
  # Token ids stored as floats (the zeros the train state is initialized with) read the same.
  np.testing.assert_allclose(model.apply(variables, tokens.astype(jnp.float32)), logits, rtol=1e-6)
  with pytest.raises(ValueError, match="token ids of shape"):
    model.apply(variables, tokens[..., None])


def test_in_model_augmentation_trains_and_is_off_in_eval():
  # No dropout and no BatchNorm: only the augmentation layer can make two training passes differ.
  model = build_model("simple_cnn", num_classes=3, augment_crop_padding=2, augment_flip=True, dropout_rate=0.0,
                      norm_kind="none")
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  variables = quick_variables(model, x)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
  train_logits = [model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(seed)})
                  for seed in (1, 2)]
  assert not np.allclose(train_logits[0], train_logits[1])


# Initializer scales (torchvision's): measured over every layer of a narrow model at once, each weight
# divided by its layer's expected standard deviation, so the pooled standard deviation should be 1.
INIT_STD_RTOL = 0.05
FLOAT32_SLACK = 1 + 1e-6  # a bound drawn in float32 may round just past its float64 value


def initialized_params(name: str, input_shape, **options):
  model = build_model(name, num_classes=10, **options)
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + input_shape))["params"], model


def pooled_std(scaled: list) -> float:
  return float(np.std(np.concatenate([np.ravel(s) for s in scaled])))


def test_vgg_initializers_are_torchvisions():
  """Convolutions He normal over fan-out, linear layers normal(0, 0.01), biases zero."""
  params, _ = initialized_params("vgg11_bn", (32, 32, 3), stage_features=(16, 32, 32, 64, 64), classifier_features=256)
  convs = [p["kernel"] / np.sqrt(2.0 / (p["kernel"].shape[0] * p["kernel"].shape[1] * p["kernel"].shape[3]))
           for name, p in params.items() if name.startswith("conv")]
  linears = [p["kernel"] / 0.01 for name, p in params.items() if name.startswith("fc")]
  assert abs(pooled_std(convs) - 1) < INIT_STD_RTOL and abs(pooled_std(linears) - 1) < INIT_STD_RTOL
  assert all(not np.any(p["bias"]) for name, p in params.items() if name.startswith(("conv", "fc")))


def test_alexnet_initializers_are_torchvisions_pytorch_defaults():
  """Weights and biases uniform on +-1/sqrt(fan_in): a standard deviation of 1/sqrt(3 fan_in)."""
  params, _ = initialized_params("alexnet", (64, 64, 3), classifier_features=256)
  scaled_weights, scaled_biases = [], []
  for name, p in params.items():
    kernel = p["kernel"]
    bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
    assert np.max(np.abs(kernel)) <= bound * FLOAT32_SLACK and np.max(np.abs(p["bias"])) <= bound * FLOAT32_SLACK, name
    scaled_weights.append(kernel / bound * np.sqrt(3.0))
    scaled_biases.append(p["bias"] / bound * np.sqrt(3.0))
  assert abs(pooled_std(scaled_weights) - 1) < INIT_STD_RTOL
  assert abs(pooled_std(scaled_biases) - 1) < 4 * INIT_STD_RTOL  # fewer samples


def test_googlenet_initializers_and_epsilon_are_torchvisions():
  """Truncated normal (std 0.01, bounds +-2) for convolutions and the classifier; BatchNorm epsilon 1e-3."""
  params, model = initialized_params("googlenet", (64, 64, 3), inception_modules=(("3a", (16, 16, 32, 8, 16, 8)),))
  kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if getattr(path[-1], "key", "") == "kernel"]
  assert abs(pooled_std([k / 0.01 for k in kernels]) - 1) < INIT_STD_RTOL
  bias = params["classifier"]["bias"]
  bound = 1.0 / np.sqrt(params["classifier"]["kernel"].shape[0])
  assert np.max(np.abs(bias)) <= bound * FLOAT32_SLACK and np.any(bias)
  assert model.norm.epsilon == 1e-3
  assert build_model("googlenet", num_classes=10, norm_options={"epsilon": 1e-5}).norm.epsilon == 1e-5
