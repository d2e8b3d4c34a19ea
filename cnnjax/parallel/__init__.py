"""Parallel strategies (none, pmap, shard_map, jit) and BatchNorm statistic semantics (bn_sync)."""

from cnnjax.parallel.bn_sync import BN_SYNC_MODES, BatchNormGrouping, batchnorm_grouping
from cnnjax.parallel.strategies import (BATCH_AXIS, STRATEGIES, Layout, Strategy, check_divisible,
                                        select_devices)

__all__ = ["BATCH_AXIS", "BN_SYNC_MODES", "BatchNormGrouping", "Layout", "STRATEGIES", "Strategy",
           "batchnorm_grouping", "check_divisible", "select_devices"]
