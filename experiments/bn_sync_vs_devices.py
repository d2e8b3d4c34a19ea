"""BatchNorm study, experiment 1: synchronized vs per-device BatchNorm statistics as devices are added.

A fixed global batch of 128 split over 1, 2, 4 or 8 devices (`shard_map`, one
slice per device) with `model.bn_sync=global` (statistics over the whole batch:
one `pmean` of the moments per layer) or `local` (each device its own slice:
128, 64, 32, 16 examples), and ghost groups of 4 and 32 examples on 8 devices
(within a device's slice; across two devices). `scripts/bn_study.py` adds how
far the devices' batch statistics drift apart (`replica_stat_divergence`).

Command (alone, with the normal tools; on CPU simulate 8 devices first with
XLA_FLAGS=--xla_force_host_platform_device_count=8):
  python -m cnnjax.sweep --config=experiments/bn_sync_vs_devices.py \
    --workdir=/tmp/cnnjax/bn_study/sync_vs_devices --mode=sequential
  (full scale: --config=experiments/bn_sync_vs_devices.py:full on a host with 8 accelerators)
As part of the study: python scripts/bn_study.py --workdir=DIR (section 1 of DIR/report.md).
Expected (measured, small scale, 3 seeds, mean ± 95% interval): eval accuracy
98.70-98.89% (± 0.40-0.80) for global and local sync on 1, 2, 4 and 8 devices,
no difference beyond the seed spread; the devices' statistics diverge by exactly
0 with global sync and by 0.0198 / 0.0316 / 0.0497 full-batch stds with local
sync on 2 / 4 / 8 devices (first seed); ghost groups of 4: 98.70% ± 0.40,
divergence 0.104; ghost groups of 32 (two devices): 98.89% ± 0.69, 0.0316.
Cost: 30 runs of 200 steps and their measurements, 223 s in the study on 2 CPU
cores that other jobs shared, with 8 simulated devices.
"""

import os

from cnnjax.sweep import grid, load_experiment_file, product

BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_base.py")
DEVICE_COUNTS = (1, 2, 4, 8)
SYNC_MODES = ("global", "local")
GHOST_GROUP_SIZES = (4, 32)  # on 8 devices (16 examples each): inside one slice, and spanning two


def get_config(scale: str = "small"):
  config = load_experiment_file(BASE_EXPERIMENT).get_config(scale)
  config.parallel.strategy = "shard_map"
  return config


def sweep():
  seeds = grid({"seed": load_experiment_file(BASE_EXPERIMENT).SEEDS})
  return product(grid({"parallel.num_devices": DEVICE_COUNTS, "model.bn_sync": SYNC_MODES})
                 + grid({"parallel.num_devices": (max(DEVICE_COUNTS),), "model.bn_sync": ("ghost",),
                         "model.bn_group_size": GHOST_GROUP_SIZES}), seeds)
