"""Training: the TrainState, the pure train/eval steps, and the loop with resume and outputs."""

from cnnjax.train.loop import Experiment, Member, build, run, train_members
from cnnjax.train.state import TrainState, count_params, create_train_state
from cnnjax.train.step import cross_entropy, eval_step, train_step

__all__ = ["Experiment", "TrainState", "build", "count_params", "create_train_state", "cross_entropy",
           "eval_step", "Member", "run", "train_members", "train_step"]
