"""Which normalization for the notes' CNN on the digits: BatchNorm, GroupNorm, LayerNorm or none, x seed.

Not vectorizable: each norm is a different network (other parameters and
statistics), so the trials run sequentially or partitioned over device groups.

Command:
  python -m cnnjax.sweep --config=experiments/norm_sweep_digits.py --workdir=/tmp/cnnjax/norm_sweep_digits
  (--mode=auto picks partitioned where there are several devices: 8 trials on 8 devices run side
  by side, one device each; sequential on one device; --mode=vectorized is refused with a one-line
  error naming model.norm. On a CPU host the sweep starts 8 simulated devices by itself;
  --simulate_devices=N asks for N.)
Expected: results.md in the workdir, 8 rows (4 normalizations x 2 seeds); the best trial at
least 98% on the 360 test digits (one test digit is 0.28%).
Result: docs/results/experiments.json, "norm_sweep_digits" (scripts/run_experiments.py: every trial's row).
"""

import os

from cnnjax.sweep import grid, load_experiment_file

# The notes' CNN on the digits as experiments/simple_cnn_digits.py trains it, but for 10 epochs.
BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "simple_cnn_digits.py")
NORMS = ("batch", "group", "layer", "none")
SEEDS = (0, 1)


def get_config():
  config = load_experiment_file(BASE_EXPERIMENT).get_config()
  config.num_epochs = 10
  config.model.group_norm_groups = 8  # the first stage has 32 channels: groups of 4
  config.parallel.strategy = "jit"
  return config


def sweep():
  return grid({"model.norm": NORMS, "seed": SEEDS})
