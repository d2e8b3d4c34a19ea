"""Training: from a config to a run and its results. `experiment` builds an `Experiment` from a config
(dataset, model, optimizer, parallel strategy, BatchNorm grouping, the pure steps with their settings
bound); `step` holds the pure train and eval steps and `state` the TrainState they carry; `loop` trains
members through an engine of their strategy, with resume, evaluation, preemption and outputs; `rundir`
owns one run's directory; `population` trains runs that differ only in scalar hyperparameters as one
vectorized population."""

from cnnjax.train.experiment import Experiment, build, check_init_from, total_steps
from cnnjax.train.loop import Member, run, train_members
from cnnjax.train.preemption import Preempted, Preemption
from cnnjax.train.rundir import RunDir
from cnnjax.train.state import TrainState, count_params, create_train_state
from cnnjax.train.step import cross_entropy, eval_step, train_step

__all__ = ["Experiment", "Member", "Preempted", "Preemption", "RunDir", "TrainState", "build", "count_params",
           "check_init_from", "create_train_state", "cross_entropy", "eval_step", "run", "total_steps", "train_members",
           "train_step"]
