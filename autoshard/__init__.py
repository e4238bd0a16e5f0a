"""autoshard: automatic sharding of single-device JAX training steps.

@autoshard.parallelize
def train_step(state, batch): ...
"""

from autoshard.api import Parallelized, parallelize
from autoshard.cost_model.hardware import PRESETS, Hardware, Level
from autoshard.hlo import Collective, collectives, parse_collectives
from autoshard.plan import Cost, Plan, SolverStats
from autoshard.search import MemoryBudgetError

__all__ = [
    "PRESETS",
    "Collective",
    "Cost",
    "Hardware",
    "Level",
    "MemoryBudgetError",
    "Parallelized",
    "Plan",
    "SolverStats",
    "collectives",
    "parallelize",
    "parse_collectives",
]
