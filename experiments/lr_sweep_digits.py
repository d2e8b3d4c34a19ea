"""Learning rate x seed for the notes' CNN (BatchNorm, dropout) on the digits: a vectorizable sweep.

Command:
  python -m cnnjax.sweep --config=experiments/lr_sweep_digits.py --workdir=/tmp/cnnjax/lr_sweep_digits
  (--mode=auto picks vectorized: the trials differ only in learning rate and seed, so all 8 train as one
  vmapped population; --mode=sequential or --mode=partitioned train them one by one or side by side.)
  On a CPU host the sweep starts 8 simulated devices by itself; --simulate_devices=N asks for N.
Expected: results.md in the workdir, 8 rows; measured eval accuracy (seed 0 / seed 1) with 8
simulated devices (one member each): lr 1e-4: 95.83 / 97.50%, 1e-3: 98.89 / 99.44%,
1e-2: 99.72 / 100.00% (best), 1e-1: 96.94 / 97.78% (too large for AdamW here). On one
device (--simulate_devices=1), the same population, other float rounding:
95.83 / 97.50, 98.89 / 99.44, 99.44 / 99.17 (best: lr 1e-2, seed 0), 98.33 / 97.50%.
Cost: 8 trials x 225 steps; measured 15 s for the whole command on 2 CPU cores with 8
simulated devices, 50 s on one device (8 members per device run as grouped convolutions,
which XLA CPU computes slowly).
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
