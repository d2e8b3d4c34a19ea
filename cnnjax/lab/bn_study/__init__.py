"""The BatchNorm study: six experiments on how BatchNorm behaves under pmap, shard_map, jit and vmap, run
resumably from the `experiments/bn_*.py` files, measured, and written up as report.md, results.json and
plots (`python scripts/bn_study.py --workdir=DIR`)."""

from cnnjax.lab.bn_study.plan import SCALES, Context, Scale, Task, TrialPlan
from cnnjax.lab.bn_study.report import read_results
from cnnjax.lab.bn_study.study import EXPERIMENT_KEYS, EXPERIMENTS, publish_report, run_study, write_study_report

__all__ = ["Context", "EXPERIMENTS", "EXPERIMENT_KEYS", "SCALES", "Scale", "Task", "TrialPlan", "publish_report",
           "read_results", "run_study", "write_study_report"]
