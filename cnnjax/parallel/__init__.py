"""Parallel strategies (auto, none, pmap, shard_map, jit) and BatchNorm statistic semantics (bn_sync)."""

from cnnjax.parallel.bn_sync import BN_SYNC_MODES, BatchNormGrouping, batchnorm_grouping
from cnnjax.parallel.strategies import (AUTO, BATCH_AXIS, STRATEGIES, Layout, Resolved, Strategy, check_divisible,
                                        resolve, select_devices)

__all__ = ["AUTO", "BATCH_AXIS", "BN_SYNC_MODES", "BatchNormGrouping", "Layout", "Resolved", "STRATEGIES",
           "Strategy", "batchnorm_grouping", "check_divisible", "resolve", "select_devices"]
