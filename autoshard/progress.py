"""What planning is doing, on the "autoshard" logger.

Planning that runs past `PROGRESS_AFTER` seconds reports each mesh it solves (the
ILP's size, the plan's cost, the best so far) at INFO level; quicker planning says
nothing. A re-plan (an input's shape changed) is reported in one line. With no
logging configured, autoshard logs to stderr; silence it with
``parallelize(..., verbose=False)`` or
``logging.getLogger("autoshard").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import logging
import sys
import time

import jax

logger = logging.getLogger("autoshard")

# Seconds of planning after which progress is reported.
PROGRESS_AFTER = 2.0


def _ensure_handler() -> None:
    """Log to stderr unless the application configured logging itself."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("autoshard: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


class Progress:
    """Reports one planning run (one input signature).

    Args:
      name: what is planned (the step's name), for the messages.
      verbose: False: say nothing below WARNING.

    Example:
      >>> p = Progress("train_step", verbose=False)
      >>> p.solved((2, 4), 1e-3, 1e-3, 1000, 200)
    """

    def __init__(self, name: str, verbose: bool = True):
        self.name, self.verbose = name, verbose
        self.start = time.perf_counter()
        self.best: float | None = None
        if verbose:
            _ensure_handler()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _say(self, msg: str, always: bool = False) -> None:
        if self.verbose and (always or self.elapsed() >= PROGRESS_AFTER):
            logger.info("%s [%.1f s] %s", self.name, self.elapsed(), msg)

    def solving(self, shape, nodes: int, classes: int, variables: int) -> None:
        """A mesh's ILP is about to be solved."""
        shared = f" ({classes} after sharing repeated layers)" if classes < nodes else ""
        self._say(
            f"mesh {tuple(shape)}: solving an ILP over {nodes} nodes{shared}, "
            f"{variables} strategy variables"
        )

    def solved(self, shape, cost: float, best: float, variables: int, constraints: int) -> None:
        """A mesh's plan is known (cost in seconds; best: the best so far)."""
        self._say(
            f"mesh {tuple(shape)}: plan cost {cost * 1e3:.3f} ms "
            f"({variables} variables, {constraints} constraints); "
            f"best so far {best * 1e3:.3f} ms"
        )

    def skipped(self, shape, bound: float, best: float) -> None:
        if bound != bound:  # nan: the memory rounds' time ran out
            why = (
                f"no plan within the memory budget that beats the best {best * 1e3:.3f} ms "
                "was found in time (pass this mesh to plan on it)"
            )
        elif bound == float("inf"):
            why = "its LP relaxation did not finish in time (pass this mesh to plan on it)"
        else:
            why = f"its lower bound {bound * 1e3:.3f} ms is not below the best {best * 1e3:.3f} ms"
        self._say(f"mesh {tuple(shape)}: skipped, {why}")

    def note(self, msg: str) -> None:
        self._say(msg)

    def done(self, shape, cached: bool = False) -> None:
        how = "loaded from the plan cache" if cached else "planned"
        self._say(f"{how}: mesh {tuple(shape)}")


def changed_inputs(old_args, new_args) -> list[str]:
    """Paths of the leaves whose shape or dtype differs between two calls (or a
    note that the structure changed)."""
    old, old_tree = jax.tree_util.tree_flatten_with_path(old_args)
    new, new_tree = jax.tree_util.tree_flatten_with_path(new_args)
    if old_tree != new_tree:
        return ["the argument structure"]
    out = []
    for (path, a), (_, b) in zip(old, new, strict=True):
        sa, sb = _sig(a), _sig(b)
        if sa != sb:
            out.append(f"{jax.tree_util.keystr(path)} {sa} -> {sb}")
    return out


def _sig(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{x.dtype}{list(x.shape)}"
    return type(x).__name__


def replanned(name: str, changes: list[str], seconds: float, verbose: bool = True) -> None:
    """One line: a step was planned again because an input changed."""
    if not verbose:
        return
    _ensure_handler()
    what = "; ".join(changes[:3]) + (f" (+{len(changes) - 3} more)" if len(changes) > 3 else "")
    logger.info("%s: re-planned in %.1f s because an input changed: %s", name, seconds, what)
