"""Every way a step is compiled and fed across devices. `placement` resolves `parallel.strategy` (`auto`
included) to a strategy name and devices; `strategies` holds one object per strategy (none, pmap, shard_map,
jit, and the vectorized population's vmap inside shard_map) behind `REGISTRY`, each the only place its steps
are compiled, and the engines through which the training loop steps its members on them; `host_devices`
chooses the virtual CPU device count before JAX starts; `distributed` starts multi-process runs. Which
examples BatchNorm normalizes together is a layer concern, defined once in `cnnjax.nn.bn_sync`: a strategy
only says whether its step sees one device's slice and on which axis.
"""

from cnnjax.parallel.placement import AUTO, Layout, Resolved, check_divisible, resolve, select_devices
from cnnjax.parallel.strategies import (BATCH_AXIS, MEMBER_AXIS, REGISTRY, STRATEGIES, Engine, PopulationEngine,
                                        Run, SingleEngine, Strategy, device_part, make,
                                        members_device_count, waits_for_each_program)

__all__ = ["AUTO", "BATCH_AXIS", "Engine", "Layout", "MEMBER_AXIS", "PopulationEngine", "REGISTRY", "Resolved",
           "Run", "STRATEGIES", "SingleEngine", "Strategy", "check_divisible", "device_part", "make", "members_device_count",
           "resolve", "select_devices", "waits_for_each_program"]
