"""Sweeps: trials declared in experiment files, run sequentially, partitioned over devices or vectorized.
Declare with `grid`, `zipped`, `product` and `random_search` (`uniform`,
`log_uniform`, `choice`) in an experiment file's `sweep()`; run with
`python -m cnnjax.sweep --config=experiments/NAME.py --workdir=DIR`, or from
Python with `run_sweep`; `write_results` turns the trials' summaries into
results.csv, results.md and plots.
"""

from cnnjax.sweep.declare import (Trial, apply_overrides, choice, grid, load_experiment_file, load_trials,
                                  log_uniform, make_trials, product, random_search, trial_name, uniform, zipped)
from cnnjax.sweep.results import METRICS, write_results
from cnnjax.sweep.runner import MODES, SweepReport, TrialRun, run_sweep

__all__ = ["METRICS", "MODES", "SweepReport", "Trial", "TrialRun", "apply_overrides", "choice", "grid",
           "load_experiment_file", "load_trials", "log_uniform", "make_trials", "product", "random_search", "run_sweep", "trial_name",
           "uniform", "write_results", "zipped"]
