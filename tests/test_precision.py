"""Mixed precision: model.dtype=bfloat16 computes in bfloat16, keeps float32 parameters and
BatchNorm statistics, and its loss tracks float32 training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import train
from helpers import experiment_config, read_jsonl, tiny

STEPS = 30
WINDOW = 6


def resnet_config(dtype: str):
  return tiny(experiment_config("resnet20_cifar10"), **{
      "data.name": "digits", "data.image_size": 16, "data.crop_padding": 0, "data.flip": False,
      "batch_size": 64, "num_train_steps": STEPS, "log_every_steps": 1, "checkpoint_every_steps": STEPS,
      "model.dtype": dtype, "optimizer.learning_rate": 0.05, "optimizer.schedule": "constant"})


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(tfds_data_dir):
  exp = train.build(resnet_config("bfloat16"))
  state = exp.init_state()
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((state.params, state.batch_stats)))
  x = jnp.ones((2,) + exp.input_shape)
  _, intermediates = exp.model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                                     train=False, capture_intermediates=True, mutable=["intermediates"])
  conv_outputs = [v["__call__"][0] for path, v in _flat_modules(intermediates["intermediates"])
                  if path.endswith("conv1")]
  assert conv_outputs and all(out.dtype == jnp.bfloat16 for out in conv_outputs)


def _flat_modules(tree, prefix=""):
  """(path, captured) for every submodule in a capture_intermediates tree."""
  for key, value in tree.items():
    if key == "__call__":
      continue
    path = f"{prefix}/{key}"
    if "__call__" in value:
      yield path, value
    yield from _flat_modules(value, path)


@pytest.mark.slow
def test_bfloat16_loss_tracks_float32(tmp_path, tfds_data_dir):
  losses = {}
  for dtype in ("float32", "bfloat16"):
    summary = train.run(resnet_config(dtype), str(tmp_path / dtype))
    assert summary["step"] == STEPS
    losses[dtype] = np.array([r["loss"] for r in read_jsonl(tmp_path / dtype / "metrics.jsonl")
                              if r["split"] == "train"])
  # Step by step the two drift apart as any two float orders do, so compare the curves: the same
  # start, the same averages over windows of WINDOW steps, and the same overall descent.
  np.testing.assert_allclose(losses["bfloat16"][:2], losses["float32"][:2], rtol=0.02)
  windows = {k: v.reshape(-1, WINDOW).mean(axis=1) for k, v in losses.items()}
  np.testing.assert_allclose(windows["bfloat16"], windows["float32"], rtol=0.2)
  for curve in windows.values():
    assert curve[-1] < 0.5 * curve[0]
