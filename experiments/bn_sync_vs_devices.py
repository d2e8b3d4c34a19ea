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
Expected: global sync gives the same accuracy on 1, 2, 4 and 8 devices and devices whose
statistics agree exactly; local sync lets them diverge more the more devices there are, with no
accuracy difference beyond the seed spread at this scale.
Result: docs/results/bn_study/summary.md, "Sync vs devices" (scripts/bn_study.py; the report and plots beside it).
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
