"""autoshard.models: reference NNX models with pure optax train steps."""

from autoshard.models import gpt, mlp
from autoshard.models.common import Setup, TrainState, init_state, make_train_step

__all__ = ["Setup", "TrainState", "gpt", "init_state", "make_train_step", "mlp"]
