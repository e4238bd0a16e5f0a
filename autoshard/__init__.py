"""autoshard: automatic sharding of single-device JAX training steps.

@autoshard.parallelize
def train_step(state, batch): ...
"""

from importlib import metadata as _metadata

from autoshard import checkpoint, report
from autoshard.api import Parallelized, parallelize
from autoshard.cost_model.hardware import PRESETS, Efficiency, Hardware, Level
from autoshard.hlo import Collective, collectives, compiled_memory, parse_collectives
from autoshard.pipeline import Pipeline, PipelineError
from autoshard.plan import Cost, Plan, SolverStats
from autoshard.remat import RematChoice
from autoshard.search import MemoryBudgetError

try:
    __version__ = _metadata.version("autoshard")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "PRESETS",
    "Collective",
    "Cost",
    "Efficiency",
    "Hardware",
    "Level",
    "MemoryBudgetError",
    "Parallelized",
    "Pipeline",
    "PipelineError",
    "Plan",
    "RematChoice",
    "SolverStats",
    "checkpoint",
    "collectives",
    "compiled_memory",
    "parallelize",
    "parse_collectives",
    "report",
]
