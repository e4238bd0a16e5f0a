"""autoshard.models: reference NNX models with pure optax train steps."""

from autoshard.models import gpt, gpt_linen, gpt_scan, llama, mlp, moe, wresnet
from autoshard.models.common import Setup, TrainState, init_state, make_train_step

__all__ = [
    "Setup",
    "TrainState",
    "gpt",
    "gpt_linen",
    "gpt_scan",
    "init_state",
    "llama",
    "make_train_step",
    "mlp",
    "moe",
    "wresnet",
]
