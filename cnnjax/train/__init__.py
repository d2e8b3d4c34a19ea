"""Training: the TrainState, the pure train/eval steps, the run directory, and the loop with resume,
preemption and outputs."""

from cnnjax.train.loop import Experiment, Member, build, run, total_steps, train_members
from cnnjax.train.preemption import Preempted, Preemption
from cnnjax.train.rundir import RunDir
from cnnjax.train.state import TrainState, count_params, create_train_state
from cnnjax.train.step import cross_entropy, eval_step, train_step

__all__ = ["Experiment", "Member", "Preempted", "Preemption", "RunDir", "TrainState", "build", "count_params",
           "create_train_state", "cross_entropy", "eval_step", "run", "total_steps", "train_members", "train_step"]
