"""Learning rate x seed for the notes' CNN (BatchNorm, dropout) on the digits: a vectorizable sweep.

Command:
  python -m cnnjax.sweep --config=experiments/lr_sweep_digits.py --workdir=/tmp/cnnjax/lr_sweep_digits
  (--mode=auto picks vectorized: the trials differ only in learning rate and seed, so all 8 train as one
  vmapped population; --mode=sequential or --mode=partitioned train them one by one or side by side.)
  On a CPU host the sweep starts 8 simulated devices by itself; --simulate_devices=N asks for N.
Expected: results.md in the workdir, 8 rows (4 learning rates x 2 seeds); the best trial at
least 98% on the 360 test digits.
Result: docs/results/experiments.json, "lr_sweep_digits" (scripts/run_experiments.py: every trial's row).
"""

import os

from cnnjax.sweep import grid, load_experiment_file

# The notes' CNN on the digits exactly as experiments/simple_cnn_digits.py trains it, but for 10 epochs.
BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "simple_cnn_digits.py")
LEARNING_RATES = (1e-4, 1e-3, 1e-2, 1e-1)
SEEDS = (0, 1)


def get_config():
  config = load_experiment_file(BASE_EXPERIMENT).get_config()
  config.num_epochs = 10
  # Run alone or in sequential mode, each trial spreads its batch over all local devices.
  config.parallel.strategy = "jit"
  return config


def sweep():
  return grid({"optimizer.learning_rate": LEARNING_RATES, "seed": SEEDS})
