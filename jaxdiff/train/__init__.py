"""The one canonical trainer: state, step, loop."""

from jaxdiff.train.state import TrainState, make_optimizer, ema_decay, init_state
from jaxdiff.train.step import make_train_step

__all__ = ["TrainState", "make_optimizer", "ema_decay", "init_state", "make_train_step", "train"]


def train(config, workdir, **kwargs):
    """Train ``config`` in ``workdir`` (resumes if a checkpoint is there). See :mod:`.loop`."""
    from jaxdiff.train.loop import train as _train

    return _train(config, workdir, **kwargs)
