"""cnnjax: a pure-functional JAX/Flax research codebase for convolutional nets, layered so that a config
flows one way: entry points (`cnnjax.main`, `cnnjax.sweep`) -> `cnnjax.config` -> `cnnjax.train` (the
experiment, the loop) -> `cnnjax.parallel` (the strategy that compiles and feeds the pure step) ->
`cnnjax.models` and `cnnjax.nn`, with `cnnjax.data`, `cnnjax.checkpoint` and `cnnjax.metrics` beside the
loop; lower layers never import higher ones (docs/ARCHITECTURE.md draws it).
"""

__version__ = "0.1.0"
