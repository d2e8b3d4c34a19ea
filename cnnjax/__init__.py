"""cnnjax: a pure-functional JAX/Flax research codebase for convolutional nets.

The package is layered so that data flows one way:
experiment config -> `cnnjax.main` -> `cnnjax.data` -> `cnnjax.parallel` ->
`cnnjax.train` (models from `cnnjax.models`, optimizers from `cnnjax.optim`) ->
`cnnjax.checkpoint` and `cnnjax.metrics`. Lower layers never import higher ones.
"""

__version__ = "0.1.0"
